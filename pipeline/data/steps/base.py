"""The step interface shared by the local and Spark engines (datatrove style).

A step is a small named object with one method to write. It sees documents (dicts in the document
record schema) and knows nothing of where it runs: the local multiprocessing engine and the Spark
engine (``mapInArrow``) both call :func:`apply_steps` on Arrow record batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from pipeline.data.records import REJECT_SCHEMA, reject


class Step:
    name: str = "step"

    def process(self, doc: dict) -> dict | tuple[None, str, str]:
        """Return the (possibly transformed) document, or ``(None, reason, detail)`` to drop it."""
        raise NotImplementedError


class Filter(Step):
    def filter(self, doc: dict) -> bool | tuple[bool, str]:
        """True keeps the document; ``(False, detail)`` drops it with this step's name as reason."""
        raise NotImplementedError

    def process(self, doc: dict):
        verdict = self.filter(doc)
        if verdict is True:
            return doc
        detail = verdict[1] if isinstance(verdict, tuple) else ""
        return (None, self.name, detail)


class Transform(Step):
    def transform(self, doc: dict) -> dict:
        raise NotImplementedError

    def process(self, doc: dict):
        return self.transform(doc)


@dataclass
class BatchResult:
    kept: pa.Table
    rejected: pa.Table


def apply_steps(batch: pa.RecordBatch | pa.Table, steps: Sequence[Step], out_schema: pa.Schema, stage: str) -> BatchResult:
    """Run the steps in order over every document of a batch; the first step that drops a document wins."""
    kept: list[dict] = []
    rejected: list[dict] = []
    for doc in batch.to_pylist():
        for step in steps:
            out = step.process(doc)
            if isinstance(out, tuple):
                _, reason, detail = out
                rejected.append(reject(doc, stage, reason, detail))
                break
            doc = out
        else:
            kept.append(doc)
    kept_t = pa.Table.from_pylist(kept, schema=out_schema) if kept else out_schema.empty_table()
    rej_t = pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA) if rejected else REJECT_SCHEMA.empty_table()
    return BatchResult(kept_t, rej_t)
