"""`ownllm eval compare BASE CANDIDATE`: the regression gate between two models' eval reports.

Both sides are report directories (``reports/eval/<name>/``). Every numeric value of every ``*.json``
report becomes a metric named ``<report>.<key path>`` (``humaneval.pass@1``,
``fim.per_lang.python.infill_exact``). A metric with a tolerance in ``eval.tolerances`` (exact name or
fnmatch pattern; the most specific wins) is gated: the candidate may be at most that much worse, in
absolute terms, than the base. A gated metric the candidate lacks is a regression too. Everything
else is shown for information. :func:`compare_reports` is the Python API (the RLHF refresh calls it).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    metric: str
    base: float | None
    candidate: float | None
    tolerance: float | None  # None: not gated
    status: str  # ok | regressed | missing | improved | info | new | no-base

    @property
    def delta(self) -> float | None:
        if self.base is None or self.candidate is None:
            return None
        return self.candidate - self.base


@dataclass
class Comparison:
    base_dir: str
    candidate_dir: str
    rows: list[Row] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # report file -> why it was skipped

    @property
    def regressed(self) -> bool:
        return any(r.status in ("regressed", "missing") for r in self.rows)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("regressed", "missing")]

    def to_dict(self) -> dict:
        return {"base": self.base_dir, "candidate": self.candidate_dir, "regressed": self.regressed,
                "unreadable": self.unreadable,
                "rows": [{"metric": r.metric, "base": r.base, "candidate": r.candidate, "delta": r.delta,
                          "tolerance": r.tolerance, "status": r.status} for r in self.rows]}

    def table(self, gated_only: bool = False) -> str:
        rows = [r for r in self.rows if r.tolerance is not None] if gated_only else self.rows
        cells = [("metric", "base", "candidate", "delta", "tolerance", "status")]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for r in rows:
            cells.append((r.metric, fmt(r.base), fmt(r.candidate), "-" if r.delta is None else f"{r.delta:+.4f}",
                          "-" if r.tolerance is None else f"{r.tolerance:.4f}",
                          r.status.upper() if r.status in ("regressed", "missing") else r.status))
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for name, why in sorted(self.unreadable.items()):
            lines.append(f"unreadable report {name}: {why}")
        return "\n".join(lines)


def flatten_numbers(obj: Any, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_numbers(v, f"{prefix}.{k}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def load_metrics(report_dir: str | Path) -> tuple[dict[str, float], dict[str, str]]:
    """Numeric metrics of every ``*.json`` report in a directory; unreadable files are returned with the reason."""
    d = Path(report_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"report directory not found: {d} (run `ownllm eval humaneval/fim` for it first)")
    metrics, unreadable = {}, {}
    for f in sorted(d.glob("*.json")):
        try:
            metrics.update(flatten_numbers(json.loads(f.read_text(encoding="utf-8")), f.stem))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            unreadable[f"{d.name}/{f.name}"] = f"{type(exc).__name__}: {exc}"
    return metrics, unreadable


def tolerance_for(metric: str, tolerances: dict[str, float]) -> float | None:
    if metric in tolerances:
        return tolerances[metric]
    matches = [p for p in tolerances if fnmatch.fnmatchcase(metric, p)]
    return tolerances[max(matches, key=len)] if matches else None


def compare_reports(base_dir: str | Path, candidate_dir: str | Path, tolerances: dict[str, float],
                    lower_is_better: list[str] | tuple[str, ...] = ()) -> Comparison:
    base, base_bad = load_metrics(base_dir)
    cand, cand_bad = load_metrics(candidate_dir)
    cmp = Comparison(str(base_dir), str(candidate_dir), unreadable={**base_bad, **cand_bad})
    for metric in sorted(set(base) | set(cand)):
        tol = tolerance_for(metric, tolerances)
        b, c = base.get(metric), cand.get(metric)
        if b is None:
            status = "new" if tol is None else "no-base"
        elif c is None:
            status = "info" if tol is None else "missing"
        elif tol is None:
            status = "info"
        else:
            sign = -1.0 if any(fnmatch.fnmatchcase(metric, p) for p in lower_is_better) else 1.0
            worse_by = sign * (b - c)
            status = "regressed" if worse_by > tol + 1e-12 else ("improved" if worse_by < 0 else "ok")
        cmp.rows.append(Row(metric, b, c, tol, status))
    return cmp


# A rate metric -> the metric holding the number of cases it is measured on (for sampling tolerances).
RATE_CASES = {"humaneval.pass@1": "humaneval.problems", "fim.infill_exact": "fim.cases",
              "fim.next_line_exact": "fim.cases"}


def sampling_tolerances(base_dir: str | Path, z: float, rates: dict[str, str] | None = None) -> dict[str, float]:
    """Tolerances sized to each rate's sampling error on the base's own cases: ``z`` standard errors of
    the base's rate (``pipeline.eval.paired.sampling_tolerance``). A tolerance of 0 would fail a model for
    one unlucky problem; a fixed one ignores how few cases there are (164 HumanEval problems at 10%: ±4.6
    points). Rates whose report is absent get none (their compare row says so)."""
    from pipeline.eval.paired import sampling_tolerance

    base, _ = load_metrics(base_dir)
    out = {}
    for metric, cases in (RATE_CASES if rates is None else rates).items():
        if metric in base and base.get(cases):
            out[metric] = sampling_tolerance(base[metric], int(base[cases]), z)
    return out


def resolve_report_dir(arg: str, eval_out: str) -> Path:
    """A directory as given, or a report name under ``eval.out``."""
    p = Path(arg)
    return p if p.is_dir() or "/" in arg else Path(eval_out) / arg


def main(args) -> int:
    from pipeline.cli import UserError
    from pipeline.config import load_params
    from pipeline.tracking import say

    params = load_params(args.params)
    base = resolve_report_dir(args.base, params.eval.out)
    cand = resolve_report_dir(args.candidate, params.eval.out)
    try:
        cmp = compare_reports(base, cand, params.eval.tolerances, params.eval.lower_is_better)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    print(cmp.table())
    sys.stdout.flush()
    gated = sum(1 for r in cmp.rows if r.tolerance is not None)
    if cmp.regressed:
        names = ", ".join(f"{r.metric} ({r.status})" for r in cmp.regressions)
        say(f"[eval compare] REGRESSION: {cand} is worse than {base} beyond tolerance on {names}")
        return 1
    say(f"[eval compare] ok: {cand} vs {base}, {gated} gated metrics within tolerance")
    return 0
