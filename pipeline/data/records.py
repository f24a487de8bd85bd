"""The document record (ARCHITECTURE.md "Contracts") and its parquet I/O.

Every data stage reads and writes tables in this schema. A stage may add columns (clean adds
``pii_redactions``); rejected records keep the base columns plus ``stage``, ``reason`` and ``detail``
(e.g. the id of the kept duplicate, or a benchmark problem id).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

DOC_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("lang", pa.string(), nullable=False),
    pa.field("content", pa.large_string(), nullable=False),
    pa.field("size_bytes", pa.int64(), nullable=False),
    pa.field("num_lines", pa.int64(), nullable=False),
    pa.field("avg_line_len", pa.float64(), nullable=False),
    pa.field("max_line_len", pa.int64(), nullable=False),
    pa.field("alnum_frac", pa.float64(), nullable=False),
]
DOC_SCHEMA = pa.schema(DOC_FIELDS)
DOC_COLUMNS = [f.name for f in DOC_FIELDS]

PII_TYPE = pa.struct([("email", pa.int32()), ("ip_address", pa.int32()), ("key", pa.int32())])
CLEAN_SCHEMA = pa.schema(DOC_FIELDS + [pa.field("pii_redactions", PII_TYPE, nullable=False)])

REJECT_EXTRA = [
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
]
REJECT_SCHEMA = pa.schema(DOC_FIELDS + REJECT_EXTRA)


def doc_id(source: str, path: str, content: bytes | str) -> str:
    """Stable, content-derived id: the same file in the same place always gets the same id."""
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(digest_size=8)
    h.update(source.encode())
    h.update(b"\0")
    h.update(path.encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(content)
    return h.hexdigest()


def line_stats(content: str) -> dict[str, float | int]:
    """Line-shape features used by the Codex/StarCoder filters."""
    lines = content.splitlines() or [""]
    lengths = [len(line) for line in lines]
    n_chars = len(content)
    alnum = sum(ch.isalnum() for ch in content)
    return {
        "num_lines": len(lines),
        "avg_line_len": sum(lengths) / len(lines),
        "max_line_len": max(lengths),
        "alnum_frac": (alnum / n_chars) if n_chars else 0.0,
    }


def make_doc(source: str, path: str, lang: str, content: str, raw_size: int | None = None) -> dict:
    data = content.encode("utf-8", "surrogatepass")
    return {
        "id": doc_id(source, path, data),
        "source": source,
        "path": path,
        "lang": lang,
        "content": content,
        "size_bytes": raw_size if raw_size is not None else len(data),
        **line_stats(content),
    }


def reject(doc: dict, stage: str, reason: str, detail: str = "") -> dict:
    """A rejected record: the base document columns plus why and where it was dropped."""
    out = {name: doc.get(name) for name in DOC_COLUMNS}
    for name, default in (("content", ""), ("size_bytes", 0), ("num_lines", 0), ("avg_line_len", 0.0),
                          ("max_line_len", 0), ("alnum_frac", 0.0), ("lang", ""), ("path", ""), ("id", "")):
        if out[name] is None:
            out[name] = default
    out.update(stage=stage, reason=reason, detail=detail)
    return out


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def sort_docs(table: pa.Table) -> pa.Table:
    """Canonical order (language, then id) so outputs do not depend on worker scheduling."""
    if table.num_rows == 0:
        return table
    return table.sort_by([("lang", "ascending"), ("id", "ascending")])


def write_docs(table: pa.Table, out_dir: str | Path, row_group_rows: int = 1024) -> list[Path]:
    """Write a document table as one parquet dataset partitioned by ``lang`` (hive layout).

    The ``lang`` column is kept inside the files too, so a reader needs no partition inference.
    File names are fixed (``part-00000.parquet``), never random, so reruns are byte-identical.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("lang=*/*.parquet"):
        old.unlink()
    table = sort_docs(table)
    written = []
    langs = sorted(set(table.column("lang").to_pylist())) if table.num_rows else []
    for lang in langs:
        part = table.filter(pa.compute.equal(table.column("lang"), lang))
        d = out / f"lang={lang}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "part-00000.parquet"
        pq.write_table(part, path, row_group_size=row_group_rows, compression="zstd")
        written.append(path)
    return written


def doc_files(in_dir: str | Path) -> list[Path]:
    d = Path(in_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"document dataset not found: {d} (run the stage that produces it first)")
    return sorted(d.glob("lang=*/*.parquet"))


def read_docs(in_dir: str | Path, columns: Iterable[str] | None = None) -> pa.Table:
    """Read a dataset written by :func:`write_docs`, in canonical order."""
    files = doc_files(in_dir)
    cols = list(columns) if columns is not None else None
    if not files:
        return (CLEAN_SCHEMA if cols is None else pa.schema([CLEAN_SCHEMA.field(c) for c in cols])).empty_table()
    tables = [pq.read_table(f, columns=cols) for f in files]
    return pa.concat_tables(tables, promote_options="default")


def write_rejected(rows_or_table: list[dict] | pa.Table, out_dir: str | Path) -> Path:
    """Write one stage's rejected records to ``<out_dir>/rejected.parquet`` (canonical order)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else to_table(rows_or_table, REJECT_SCHEMA)
    table = table.select(REJECT_SCHEMA.names).cast(REJECT_SCHEMA)
    if table.num_rows:
        table = table.sort_by([("reason", "ascending"), ("id", "ascending")])
    path = out / "rejected.parquet"
    pq.write_table(table, path, compression="zstd")
    return path


def read_rejected(root: str | Path = "data/rejected") -> pa.Table:
    files = sorted(Path(root).glob("*/rejected.parquet"))
    if not files:
        return REJECT_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f) for f in files])


def reason_counts(table: pa.Table) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    counts = table.group_by("reason").aggregate([("reason", "count")])
    return dict(sorted(zip(counts.column("reason").to_pylist(), counts.column("reason_count").to_pylist())))


def split_of(doc_id: str, val_frac: float) -> str:
    """'val' or 'train' for a document, from a hash of its id: deterministic, and a document is in one split only.

    Every consumer of the split (shards, FIM evaluation, the simulated IDE user) must call this, so that
    held-out code is the same everywhere.
    """
    bucket = int(hashlib.blake2b(doc_id.encode(), digest_size=8, person=b"ownllm-split").hexdigest(), 16)
    return "val" if (bucket % 1_000_000) < val_frac * 1_000_000 else "train"


def val_part_of(doc_id: str, gate_frac: float) -> str:
    """'gate' or 'feedback' for a validation document, from a second hash of its id (independent of
    :func:`split_of`): the gate's held-out replay and FIM checks use 'gate' documents only; the simulated
    IDE user, its bounties and so the snapshot and every tuning step use 'feedback' documents only."""
    bucket = int(hashlib.blake2b(doc_id.encode(), digest_size=8, person=b"ownllm-gate").hexdigest(), 16)
    return "gate" if (bucket % 1_000_000) < gate_frac * 1_000_000 else "feedback"
