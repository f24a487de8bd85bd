"""Experiment tracking: one wrapper around W&B plus a DVC metrics file per stage.

W&B runs offline by default (no account, nothing leaves the machine) and online when WANDB_API_KEY is
set. Whatever W&B does, every stage also writes ``reports/<stage>.json`` so ``dvc metrics show`` works
without it. The metrics file holds only deterministic values (no timings, no run ids) so that it can be
a DVC output that hashes identically on every run; timings go to W&B and to the console summary.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.config import Params


def wandb_mode(params: Params) -> str:
    mode = os.environ.get("OWNLLM_WANDB_MODE") or params.tracking.wandb_mode
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def write_json(path: str | Path, payload: Any) -> Path:
    """Deterministic JSON: sorted keys, fixed indent, trailing newline."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n", encoding="utf-8")
    return p


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Deterministic JSON lines: one record per line, sorted keys."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, default=_jsonable) + "\n")
    return p


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class StageRun:
    """What a stage reports: summary metrics (also to W&B) and a metrics file."""

    def __init__(self, stage: str, params: Params, wandb_run: Any | None):
        self.stage = stage
        self.params = params
        self.wandb_run = wandb_run
        self.metrics: dict[str, Any] = {}

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        self.metrics.update(metrics)

    def metrics_path(self) -> Path:
        return Path(self.params.tracking.reports_dir) / f"{self.stage.replace(' ', '_')}.json"


def init_wandb(name: str, params: Params, config: dict[str, Any] | None = None) -> Any | None:
    """Start a W&B run in the configured mode, or return None when tracking is disabled."""
    mode = wandb_mode(params)
    if mode == "disabled":
        return None
    import wandb

    Path(params.tracking.wandb_dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=params.tracking.project,
        name=name,
        job_type=name,
        mode=mode,
        dir=params.tracking.wandb_dir,
        config=config if config is not None else params.model_dump(mode="json"),
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
    )


@contextmanager
def stage_run(stage: str, params: Params, write_metrics: bool = True) -> Iterator[StageRun]:
    """Context for one stage: W&B run with the params, then the metrics file on success."""
    wb = init_wandb(stage, params)
    run = StageRun(stage, params, wb)
    try:
        yield run
    except BaseException:
        if wb is not None:
            wb.finish(exit_code=1)
        raise
    if write_metrics:
        write_json(run.metrics_path(), run.metrics)
    if wb is not None:
        flat = {k: v for k, v in _flatten(run.metrics).items() if isinstance(v, (int, float, str, bool))}
        wb.summary.update(flat)
        wb.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def say(msg: str) -> None:
    """One-line summary of what a stage did, on stderr so stdout stays machine-readable."""
    print(msg, file=sys.stderr, flush=True)
