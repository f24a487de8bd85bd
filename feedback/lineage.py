"""Lineage of a model directory: what produced it (git revision, dvc.lock hash), its weights' hash, its evals.

Used when a model is registered as a version, so every version in the registry can be traced back to the
exact code, data and pipeline run that made it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.hashing import file_hash, weights_hash  # noqa: F401  (re-exported: the one definition is there)
from pipeline.tools import git_revision as git_rev  # also imported from here by rlhf.register

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "config.json", "tokenizer.json")


def model_hash(model_dir: str | Path) -> str | None:
    """SHA-256 over the weight, config and tokenizer files (names and bytes), in name order."""
    d = Path(model_dir)
    files = sorted({f for g in WEIGHT_GLOBS for f in d.glob(g) if f.is_file()})
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + bytes.fromhex(file_hash(f)))
    return h.hexdigest()


def eval_results(path: str | Path) -> dict[str, Any] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def lineage(model_dir: str | Path, eval_report: str | Path | None = None, repo: str | Path = ".") -> dict[str, Any]:
    """Keyword arguments for :func:`feedback.store.register_model_version`."""
    return {"git_rev": git_rev(repo), "dvc_lock_hash": file_hash(Path(repo) / "dvc.lock"),
            "model_hash": model_hash(model_dir),
            "eval_results": eval_results(eval_report) if eval_report else None}
