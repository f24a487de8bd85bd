"""The paths a `dvc.yaml` declares as stage outputs, so a command run by hand never writes over one.

An output of a stage (``outs``, ``metrics``, ``plots``) must only ever be what that stage's command made from
its dependencies; anything else written there shows up in ``dvc status`` as a modified stage and, worse, is
read later as the stage's result. Commands that take outside input (``ownllm eval humaneval --samples FILE``)
check their destinations here first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import yaml

from pipeline.cli import UserError


def tracked_outputs(root: str | Path = ".") -> set[Path]:
    """Every output path of every stage in ``root/dvc.yaml`` (resolved); empty when there is no dvc.yaml."""
    root = Path(root)
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return set()
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    paths: set[Path] = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                # an entry is a path, or a one-key mapping {path: {cache: false, ...}}
                for path in ([entry] if isinstance(entry, str) else list(entry)):
                    paths.add((root / path).resolve())
    return paths


def refuse_tracked_outputs(paths: Iterable[str | Path], root: str | Path = ".", why: str = "") -> None:
    """`UserError` naming the first of ``paths`` that is (or lies inside) a stage output of ``root/dvc.yaml``."""
    tracked = tracked_outputs(root)
    for p in paths:
        resolved = Path(p).resolve()
        hit = next((t for t in tracked if t == resolved or t in resolved.parents), None)
        if hit is not None:
            raise UserError(f"refusing to write {p}: it is the DVC-tracked output {hit} of a stage in "
                            f"{Path(root) / 'dvc.yaml'}{'; ' + why if why else ''}")
