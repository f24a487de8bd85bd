"""Where the data stages run: an engine object, local (default) or Spark, chosen by the CLI from ``engine:``.

As datatrove's executors do, an engine takes a stage's steps and maps them over record batches; the steps
(pipeline/data/steps/) and the stage modules (ingest, clean, dedup) know nothing of where they run, and
never import Spark code. Every engine offers the same methods:

- ``read_docs(dir)``, ``write_docs(docs, dir, schema, row_group_rows)``, ``write_rejected(rejected, dir)``:
  document datasets in the layout of pipeline/data/records.py (an Arrow table here, a DataFrame on Spark);
  ``write_rejected`` returns an Arrow table with (at least) the ``reason`` of every rejected record;
- ``map_steps(docs, steps, schema, stage, batch_rows)`` → ``(kept, rejected)``: the steps over every batch;
- ``count``, ``docs_summary``, ``field_sums``: the numbers a stage reports;
- ``ingest(params)``, ``clean(params)``, ``dedup(params)``: the stages. Clean is the steps mapped by the
  engine (:func:`pipeline.data.clean.run_clean`); ingest and dedup have a distributed form of their own on
  Spark (pipeline/data/spark_ingest.py, spark_dedup.py) built from the same functions as the local one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Params
from pipeline.data import clean, dedup, ingest
from pipeline.data.pool import default_workers, run_local
from pipeline.data.records import read_docs, write_docs, write_rejected
from pipeline.data.steps.base import Step


class LocalEngine:
    """This machine: batches on all cores (multiprocessing), tables in memory."""

    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = default_workers(workers)

    # -- documents ------------------------------------------------------------------------------------
    def read_docs(self, in_dir: str | Path) -> pa.Table:
        return read_docs(in_dir)

    def write_docs(self, docs: pa.Table, out_dir: str | Path, schema: pa.Schema, row_group_rows: int) -> None:
        write_docs(docs, out_dir, row_group_rows)

    def write_rejected(self, rejected: pa.Table, out_dir: str | Path) -> pa.Table:
        write_rejected(rejected, out_dir)
        return rejected

    def map_steps(self, docs: pa.Table, steps: Sequence[Step], out_schema: pa.Schema, stage: str,
                  batch_rows: int) -> tuple[pa.Table, pa.Table]:
        res = run_local(docs, steps, out_schema, stage, batch_rows=batch_rows, workers=self.workers, desc=stage)
        return res.kept, res.rejected

    # -- numbers --------------------------------------------------------------------------------------
    def count(self, docs: pa.Table) -> int:
        return docs.num_rows

    def docs_summary(self, docs: pa.Table) -> dict:
        by_lang = Counter(docs.column("lang").to_pylist()) if docs.num_rows else Counter()
        return {"documents": docs.num_rows,
                "bytes": int(pc.sum(docs.column("size_bytes")).as_py() or 0) if docs.num_rows else 0,
                "documents_by_lang": dict(sorted(by_lang.items()))}

    def field_sums(self, docs: pa.Table, column: str, keys: list[str]) -> tuple[dict[str, int], int]:
        """Sums of the integer fields ``keys`` of struct ``column``, and how many rows have any of them > 0."""
        if docs.num_rows == 0:
            return {k: 0 for k in keys}, 0
        col = docs.column(column)
        fields = [pc.fill_null(pc.struct_field(col, k), 0) for k in keys]
        total = fields[0]
        for f in fields[1:]:
            total = pc.add(total, f)
        return ({k: int(pc.sum(f).as_py() or 0) for k, f in zip(keys, fields)},
                int(pc.sum(pc.greater(total, 0)).as_py() or 0))

    # -- stages ---------------------------------------------------------------------------------------
    def ingest(self, params: Params) -> dict:
        return ingest.run_ingest(params)

    def clean(self, params: Params) -> dict:
        return clean.run_clean(params, self)

    def dedup(self, params: Params) -> dict:
        return dedup.run_dedup(params, self.workers)

    def close(self) -> None:
        pass


def make_engine(params: Params):
    """The engine ``params.engine`` names: :class:`LocalEngine`, or the Spark engine (imported only then)."""
    if params.engine == "spark":
        from pipeline.data.spark_engine import SparkEngine

        return SparkEngine(params)
    return LocalEngine(params.workers)
