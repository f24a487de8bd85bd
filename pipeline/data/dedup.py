"""`ownllm data dedup`: exact then MinHash-LSH near-duplicate removal, across all sources together.

data/clean → data/dedup (same schema, ``pii_redactions`` included) and data/rejected/dedup, where every
removed document says why (``exact_duplicate`` / ``near_duplicate``) and which document was kept in its
place (``detail`` = the id of a document in data/dedup). All sources are deduplicated as one corpus, so a
newly added source loses the files the old ones already hold.

Signatures are computed on all cores; everything after is a pure function of the signatures in a
canonical document order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.config import DedupConfig, Params
from pipeline.data import minhash
from pipeline.data.dedup_spec import EXACT, NEAR, STAGE, SignatureSpec, banding, cluster_size_histogram
from pipeline.data.pool import default_workers
from pipeline.data.records import DOC_COLUMNS, REJECT_SCHEMA, read_docs, write_docs, write_rejected

# Documents per task sent to a worker: small enough for a smooth progress bar and balanced cores.
CHUNK_DOCS = 16


# ------------------------------------------------------------------------------------ exact dedup
def exact_duplicates(ids: list[str], contents: list[str]) -> np.ndarray:
    """For each document, the index of the one kept for its normalised content (itself if unique).

    The kept copy is the one with the smallest id, so the choice does not depend on input order.
    """
    kept_by_hash: dict[str, int] = {}
    hashes = [minhash.content_hash(c) for c in contents]
    for i in sorted(range(len(ids)), key=ids.__getitem__):
        kept_by_hash.setdefault(hashes[i], i)
    return np.array([kept_by_hash[h] for h in hashes], dtype=np.int64)


# ------------------------------------------------------------------------------------- signatures
# Set in the parent before the pool forks, so workers read the texts without pickling them.
_TEXTS: list[str] = []
_SPEC: SignatureSpec | None = None


def _signature_chunk(bounds: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    start, stop = bounds
    sigs, nonempty = zip(*(_SPEC(t) for t in _TEXTS[start:stop]))
    return np.stack(sigs), np.array(nonempty, dtype=bool)


def compute_signatures(texts: list[str], spec: SignatureSpec, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(signatures (n, num_perm) uint32, has_shingles (n,) bool)`` in input order, on all cores."""
    global _TEXTS, _SPEC
    n_perm = len(spec.a)
    if not texts:
        return np.empty((0, n_perm), dtype=np.uint32), np.empty(0, dtype=bool)
    bounds = [(i, min(i + CHUNK_DOCS, len(texts))) for i in range(0, len(texts), CHUNK_DOCS)]
    n_workers = min(default_workers(workers), len(bounds))
    _TEXTS, _SPEC = texts, spec
    bar = tqdm(total=len(texts), desc="dedup signatures", unit="doc", mininterval=1.0, file=sys.stderr)
    parts = []
    try:
        if n_workers == 1:
            for b in bounds:
                parts.append(_signature_chunk(b))
                bar.update(b[1] - b[0])
        else:
            # Leaving the block terminates the workers, also when a chunk raises.
            with mp.get_context("fork").Pool(n_workers) as pool:
                # imap is ordered: the output does not depend on scheduling or the number of workers.
                for (start, stop), part in zip(bounds, pool.imap(_signature_chunk, bounds)):
                    parts.append(part)
                    bar.update(stop - start)
    finally:
        bar.close()
        _TEXTS, _SPEC = [], None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------------------------- near dedup
@dataclass
class NearResult:
    keep_of: np.ndarray  # for each input document, the index of the document kept for its cluster
    candidate_pairs: int
    verified_pairs: int


def near_duplicates(sigs: np.ndarray, has_shingles: np.ndarray, ids: list[str], cfg: DedupConfig) -> NearResult:
    """Cluster documents by LSH candidates verified on the signature; keep the smallest id per cluster.

    Documents without shingles (no tokens at all) cannot be compared and are never near duplicates.
    """
    n = len(ids)
    bands, rows = banding(cfg)
    idx = np.flatnonzero(has_shingles)
    keys = minhash.band_hashes(sigs[idx], bands, rows)
    pairs = minhash.candidate_pairs(keys, cfg.max_bucket)
    edges = minhash.verify_pairs(sigs[idx], pairs, cfg.threshold) if cfg.verify else pairs
    labels = minhash.connected_components(n, idx[edges] if len(edges) else edges)
    keep_of = minhash.representative(labels, ids)
    return NearResult(keep_of, len(pairs), len(edges))


