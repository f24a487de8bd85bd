"""Spark plumbing of the Spark engine (pipeline/data/spark_engine.py): session, reading and writing document
datasets in the records layout, and mapping steps over Arrow batches.

Nothing here re-implements a transform. Steps run through ``DataFrame.mapInArrow`` calling
:func:`pipeline.data.steps.base.apply_steps` on each Arrow batch, exactly as the local engine calls it
on each slice, so both engines keep and reject the same documents for the same reasons.

Outputs are written in the layout :mod:`pipeline.data.records` defines (``lang=<x>/part-NNNNN.parquet``
with ``lang`` inside the files, sorted by id, zstd, ``row_group_rows`` per row group). The executors write
their own files with the same pyarrow writer the local engine uses, so downstream readers see no
difference; with one file per language (the default for corpora under ``spark.max_rows_per_file``) the
files are byte-identical to the local engine's. Paths must therefore be visible to the driver and every
executor: a shared filesystem, or ``/dbfs/...`` on Databricks (docs/SPARK.md).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Params
from pipeline.data.records import REJECT_SCHEMA, doc_files, reason_counts
from pipeline.data.steps.base import Step, apply_steps

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

REJECTED_FLAG = "_rejected"
FILE_COLUMN = "_file"
# pyarrow's default row-group length for pq.write_table, which records.write_rejected relies on.
REJECTED_ROW_GROUP = 1024 * 1024
# Ids are blake2b hex digests (records.doc_id): uniform, so a prefix range-partitions a language by id.
ID_PREFIX_HEX = 8


# -------------------------------------------------------------------------------------------- session
def spark_session(params: Params) -> "SparkSession":
    """The SparkSession params.yaml describes (``spark.master``, ``spark.conf``); reused if one is running.

    ``spark.master: null`` leaves the master to the launcher (spark-submit, Databricks), which is how a
    cluster job must be started.
    """
    # Executors must run the interpreter that has this project and its dependencies installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    cfg = params.spark
    builder = SparkSession.builder.appName(cfg.app_name)
    if cfg.master:
        builder = builder.master(cfg.master)
    # Timestamps and arrow conversions must not depend on the machine's locale.
    builder = builder.config("spark.sql.session.timeZone", "UTC")
    for key, value in sorted(cfg.conf.items()):
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark


def spark_schema(schema: pa.Schema):
    """The Spark type of an Arrow schema (``large_string`` becomes ``string``; Spark has one string type)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def conform(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """Columns of ``schema``, in its order and exact types (Spark hands back ``string``, nullable fields)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    return table.select(schema.names).cast(schema).combine_chunks()


# ---------------------------------------------------------------------------------------------- read
def read_docs_df(spark: "SparkSession", in_dir: str | Path) -> "DataFrame":
    """A document dataset written by records.write_docs (or :func:`write_docs_df`) as a DataFrame.

    The files are named one by one, so Spark does no partition discovery: ``lang`` comes from inside
    the files, as it does for records.read_docs.
    """
    files = doc_files(in_dir)
    if not files:
        raise FileNotFoundError(f"document dataset is empty: {in_dir} (no lang=*/*.parquet files)")
    return spark.read.parquet(*[str(f.resolve()) for f in files])


# ------------------------------------------------------------------------------------------ map steps
def spread(df: "DataFrame") -> "DataFrame":
    """At least as many partitions as shuffles use (and 2 per core) before CPU-bound Python work.

    A dataset of a few large files, or a join that adaptive execution coalesced, can reach a Python
    pass in fewer partitions than cores; an explicit repartition count is kept as given.
    """
    spark = df.sparkSession
    target = max(int(spark.conf.get("spark.sql.shuffle.partitions")), 2 * spark.sparkContext.defaultParallelism)
    return df if df.rdd.getNumPartitions() >= target else df.repartition(target)


def union_schema(out_schema: pa.Schema) -> pa.Schema:
    """One schema for kept and rejected rows of a mapInArrow pass, told apart by a ``_rejected`` flag.

    mapInArrow has one output; emitting both kinds of row in one pass runs every step once.
    """
    fields = [f.with_nullable(True) for f in out_schema]
    names = set(out_schema.names)
    fields += [f.with_nullable(True) for f in REJECT_SCHEMA if f.name not in names]
    fields.append(pa.field(REJECTED_FLAG, pa.bool_(), nullable=False))
    return pa.schema(fields)


def as_union(table: pa.Table, schema: pa.Schema, rejected: bool) -> pa.Table:
    n = table.num_rows
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
            for f in schema if f.name != REJECTED_FLAG]
    cols.append(pa.array([rejected] * n, pa.bool_()))
    return pa.Table.from_arrays(cols, schema=schema)


def steps_over_batches(batches: Iterator[pa.RecordBatch], steps: Sequence[Step], out_schema: pa.Schema,
                       stage: str) -> Iterator[pa.RecordBatch]:
    """The mapInArrow body: apply_steps per batch, kept and rejected rows in the union schema."""
    schema = union_schema(out_schema)
    for batch in batches:
        res = apply_steps(batch, steps, out_schema, stage)
        for part in (as_union(res.kept, schema, False), as_union(res.rejected, schema, True)):
            yield from part.to_batches()


def map_steps(df: "DataFrame", steps: Sequence[Step], out_schema: pa.Schema, stage: str,
              batch_rows: int | None = None) -> tuple["DataFrame", "DataFrame"]:
    """Run steps over a DataFrame of documents: ``(kept, rejected)`` DataFrames.

    The pass is persisted so that reading both outputs runs the steps once.
    """
    from pyspark import StorageLevel

    if batch_rows:
        df.sparkSession.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    schema = union_schema(out_schema)
    mixed = spread(df).mapInArrow(lambda it: steps_over_batches(it, steps, out_schema, stage), spark_schema(schema))
    mixed = mixed.persist(StorageLevel.MEMORY_AND_DISK)
    kept = mixed.filter(~mixed[REJECTED_FLAG]).select(*out_schema.names)
    rejected = mixed.filter(mixed[REJECTED_FLAG]).select(*REJECT_SCHEMA.names)
    return kept, rejected


# --------------------------------------------------------------------------------------------- write
def _clear_docs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("lang=*/*.parquet"):
        old.unlink()


def files_per_lang(df: "DataFrame", max_rows_per_file: int) -> dict[str, int]:
    counts = {r["lang"]: r["count"] for r in df.groupBy("lang").count().collect()}
    return {lang: max(1, math.ceil(n / max_rows_per_file)) for lang, n in sorted(counts.items())}


def with_file_index(df: "DataFrame", nfiles: dict[str, int]) -> "DataFrame":
    """Add ``_file``: which part file of its language a row goes to, by range of id (so files stay sorted)."""
    from pyspark.sql import functions as F

    prefix = F.conv(F.substring("id", 1, ID_PREFIX_HEX), 16, 10).cast("double")
    n = F.element_at(F.create_map(*[F.lit(x) for kv in nfiles.items() for x in kv]), F.col("lang"))
    idx = F.floor(F.coalesce(prefix, F.lit(0.0)) * n / float(16 ** ID_PREFIX_HEX)).cast("int")
    return df.withColumn(FILE_COLUMN, idx)


def _write_part(table: pa.Table, out: str, schema: pa.Schema, row_group_rows: int) -> pa.Table:
    """applyInArrow body: one (lang, file) group → one parquet file, written like records.write_docs."""
    lang = table.column("lang")[0].as_py()
    index = table.column(FILE_COLUMN)[0].as_py()
    part = conform(table, schema).sort_by([("id", "ascending")])
    path = Path(out) / f"lang={lang}" / f"part-{index:05d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(part, path, row_group_size=row_group_rows, compression="zstd")
    return pa.table({"lang": [lang], "file": [index], "rows": [part.num_rows], "path": [str(path)]})


def write_docs_df(df: "DataFrame", out_dir: str | Path, schema: pa.Schema, row_group_rows: int,
                  max_rows_per_file: int) -> dict[str, int]:
    """Write a document DataFrame as records.write_docs does, in parallel; returns rows per language.

    Each language is split into ``ceil(rows / max_rows_per_file)`` files by id range; each file is one
    task that sorts its rows by id and writes them with ``row_group_rows`` rows per row group.
    """
    out = Path(out_dir).resolve()
    _clear_docs(out)
    nfiles = files_per_lang(df, max_rows_per_file)
    if not nfiles:
        return {}
    keyed = with_file_index(df, nfiles)
    result_schema = "lang string, file long, rows long, path string"
    written = keyed.groupBy("lang", FILE_COLUMN).applyInArrow(
        lambda t: _write_part(t, str(out), schema, row_group_rows), result_schema).collect()
    by_lang: dict[str, int] = {}
    for r in written:
        by_lang[r["lang"]] = by_lang.get(r["lang"], 0) + r["rows"]
    return dict(sorted(by_lang.items()))


def write_rejected_df(df: "DataFrame", out_dir: str | Path) -> tuple[Path, pa.Table]:
    """Write rejected records like records.write_rejected: one file, sorted by (reason, id).

    Rows stream to the driver in order (``toLocalIterator``), so the driver holds at most one row group.
    Returns the path and a content-free table (id, reason, detail) for counting.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rejected.parquet"
    ordered = df.select(*REJECT_SCHEMA.names).orderBy("reason", "id")
    keys: list[pa.Table] = []
    buffer: list[dict] = []
    with pq.ParquetWriter(path, REJECT_SCHEMA, compression="zstd") as writer:
        def flush() -> None:
            table = pa.Table.from_pylist(buffer, schema=REJECT_SCHEMA)
            writer.write_table(table)
            keys.append(table.select(["id", "reason", "detail"]))
            buffer.clear()

        for row in ordered.toLocalIterator(prefetchPartitions=True):
            buffer.append(row.asDict())
            if len(buffer) >= REJECTED_ROW_GROUP:
                flush()
        if buffer or not keys:  # nothing rejected: one empty row group, as pq.write_table writes
            flush()
    key_schema = pa.schema([REJECT_SCHEMA.field(c) for c in ("id", "reason", "detail")])
    return path, (pa.concat_tables(keys) if keys else key_schema.empty_table())


def rejected_summary(keys: pa.Table) -> dict:
    return {"rejected": keys.num_rows, "rejected_by_reason": reason_counts(keys)}


# ------------------------------------------------------------------------------------------ summaries
def docs_summary(df: "DataFrame") -> dict:
    """documents, bytes and documents per language of a (persisted) document DataFrame."""
    from pyspark.sql import functions as F

    rows = df.groupBy("lang").agg(F.count("*").alias("n"), F.sum("size_bytes").alias("bytes")).collect()
    return {
        "documents": sum(r["n"] for r in rows),
        "bytes": int(sum(r["bytes"] or 0 for r in rows)),
        "documents_by_lang": {r["lang"]: r["n"] for r in sorted(rows, key=lambda r: r["lang"])},
    }


def field_sums(df: "DataFrame", column: str, keys: list[str]) -> tuple[dict[str, int], int]:
    """Sums of the integer fields ``keys`` of struct ``column``, and how many rows have any of them > 0."""
    from pyspark.sql import functions as F

    col = lambda k: F.coalesce(F.col(f"{column}.{k}"), F.lit(0))  # noqa: E731
    any_set = sum((col(k) for k in keys), F.lit(0)) > 0
    row = df.agg(*[F.sum(col(k)).alias(k) for k in keys], F.sum(any_set.cast("long")).alias("_with")).collect()[0]
    return {k: int(row[k] or 0) for k in keys}, int(row["_with"] or 0)
