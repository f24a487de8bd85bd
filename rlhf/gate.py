"""The evaluation gate: the tuned model against its parent, with the evaluation stage's own compare.

Both models are evaluated the same way into ``reports/eval/<name>/`` (``rlhf-parent`` and ``rlhf-tuned``):
HumanEval pass@k in the sandbox (``pipeline.eval.humaneval``), single-line FIM and next-line accuracy
(``pipeline.eval.fim``), stdlib-idiom plausibility (``pipeline.eval.idioms``, shown, not gated by default)
and the held-out simulated acceptance rate (``rlhf.heldout``, written as
``heldout.json`` so the compare sees it as ``heldout.acceptance``). ``pipeline.eval.compare`` then applies
``eval.tolerances`` plus ``rlhf.gate.acceptance_tolerance``: the tuned model passes when no gated metric
is worse than its parent's by more than its tolerance.

The result is written whatever it is: a failed gate is a result, and the
loop report shows it. Only ``ownllm rlhf register`` turns it into an exit status.
The result is ``reports/rlhf_gate.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.tracking import write_json

PARENT_NAME = "rlhf-parent"
TUNED_NAME = "rlhf-tuned"
STAGE = "rlhf_gate"
ACCEPTANCE_METRIC = "heldout.acceptance"
# Shown in the table and loop report even when not gated.
INFO_METRICS = ("humaneval.pass@1", "fim.infill_exact", "fim.next_line_exact", "idioms.plausible_rate", ACCEPTANCE_METRIC)


@dataclass
class GateResult:
    passed: bool
    rows: list[dict]  # one per metric: metric, parent, tuned, delta, tolerance, gated, ok
    parent: dict
    tuned: dict

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": self.rows, "parent": self.parent, "tuned": self.tuned}

    def table(self) -> str:
        lines = [f"{'metric':<26} {'parent':>8} {'tuned':>8} {'delta':>8} {'tol':>6}  verdict"]
        for r in self.rows:
            verdict = ("ok" if r["ok"] else "REGRESSED") if r["gated"] else "(not gated)"
            tol = f"{r['tolerance']:.3f}" if r["tolerance"] is not None else "-"
            lines.append(f"{r['metric']:<26} {_fmt(r['parent'])} {_fmt(r['tuned'])} {_fmt(r['delta'])} {tol:>6}  {verdict}")
        lines.append(f"gate: {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8}"


def gate_params(params: Params) -> Params:
    """params with the acceptance tolerance added to the evaluation's tolerances (one compare for all)."""
    tol = {**params.eval.tolerances, ACCEPTANCE_METRIC: params.rlhf.gate.acceptance_tolerance}
    return params.model_copy(update={"eval": params.eval.model_copy(update={"tolerances": tol})})


def evaluate(params: Params, name: str, model_dir: str | Path, heldout_docs: list[dict] | None = None) -> Path:
    """Every gate metric of one model into ``reports/eval/<name>/``; returns that directory."""
    from pipeline.eval.fim import heldout_docs as load_heldout
    from pipeline.eval.fim import run_fim
    from pipeline.eval.idioms import run_idioms
    from rlhf.heldout import replay

    docs = load_heldout(params) if heldout_docs is None else heldout_docs
    out = Path(params.eval.out) / name
    if not params.rlhf.gate.skip_humaneval:
        from pipeline.eval.humaneval import run_humaneval

        run_humaneval(params, name, str(model_dir))
    run_fim(params, name, str(model_dir), docs=docs)
    run_idioms(params, name, str(model_dir))
    rep = replay(str(model_dir), params, docs)
    write_json(out / "heldout.json", {"acceptance": rep["rate"], "accepted": rep["accepted"], "cursors": rep["cursors"],
                                      "ci95": rep["ci95"], "files": rep["files"]})
    return out


def compare(params: Params, parent_dir: Path, tuned_dir: Path) -> GateResult:
    """The evaluation stage's compare over the two report directories, as a gate result."""
    from pipeline.eval.compare import compare_reports

    cmp = compare_reports(parent_dir, tuned_dir, gate_params(params).eval.tolerances, params.eval.lower_is_better)
    # Gated metrics first (they decide), then the headline metrics shown for information.
    shown = [r for r in cmp.rows if r.tolerance is not None or r.metric in INFO_METRICS]
    rows = [{"metric": r.metric, "parent": r.base, "tuned": r.candidate, "delta": r.delta, "tolerance": r.tolerance,
             "gated": r.tolerance is not None, "ok": r.status not in ("regressed", "missing"), "status": r.status}
            for r in sorted(shown, key=lambda r: (r.tolerance is None, r.metric))]
    return GateResult(not cmp.regressed, rows, {}, {})


def run_gate(params: Params, parent: dict, tuned_dir: str | Path, heldout_docs: list[dict] | None = None) -> GateResult:
    """Evaluate parent and tuned model, compare, write ``reports/rlhf/gate.json``."""
    from rlhf.tune import weights_hash

    parent_reports = evaluate(params, PARENT_NAME, parent["model_dir"], heldout_docs)
    tuned_reports = evaluate(params, TUNED_NAME, tuned_dir, heldout_docs)
    result = compare(params, parent_reports, tuned_reports)
    result.parent = {**parent, "weights_sha256": weights_hash(parent["model_dir"])}
    result.tuned = {"model_dir": str(tuned_dir), "weights_sha256": weights_hash(tuned_dir)}
    write_json(gate_path(params), result.to_json())
    return result


def gate_path(params: Params) -> Path:
    """The gate's result is the stage's DVC metrics file (deterministic values only)."""
    return Path(params.tracking.reports_dir) / f"{STAGE}.json"


def read_gate(params: Params) -> dict:
    import json

    p = gate_path(params)
    if not p.is_file():
        raise FileNotFoundError(f"no gate result at {p} (run `ownllm rlhf gate` first)")
    return json.loads(p.read_text(encoding="utf-8"))
