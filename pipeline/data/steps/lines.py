"""Line-shape filters with the Codex / StarCoder thresholds (params: data.clean.max_avg_line_len, ...).

Files with very long lines or little alphanumeric text are mostly data, minified or generated, and do
not look like code a person writes. The statistics come from the record (computed once at ingest by
``records.line_stats``), so these filters cost nothing per byte.
"""

from __future__ import annotations

from pipeline.data.records import line_stats
from pipeline.data.steps.base import Filter


def _stat(doc: dict, name: str):
    value = doc.get(name)
    return value if value is not None else line_stats(doc["content"])[name]


class AvgLineLength(Filter):
    name = "avg_line_len"

    def __init__(self, max_avg: float):
        self.max_avg = max_avg

    def filter(self, doc: dict):
        v = _stat(doc, "avg_line_len")
        return True if v <= self.max_avg else (False, f"average line length {v:.1f} > {self.max_avg:g}")


class MaxLineLength(Filter):
    name = "max_line_len"

    def __init__(self, max_len: int):
        self.max_len = max_len

    def filter(self, doc: dict):
        v = _stat(doc, "max_line_len")
        return True if v <= self.max_len else (False, f"longest line {v} chars > {self.max_len}")


class AlnumFraction(Filter):
    name = "alnum_frac"

    def __init__(self, min_frac: float):
        self.min_frac = min_frac

    def filter(self, doc: dict):
        v = _stat(doc, "alnum_frac")
        return True if v >= self.min_frac else (False, f"alphanumeric fraction {v:.3f} < {self.min_frac:g}")
