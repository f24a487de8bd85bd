"""The Spark engine: the same steps as the local engine, run by PySpark on a cluster (or ``local[2]``).

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


def _as_union(table: pa.Table, schema: pa.Schema, rejected: bool) -> pa.Table:
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
        for part in (_as_union(res.kept, schema, False), _as_union(res.rejected, schema, True)):
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


# --------------------------------------------------------------------------------------------- stages
def docs_summary(df: "DataFrame") -> dict:
    """documents, bytes and documents per language of a (persisted) document DataFrame."""
    from pyspark.sql import functions as F

    rows = df.groupBy("lang").agg(F.count("*").alias("n"), F.sum("size_bytes").alias("bytes")).collect()
    return {
        "documents": sum(r["n"] for r in rows),
        "bytes": int(sum(r["bytes"] or 0 for r in rows)),
        "documents_by_lang": {r["lang"]: r["n"] for r in sorted(rows, key=lambda r: r["lang"])},
    }


def pii_summary(kept: "DataFrame") -> dict:
    from pyspark.sql import functions as F

    from pipeline.data.steps.pii import PLACEHOLDERS

    col = lambda k: F.coalesce(F.col(f"pii_redactions.{k}"), F.lit(0))  # noqa: E731
    any_pii = sum((col(k) for k in PLACEHOLDERS), F.lit(0)) > 0
    row = kept.agg(*[F.sum(col(k)).alias(k) for k in PLACEHOLDERS],
                   F.sum(any_pii.cast("long")).alias("_with")).collect()[0]
    return {"pii_redactions": {k: int(row[k] or 0) for k in PLACEHOLDERS}, "documents_with_pii": int(row["_with"] or 0)}


def run_clean_spark(params: Params, spark: "SparkSession | None" = None) -> dict:
    """`ownllm data clean` on Spark: clean.clean_steps over mapInArrow; the same summary as clean.run_clean."""
    from pipeline.data.clean import STAGE, clean_steps
    from pipeline.data.records import CLEAN_SCHEMA

    cfg = params.data.clean
    spark = spark or spark_session(params)
    raw = read_docs_df(spark, params.data.ingest.out)
    kept, rejected = map_steps(raw, clean_steps(params), CLEAN_SCHEMA, STAGE, batch_rows=cfg.batch_rows)
    write_docs_df(kept, cfg.out, CLEAN_SCHEMA, params.data.ingest.row_group_rows, params.spark.max_rows_per_file)
    _, rejected_keys = write_rejected_df(rejected, cfg.rejected)
    summary = {"documents_in": raw.count(), **docs_summary(kept), **rejected_summary(rejected_keys),
               **pii_summary(kept)}
    spark.catalog.clearCache()
    return summary


# ---------------------------------------------------------------------------------------------- ingest
FILE_HASH = "_file_hash"


def _ingest_files(sources: dict, cfg) -> tuple:
    """``(body, schema)``: a mapInArrow body that reads each listed file on the executor and runs
    ingest.check_candidate on it, and its output schema (documents and rejects, plus the file hash)."""
    from pipeline.data import ingest

    schema = union_schema(pa.schema(list(ingest.DOC_SCHEMA) + [pa.field(FILE_HASH, pa.string())]))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import hashlib

        for b in batches:
            kept, rejected = [], []
            for name, rel, size in zip(*(b.column(c).to_pylist() for c in ("source", "path", "size"))):
                src = sources[name]
                data = (Path(src.resolved_path()) / rel).read_bytes() if size <= cfg.max_file_bytes else None
                # As ingest.ingest_source records it, for the manifest.
                file_hash = hashlib.sha256(data).hexdigest()[:16] if data is not None else f"size:{size}"
                doc, rej = ingest.check_candidate(src, ingest.Candidate(rel, data, size, src.lang), cfg)
                (kept if doc is not None else rejected).append({**(doc or rej), FILE_HASH: file_hash})
            for rows, flag in ((kept, False), (rejected, True)):
                if rows:
                    t = pa.Table.from_pylist(rows, schema=schema.remove(schema.get_field_index(REJECTED_FLAG)))
                    yield from _as_union(t, schema, flag).to_batches()
    return run, schema


def list_dir_source(src, cfg) -> list[tuple[str, str, int]]:
    """``(source, path, size)`` of every file a dir source yields, without reading the files.

    ingest.iter_dir decides what is listed (globs, excludes, symlinks); with a one-byte read limit it
    yields paths and sizes and reads nothing but empty and one-byte files.
    """
    from pipeline.data import ingest

    list_only = cfg.model_copy(update={"max_file_bytes": 1})
    return [(src.name, c.path, c.size) for c in ingest.iter_dir(src, list_only)]


def run_ingest_spark(params: Params, spark: "SparkSession | None" = None) -> dict:
    """`ownllm data ingest` on Spark: directory sources are read and checked file by file on the executors.

    Table sources (parquet, JSONL, Hugging Face) go through ingest.ingest_source on the driver, as they
    do locally. The checks are ingest.check_candidate in both cases; data/raw, the rejected records and
    the manifest come out as run_ingest writes them.
    """
    from pipeline.data import ingest
    from pipeline.data.records import DOC_SCHEMA, to_table
    from pipeline.tracking import write_json

    cfg = params.data.ingest
    spark = spark or spark_session(params)
    sources = {s.name: s for s in params.data.sources}
    listed: list[tuple[str, str, int]] = []
    driver_results: dict[str, ingest.SourceResult] = {}
    for src in params.data.sources:
        if src.kind == "dir" and Path(src.resolved_path()).is_dir():
            listed += list_dir_source(src, cfg)
        else:  # a missing dir source is skipped or an error exactly as locally
            driver_results[src.name] = ingest.ingest_source(src, cfg)
    body, schema = _ingest_files(sources, cfg)
    n_slices = max(1, min(len(listed), spark.sparkContext.defaultParallelism * 4))
    files = spark.createDataFrame(listed or [("", "", 0)], "source string, path string, size long")
    files = files.where("source != ''").repartition(n_slices)
    mixed = files.mapInArrow(body, spark_schema(schema)).persist()
    driver_docs = to_table([d for r in driver_results.values() for d in r.docs], DOC_SCHEMA)
    driver_rej = to_table([d for r in driver_results.values() for d in r.rejected], REJECT_SCHEMA)
    kept = mixed.where(f"NOT {REJECTED_FLAG}").select(*DOC_SCHEMA.names)
    rejected = mixed.where(REJECTED_FLAG).select(*REJECT_SCHEMA.names)
    if driver_docs.num_rows:
        kept = kept.unionByName(spark.createDataFrame(driver_docs))
    if driver_rej.num_rows:
        rejected = rejected.unionByName(spark.createDataFrame(driver_rej.cast(REJECT_SCHEMA)))
    write_docs_df(kept, cfg.out, DOC_SCHEMA, cfg.row_group_rows, params.spark.max_rows_per_file)
    _, rejected_keys = write_rejected_df(rejected, cfg.rejected)

    per_file = mixed.select("source", "path", FILE_HASH, REJECTED_FLAG).collect()
    manifest = []
    for src in params.data.sources:
        res = driver_results.get(src.name)
        if res is None:
            rows = [r for r in per_file if r["source"] == src.name]
            res = ingest.SourceResult(docs=[r for r in rows if not r[REJECTED_FLAG]],
                                      rejected=[r for r in rows if r[REJECTED_FLAG]],
                                      file_hashes={r["path"]: r[FILE_HASH] for r in rows})
        manifest.append(ingest.manifest_entry(src, res))
    write_json(Path(cfg.out) / "manifest.json", {"sources": manifest})
    summary = docs_summary(kept)
    spark.catalog.clearCache()
    return {**summary, "documents_by_source": {m["name"]: m["documents"] for m in manifest},
            **rejected_summary(rejected_keys)}
