"""The Spark engine: the same steps and stages as the local engine (pipeline/data/engine.py), run by PySpark
on a cluster or ``local[2]``, with byte-identical outputs (docs/SPARK.md).

Nothing here re-implements a transform: ``map_steps`` runs :func:`pipeline.data.steps.base.apply_steps` on
each Arrow batch through ``mapInArrow`` (pipeline/data/spark_io.py), as the local engine runs it on each
slice; ingest and dedup are distributed from the functions the local stages use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa

from pipeline.config import Params
from pipeline.data import clean, spark_io
from pipeline.data.spark_dedup import run_dedup_spark
from pipeline.data.spark_ingest import run_ingest_spark
from pipeline.data.steps.base import Step

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class SparkEngine:
    """PySpark: documents are DataFrames; the session is the one ``spark:`` in params describes (or ``session``)."""

    name = "spark"

    def __init__(self, params: Params, session: "SparkSession | None" = None):
        self.params = params
        self._session = session

    @property
    def session(self) -> "SparkSession":
        if self._session is None:  # started on first use (about 20 s), not when the engine is chosen
            self._session = spark_io.spark_session(self.params)
        return self._session

    # -- documents ------------------------------------------------------------------------------------
    def read_docs(self, in_dir: str | Path) -> "DataFrame":
        return spark_io.read_docs_df(self.session, in_dir)

    def write_docs(self, docs: "DataFrame", out_dir: str | Path, schema: pa.Schema, row_group_rows: int) -> None:
        spark_io.write_docs_df(docs, out_dir, schema, row_group_rows, self.params.spark.max_rows_per_file)

    def write_rejected(self, rejected: "DataFrame", out_dir: str | Path) -> pa.Table:
        return spark_io.write_rejected_df(rejected, out_dir)[1]

    def map_steps(self, docs: "DataFrame", steps: Sequence[Step], out_schema: pa.Schema, stage: str,
                  batch_rows: int) -> tuple["DataFrame", "DataFrame"]:
        return spark_io.map_steps(docs, steps, out_schema, stage, batch_rows=batch_rows)

    # -- numbers --------------------------------------------------------------------------------------
    def count(self, docs: "DataFrame") -> int:
        return docs.count()

    def docs_summary(self, docs: "DataFrame") -> dict:
        return spark_io.docs_summary(docs)

    def field_sums(self, docs: "DataFrame", column: str, keys: list[str]) -> tuple[dict[str, int], int]:
        return spark_io.field_sums(docs, column, keys)

    # -- stages ---------------------------------------------------------------------------------------
    def ingest(self, params: Params) -> dict:
        return run_ingest_spark(params, self.session)

    def clean(self, params: Params) -> dict:
        summary = clean.run_clean(params, self)
        self.session.catalog.clearCache()  # the persisted pass of map_steps is not the next stage's
        return summary

    def dedup(self, params: Params) -> dict:
        return run_dedup_spark(params, self.session)

    def close(self) -> None:
        pass  # the session outlives a stage: tests and `ownllm` runs in one process reuse it
