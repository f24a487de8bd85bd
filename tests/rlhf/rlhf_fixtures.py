"""Helpers for the RLHF tests: params pointed at tmp dirs and a small snapshot cut from real stdlib code."""

from __future__ import annotations

import json
from pathlib import Path

import sysconfig

from pipeline.config import Params, parse_params

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def rlhf_params(tmp: Path, model_dir: Path, **rlhf) -> Params:
    cfg = {
        "snapshot_dir": str(tmp / "data/feedback"),
        "base_model": str(model_dir),
        "sft_out": str(tmp / "models/sft"),
        "tuned_out": str(tmp / "models/tuned"),
        "work_dir": str(tmp / "checkpoints/rlhf"),
        "registry_dir": str(tmp / "models/registry"),
        "reports_dir": str(tmp / "reports/rlhf"),
        "lock_file": str(tmp / "var/rlhf.lock"),
        "state_file": str(tmp / "var/rlhf/last_refresh.json"),
        "device": "cpu",
        "batch_size": 2,
        "sft_max_steps": 2,
        "dpo_max_steps": 2,
        "max_length": 96,
        "min_pairs": 2,
        "refresh_runner": "direct",
        **rlhf,
    }
    data = {
        "data": {"sources": [{"name": "t", "kind": "dir", "path": str(tmp)}]},
        "tracking": {"reports_dir": str(tmp / "reports"), "wandb_mode": "disabled"},
        "rlhf": cfg,
    }
    return parse_params(data, "test-params")


def code_chunks(n: int) -> list[tuple[str, str]]:
    """(prefix, true continuation) pairs cut from real stdlib code."""
    src = "".join((STDLIB / n).read_text(encoding="utf-8") for n in ("textwrap.py", "shlex.py"))
    lines = src.splitlines(keepends=True)
    out = []
    for i in range(n):
        at = 40 + i * 23
        out.append(("".join(lines[at - 8:at]), "".join(lines[at:at + 2])))
    return out


def write_snapshot(snap: Path, n_sft: int = 4, n_pairs: int = 4) -> None:
    snap.mkdir(parents=True, exist_ok=True)
    chunks = code_chunks(n_sft + n_pairs)
    sft = [{"id": f"s{i}", "prompt": f"# Task: continue the code\n{p}", "completion": c}
           for i, (p, c) in enumerate(chunks[:n_sft])]
    pairs = [{"id": f"p{i}", "prompt": p, "chosen": c, "rejected": "pass\n"}
             for i, (p, c) in enumerate(chunks[n_sft:])]
    unpaired = [{"id": f"u{i}", "prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for i, r in enumerate(pairs) for k in ("chosen", "rejected")]
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs), ("unpaired.jsonl", unpaired)):
        (snap / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
