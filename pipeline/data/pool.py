"""Run steps over a table's batches on all cores with multiprocessing (the local engine's worker pool).

Batches are processed in parallel but results are gathered in input order and the outputs are sorted
canonically by the writers, so the result does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from functools import partial
from typing import Sequence

import pyarrow as pa
from tqdm import tqdm

from pipeline.data.records import REJECT_SCHEMA
from pipeline.data.steps.base import BatchResult, Step, apply_steps


def default_workers(requested: int | None = None) -> int:
    return max(1, requested or len(os.sched_getaffinity(0)))


def _run_batch(batch: pa.Table, steps: Sequence[Step], out_schema: pa.Schema, stage: str) -> BatchResult:
    return apply_steps(batch, steps, out_schema, stage)


def run_local(
    table: pa.Table,
    steps: Sequence[Step],
    out_schema: pa.Schema,
    stage: str,
    batch_rows: int = 128,
    workers: int | None = None,
    desc: str | None = None,
) -> BatchResult:
    batches = [table.slice(i, batch_rows) for i in range(0, table.num_rows, batch_rows)]
    fn = partial(_run_batch, steps=steps, out_schema=out_schema, stage=stage)
    n = min(default_workers(workers), max(1, len(batches)))
    bar = tqdm(total=table.num_rows, desc=desc or stage, unit="doc", mininterval=1.0, file=sys.stderr)
    results: list[BatchResult] = []
    if n == 1:
        for b in batches:
            results.append(fn(b))
            bar.update(b.num_rows)
    else:
        with mp.get_context("fork").Pool(n) as pool:
            for b, res in zip(batches, pool.imap(fn, batches)):
                results.append(res)
                bar.update(b.num_rows)
    bar.close()
    kept = pa.concat_tables([r.kept for r in results]) if results else out_schema.empty_table()
    rejected = pa.concat_tables([r.rejected for r in results]) if results else REJECT_SCHEMA.empty_table()
    return BatchResult(kept, rejected)
