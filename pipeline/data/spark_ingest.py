"""`ownllm data ingest` on Spark: directory sources are read and checked file by file on the executors.

The checks are :func:`pipeline.data.ingest.check_candidate`, as on the local engine; table sources (parquet,
JSONL, Hugging Face) go through :func:`pipeline.data.ingest.ingest_source` on the driver. data/raw, the
rejected records and the manifest come out as the local engine writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa

from pipeline.config import Params
from pipeline.data import ingest
from pipeline.data.records import DOC_SCHEMA, REJECT_SCHEMA, to_table
from pipeline.data.spark_io import (REJECTED_FLAG, as_union, docs_summary, rejected_summary, spark_schema,
                                    union_schema, write_docs_df, write_rejected_df)
from pipeline.tracking import write_json

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

FILE_HASH = "_file_hash"


def _ingest_files(sources: dict, cfg) -> tuple:
    """``(body, schema)``: a mapInArrow body that reads each listed file on the executor and runs
    ingest.check_candidate on it, and its output schema (documents and rejects, plus the file hash)."""
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
                    yield from as_union(t, schema, flag).to_batches()
    return run, schema


def list_dir_source(src, cfg) -> list[tuple[str, str, int]]:
    """``(source, path, size)`` of every file a dir source yields, without reading the files.

    ingest.iter_dir decides what is listed (globs, excludes, symlinks); with a one-byte read limit it
    yields paths and sizes and reads nothing but empty and one-byte files.
    """
    list_only = cfg.model_copy(update={"max_file_bytes": 1})
    return [(src.name, c.path, c.size) for c in ingest.iter_dir(src, list_only)]


def run_ingest_spark(params: Params, spark: "SparkSession") -> dict:
    """ingest.run_ingest on Spark: the same data/raw, rejected records, manifest and summary."""
    cfg = params.data.ingest
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
