"""What the local and the Spark dedup share: reasons, the signature function, the banding, cluster sizes.

Both engines import these from here (beside :mod:`pipeline.data.minhash`, which they are built on), so the
Spark dedup never imports the local stage and the two cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.config import DedupConfig
from pipeline.data import minhash

STAGE = "dedup"
EXACT = "exact_duplicate"
NEAR = "near_duplicate"


@dataclass(frozen=True)
class SignatureSpec:
    """Everything a worker needs to turn text into a signature (picklable, for Spark too)."""

    ngram: int
    token_pattern: str
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def from_config(cls, cfg: DedupConfig, seed: int) -> "SignatureSpec":
        a, b = minhash.permutations(cfg.num_perm, seed)
        return cls(cfg.ngram, cfg.token_pattern, a, b)

    def __call__(self, text: str) -> tuple[np.ndarray, bool]:
        sh = minhash.shingles(text, self.ngram, self.token_pattern)
        return minhash.signature(sh, self.a, self.b), len(sh) > 0


def banding(cfg: DedupConfig) -> tuple[int, int]:
    """``(bands, rows)``: as configured, or the optimum for the threshold and the false-negative weight."""
    if cfg.bands and cfg.rows:
        return cfg.bands, cfg.rows
    w = cfg.false_negative_weight
    return minhash.optimal_bands(cfg.threshold, cfg.num_perm, fp_weight=1 - w, fn_weight=w)


def cluster_size_histogram(keep_of: np.ndarray) -> dict[str, int]:
    """How many clusters (of two or more documents) have each size, bucketed 2, 3, 4-7, 8-15, ..."""
    sizes = Counter(Counter(keep_of.tolist()).values())
    out: Counter[str] = Counter()
    for size, count in sizes.items():
        if size < 2:
            continue
        if size <= 3:
            out[str(size)] += count
        else:
            lo = 1 << (size.bit_length() - 1)
            out[f"{lo}-{2 * lo - 1}"] += count
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("-")[0])))