# ------------------------------------------------------------------------------------------ stage
def rejected_table(table: pa.Table, rows: np.ndarray, reasons: list[str], kept_ids: list[str]) -> pa.Table:
    """Rejected records for ``rows`` of ``table``: the document columns plus stage, reason and kept id."""
    part = table.take(pa.array(rows, type=pa.int64())).select(DOC_COLUMNS)
    n = len(rows)
    return (part.append_column("stage", pa.array([STAGE] * n, pa.string()))
                .append_column("reason", pa.array(reasons, pa.string()))
                .append_column("detail", pa.array(kept_ids, pa.string()))
                .cast(REJECT_SCHEMA))


def dedup_table(table: pa.Table, cfg: DedupConfig, seed: int, workers: int | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Exact then near dedup of a document table: ``(kept, rejected, metrics)``."""
    ids = table.column("id").to_pylist()
    texts = table.column("content").to_pylist()
    n = len(ids)
    final = np.arange(n, dtype=np.int64)  # index of the document that stands for each one
    reason = np.array([""] * n, dtype=object)

    exact_keep = exact_duplicates(ids, texts) if cfg.exact else final.copy()
    is_exact_dup = exact_keep != np.arange(n)
    reason[is_exact_dup] = EXACT
    survivors = np.flatnonzero(~is_exact_dup)

    near = NearResult(np.arange(len(survivors)), 0, 0)
    has_shingles = np.zeros(len(survivors), dtype=bool)
    if cfg.near and len(survivors):
        spec = SignatureSpec.from_config(cfg, seed)
        sigs, has_shingles = compute_signatures([texts[i] for i in survivors], spec, workers)
        near = near_duplicates(sigs, has_shingles, [ids[i] for i in survivors], cfg)
    near_keep = survivors[near.keep_of]
    final[survivors] = near_keep
    reason[survivors[near_keep != survivors]] = NEAR
    final[is_exact_dup] = final[exact_keep[is_exact_dup]]  # point exact copies at the document that stays

    removed = np.flatnonzero(reason != "")
    kept = table.take(pa.array(np.flatnonzero(reason == ""), type=pa.int64()))
    rejected = rejected_table(table, removed, reason[removed].tolist(), [ids[final[i]] for i in removed])
    langs = table.column("lang").to_pylist()
    sources = table.column("source").to_pylist()
    sizes = table.column("size_bytes").to_numpy()
    by_lang: dict[str, Counter] = {}
    for i in removed:
        by_lang.setdefault(langs[i], Counter())[reason[i]] += 1
    bands, rows = banding(cfg)
    metrics = {
        "documents_in": n,
        "documents_out": kept.num_rows,
        "bytes_in": int(sizes.sum()) if n else 0,
        "bytes_out": int(sizes[reason == ""].sum()) if n else 0,
        "exact_duplicates": int((reason == EXACT).sum()),
        "near_duplicates": int((reason == NEAR).sum()),
        "removed_by_lang": {lang: dict(sorted(c.items())) for lang, c in sorted(by_lang.items())},
        "cross_source_duplicates": int(sum(sources[i] != sources[final[i]] for i in removed)),
        "exact_clusters": cluster_size_histogram(exact_keep),
        "near_clusters": cluster_size_histogram(near.keep_of),
        "largest_cluster": int(max(Counter(final.tolist()).values(), default=0)),
        "lsh": {"bands": bands, "rows": rows, "candidate_pairs": near.candidate_pairs,
                "verified_pairs": near.verified_pairs,
                "docs_without_shingles": int((~has_shingles).sum()) if cfg.near else 0},
    }
    return kept, rejected, metrics


def run_dedup(params: Params, workers: int | None = None) -> dict:
    """The stage on this machine: data/clean → data/dedup + data/rejected/dedup; returns the metrics."""
    cfg = params.data.dedup
    table = read_docs(cfg.input)
    kept, rejected, metrics = dedup_table(table, cfg, params.seed, workers)
    write_docs(kept, cfg.out)
    write_rejected(rejected, cfg.rejected)
    return metrics
