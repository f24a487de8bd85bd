"""What "the same file" and "the same weights" mean: sha256 over bytes, in name order.

One definition for every layer: the evaluate stage records the weights it scored, the gate reuses an evaluation
only for the same weights, the registry and the suggestion filter name the weights they belong to.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the model's weight files (safetensors, else .bin), in name order: what 'identical weights'
    means. A suggestion filter records it for the model it was fitted on (feedback/suggestion_filter.py)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {d}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
