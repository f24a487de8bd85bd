"""The evaluation gate: the tuned model against its parent, with a statistical rule that can fail.

Both models are evaluated the same way into ``reports/eval/<name>/`` (``rlhf-parent`` and ``rlhf-tuned``),
on the gate's held-out files only (``rlhf.heldout.gate_docs``: never simulated, snapshot or tuned on):

- the **held-out replay** (``rlhf.heldout``): every cursor scored for both models, so the comparison is
  paired (``pipeline.eval.paired``): exact McNemar on acceptance per cursor; a file-clustered bootstrap
  95% CI and permutation p-value on accepted characters per cursor and on **utility per cursor**
  (accepted characters minus ``reject_cost_chars`` per suggestion shown and not accepted);
- HumanEval pass@1 (sandboxed) and FIM / next-line exact match as **non-regression** checks, each with a
  tolerance of ``regression_z`` standard errors of the parent's rate on its number of cases
  (``pipeline.eval.compare.sampling_tolerances``);
- stdlib-idiom plausibility, shown, not gated.

The rule (``rlhf.gate``): **pass** when the utility difference's CI lower bound is above ``-margin``
(non-inferiority) and no non-regression check regressed; **significant** when, in addition, the utility
gain's CI lies above 0 and its p-value is below ``alpha`` — only then is the version promoted to
``promote_to`` (otherwise it is registered for staff only).

The result is written whatever it is (``reports/rlhf_gate.json``): a failed gate is a result, and the
loop report shows it. Only ``ownllm rlhf register`` turns it into an exit status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import RLHFParams
from pipeline.tracking import write_json

PARENT_NAME = "rlhf-parent"
TUNED_NAME = "rlhf-tuned"
DEPLOYED_NAME = "rlhf-deployed"  # the tuned model + its suggestion filter
PARENT_DEPLOYED_SUBDIR = "parent"  # rlhf-deployed/parent/: the parent + its own filter, when it has one
STAGE = "rlhf_gate"
DECIDING_METRIC = "heldout.utility_per_cursor"
# Shown in the table and loop report even when not gated.
INFO_METRICS = ("humaneval.pass@1", "fim.infill_exact", "fim.next_line_exact", "idioms.plausible_rate",
                "heldout.shown_rate", "heldout.acceptance", "heldout.accepted_chars_per_cursor",
                "heldout.completed_share", DECIDING_METRIC)


@dataclass
class GateResult:
    passed: bool
    rows: list[dict]  # one per metric: metric, parent, tuned, delta, tolerance, gated, ok
    parent: dict
    tuned: dict
    paired: dict = field(default_factory=dict)  # the held-out replay's paired tests
    significant: bool = False
    promote_to: str | None = None  # the rollout state register gives the version
    reasons: list[str] = field(default_factory=list)  # why it failed / why it is not significant

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "significant": self.significant, "promote_to": self.promote_to,
                "reasons": self.reasons, "paired": self.paired, "metrics": self.rows, "parent": self.parent,
                "tuned": self.tuned}

    @classmethod
    def from_json(cls, d: dict) -> "GateResult":
        return cls(d["passed"], d["metrics"], d.get("parent", {}), d.get("tuned", {}), d.get("paired", {}),
                   d.get("significant", False), d.get("promote_to"), d.get("reasons", []))

    def table(self) -> str:
        lines = [f"{'metric':<36} {'parent':>8} {'tuned':>8} {'delta':>8} {'tol':>6}  verdict"]
        for r in self.rows:
            verdict = ("ok" if r["ok"] else "REGRESSED") if r["gated"] else "(not gated)"
            tol = f"{r['tolerance']:.3f}" if r["tolerance"] is not None else "-"
            lines.append(f"{r['metric']:<36} {_fmt(r['parent'])} {_fmt(r['tuned'])} {_fmt(r['delta'])} {tol:>6}  {verdict}")
        for name, t in self.paired.get("tests", {}).items():
            lo, hi = t["ci95"]
            lines.append(f"paired {name:<29} diff {t['diff']:+.3f}  95% CI [{lo:+.3f}, {hi:+.3f}]  p={t['p_value']:.4f}"
                         f"  ({t['n']} cursors, {t['clusters']} files)")
        if self.paired.get("deployed", {}).get("against") == "parent + its filter":
            lines.append("deployed (model + filter) against the parent + its own filter (what users had):")
        for name, t in self.paired.get("deployed", {}).get("tests", {}).items():
            lo, hi = t["ci95"]
            lines.append(f"deployed (model + filter) {name:<14} diff {t['diff']:+.3f}  95% CI [{lo:+.3f}, {hi:+.3f}]  "
                         f"p={t['p_value']:.4f}")
        if "mcnemar" in self.paired:
            m = self.paired["mcnemar"]
            lines.append(f"paired acceptance (exact McNemar): only parent {m['only_parent']}, only tuned "
                         f"{m['only_tuned']}, p={m['p_value']:.4f}")
        lines.append(f"gate: {'PASSED' if self.passed else 'FAILED'}"
                     + (f", significant: promote to {self.promote_to}" if self.significant else "")
                     + (f" ({'; '.join(self.reasons)})" if self.reasons else ""))
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8}"


# What the ``evaluate`` stage writes that does not depend on the gate's files: HumanEval and the stdlib idioms.
BASE_REUSABLE = {"humaneval": ("humaneval.json", "humaneval_results.jsonl", "samples.jsonl"),
                 "idioms": ("idioms.json", "idioms_results.jsonl")}


def evaluate(params: RLHFParams, name: str, model_dir: str | Path, docs: list[dict] | None = None, show=None) -> Path:
    """Every gate metric of one model into ``reports/eval/<name>/``, on the gate's held-out files only
    (HumanEval and idioms are copied from the ``evaluate`` stage when it scored these very weights)."""
    from pipeline.eval.fim import run_fim
    from pipeline.eval.idioms import run_idioms
    from rlhf.heldout import gate_docs, replay

    docs = gate_docs(params) if docs is None else docs
    out = Path(params.eval.out) / name
    reused = reuse_base_evaluation(params, name, model_dir)
    if not params.rlhf.gate.skip_humaneval and "humaneval" not in reused:
        from pipeline.eval.humaneval import run_humaneval

        run_humaneval(params, name, str(model_dir))
    run_fim(params, name, str(model_dir), docs=docs)
    if "idioms" not in reused:
        run_idioms(params, name, str(model_dir))
    replay(str(model_dir), params, docs, out_dir=out, show=show)
    return out


def paired_tests(parent_rows: list[dict], tuned_rows: list[dict], params: RLHFParams) -> dict:
    """The held-out replay, cursor by cursor: McNemar on acceptance, clustered CIs on the numeric metrics."""
    from pipeline.eval.paired import clustered_mean_difference, mcnemar_exact

    gate = params.rlhf.gate
    p = {r["key"]: r for r in parent_rows}
    t = {r["key"]: r for r in tuned_rows}
    if p.keys() != t.keys():
        raise ValueError(f"the two replays scored different cursors ({len(p)} vs {len(t)}): rerun the gate")
    keys = sorted(p)
    files = [p[k]["file"] for k in keys]
    tests = {}
    for metric in ("utility", "accepted_chars", "accepted", "shown"):
        res = clustered_mean_difference(metric, [float(p[k][metric]) for k in keys], [float(t[k][metric]) for k in keys],
                                        files, seed=gate.seed, n_resamples=gate.resamples)
        tests[metric] = res.to_json()
    mcn = mcnemar_exact([p[k]["accepted"] for k in keys], [t[k]["accepted"] for k in keys])
    return {"tests": tests, "mcnemar": mcn, "cursors": len(keys), "files": len(set(files)),
            "reject_cost_chars": gate.reject_cost_chars, "margin": gate.margin, "alpha": gate.alpha}


def decide(paired: dict, regressions: list[str], params: RLHFParams) -> tuple[bool, bool, list[str]]:
    """(passed, significant, reasons) from the paired utility test of what users would get and the
    non-regression checks.

    What users get is the model + its suggestion filter (``paired["deployed"]``) when the gateway applies the
    filter (``serve.suggestion_filter``), else the model alone; the other comparison is reported beside it."""
    gate = params.rlhf.gate
    u = deciding(paired, params)["tests"]["utility"]
    lo, hi = u["ci95"]
    reasons = []
    if not lo > -gate.margin:
        reasons.append(f"utility per cursor may be worse by more than the margin: 95% CI lower bound {lo:+.3f} "
                       f"<= -{gate.margin}")
    reasons += [f"{m} regressed beyond its sampling error" for m in regressions]
    passed = not reasons
    significant = passed and lo > 0 and u["p_value"] < gate.alpha
    if passed and not significant:
        reasons.append(f"utility gain not significant (diff {u['diff']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], "
                       f"p={u['p_value']:.3g})")
    return passed, significant, reasons


def deciding(paired: dict, params: RLHFParams) -> dict:
    """The paired comparison that decides: model + filter when the gateway applies the filter, else the model."""
    if params.serve.suggestion_filter and "deployed" in paired:
        return paired["deployed"]
    return paired


def compare(params: RLHFParams, parent_dir: Path, tuned_dir: Path, deployed_dir: Path | None = None,
            parent_deployed_dir: Path | None = None) -> GateResult:
    """Non-regression checks on the eval reports, the paired replay tests, and the rule. ``parent_deployed_dir``:
    the parent's replay scored with the filter it serves with (a parent that is itself a tuned, filtered version):
    the deployed version is then compared with what users had, not with the parent model alone."""
    from pipeline.eval.compare import compare_reports, sampling_tolerances
    from rlhf.heldout import read_rows

    tolerances = sampling_tolerances(parent_dir, params.rlhf.gate.regression_z)
    if params.rlhf.gate.skip_humaneval:
        tolerances.pop("humaneval.pass@1", None)
    cmp = compare_reports(parent_dir, tuned_dir, tolerances, params.eval.lower_is_better)
    paired = paired_tests(read_rows(parent_dir), read_rows(tuned_dir), params)
    if deployed_dir is not None:  # model + suggestion filter: what users would get
        before = parent_deployed_dir if parent_deployed_dir is not None else parent_dir
        paired["deployed"] = paired_tests(read_rows(before), read_rows(deployed_dir), params)
        paired["deployed"]["against"] = "parent + its filter" if parent_deployed_dir is not None else "parent model"
    # Gated metrics first, then the headline metrics shown for information.
    shown = [r for r in cmp.rows if r.tolerance is not None or r.metric in INFO_METRICS]
    rows = [{"metric": r.metric, "parent": r.base, "tuned": r.candidate, "delta": r.delta, "tolerance": r.tolerance,
             "gated": r.tolerance is not None, "ok": r.status not in ("regressed", "missing"), "status": r.status}
            for r in sorted(shown, key=lambda r: (r.tolerance is None, r.metric))]
    u = deciding(paired, params)["tests"]["utility"]
    paired["decided_on"] = "deployed" if deciding(paired, params) is not paired else "model"
    rows.insert(0, {"metric": DECIDING_METRIC, "parent": u["parent"], "tuned": u["tuned"], "delta": u["diff"],
                    "tolerance": params.rlhf.gate.margin, "gated": True, "ok": u["ci95"][0] > -params.rlhf.gate.margin,
                    "status": "paired: CI lower bound vs -margin"})
    rows = [r for i, r in enumerate(rows) if i == 0 or r["metric"] != DECIDING_METRIC]
    passed, significant, reasons = decide(paired, [r.metric for r in cmp.regressions], params)
    return GateResult(passed, rows, {}, {}, paired, significant,
                      params.rlhf.gate.promote_to if significant else ("staff" if passed else None), reasons)


def run_gate(params: RLHFParams, parent: dict, tuned_dir: str | Path, docs: list[dict] | None = None,
             filter_docs: list[dict] | None = None, parent_eval: dict | None = None) -> GateResult:
    """Evaluate parent and tuned model on the held-out files (and, with ``rlhf.filter.enabled``, the deployed
    version: the tuned model + its suggestion filter fitted on ``filter_docs``, default the feedback files),
    compare, write ``reports/rlhf_gate.json``."""
    from rlhf.heldout import gate_docs, rescore
    from rlhf.tune import weights_hash

    docs = gate_docs(params) if docs is None else docs
    parent_reports = (reuse_evaluation(params, parent, parent_eval) if parent_eval else None) \
        or evaluate(params, PARENT_NAME, parent["model_dir"], docs)
    tuned_reports = evaluate(params, TUNED_NAME, tuned_dir, docs)
    deployed = None
    if params.rlhf.filter.enabled:
        from pipeline.eval.fim import validation_docs
        from rlhf.filter import train_filter

        if filter_docs is None:
            filter_docs = validation_docs(params, part="feedback", gate_frac=params.rlhf.gate.heldout_frac)
        filt = train_filter(tuned_dir, params, filter_docs)
        deployed = Path(params.eval.out) / DEPLOYED_NAME
        write_json(deployed / "filter.json", filt.to_json())
        rescore(tuned_reports, params, docs, out_dir=deployed, show=filt.show)  # the tuned replay + the filter
    parent_deployed = None
    if deployed is not None and parent.get("filter"):  # users had the parent with its filter: compare with that
        from feedback.suggestion_filter import SuggestionFilter

        pf = SuggestionFilter.from_json(parent["filter"], f"the parent {parent.get('version')}'s suggestion filter")
        pf.check_model(parent["model_dir"], "parent model")
        parent_deployed = deployed / PARENT_DEPLOYED_SUBDIR
        rescore(parent_reports, params, docs, out_dir=parent_deployed, show=pf.show)
    result = compare(params, parent_reports, tuned_reports, deployed, parent_deployed)
    result.parent = {**parent, "weights_sha256": weights_hash(parent["model_dir"])}
    result.tuned = {"model_dir": str(tuned_dir), "weights_sha256": weights_hash(tuned_dir)}
    write_json(gate_path(params), result.to_json())
    return result


def reuse_evaluation(params: RLHFParams, parent: dict, parent_eval: dict) -> Path | None:
    """The parent's evaluation from an earlier gate, copied to ``rlhf-parent``, when it was of the same weights.

    A later loop round's parent was evaluated by the round before (as its tuned model, or as its parent) with
    the same params on the same held-out files, and every gate metric is deterministic (greedy replay, seeded
    sampling), so evaluating it again gives the same files; ``parent_eval`` is ``{"dir", "weights_sha256"}``.
    Anything else (another model, a missing folder) → None: evaluate."""
    import shutil

    from pipeline.tracking import say
    from rlhf.tune import weights_hash

    src = Path(parent_eval["dir"])
    if not (src / "heldout.json").is_file() or weights_hash(parent["model_dir"]) != parent_eval["weights_sha256"]:
        return None
    out = Path(params.eval.out) / PARENT_NAME
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    say(f"[rlhf gate] parent {parent.get('version') or parent['model_dir']}: the evaluation in {src} is of the same "
        f"weights, held-out files and params; reused")
    return out


def reuse_base_evaluation(params: RLHFParams, name: str, model_dir: str | Path) -> set[str]:
    """Copy HumanEval and idioms from the ``evaluate`` stage (``eval.out/eval.name``) into ``eval.out/<name>``
    when ``model_dir`` holds the weights that stage scored (the reports' ``model_sha256``): round 1's parent is the
    base model, and both evaluations are deterministic (greedy, the same ``eval`` params and numerics), so running
    them again gives the same files (checked byte for byte on the embedded default) — ~30 s of the 15-minute
    budget. The FIM metrics are not reused: the gate scores them on its held-out files only. Returns what was
    copied (nothing when the weights differ or a file is missing)."""
    import shutil

    from feedback.lineage import eval_results  # read a report, None when missing or unreadable
    from pipeline.tracking import say
    from rlhf.tune import weights_hash

    src = Path(params.eval.out) / params.eval.name
    if src == Path(params.eval.out) / name:
        return set()
    want = weights_hash(model_dir)
    out = Path(params.eval.out) / name
    reused = set()
    for what, files in BASE_REUSABLE.items():
        if what == "humaneval" and params.rlhf.gate.skip_humaneval:
            continue
        summary = eval_results(src / files[0])
        if summary and summary.get("model_sha256") == want and all((src / f).is_file() for f in files):
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(src / f, out / f)
            reused.add(what)
    if reused:
        say(f"[rlhf gate] {name}: {', '.join(sorted(reused))} of these weights copied from {src} (the evaluate stage)")
    return reused


def gate_path(params: RLHFParams) -> Path:
    """The gate's result is the stage's DVC metrics file (deterministic values only)."""
    return Path(params.tracking.reports_dir) / f"{STAGE}.json"


def read_gate(params: RLHFParams) -> dict:
    import json

    p = gate_path(params)
    if not p.is_file():
        raise FileNotFoundError(f"no gate result at {p} (run `ownllm rlhf gate` first)")
    return json.loads(p.read_text(encoding="utf-8"))
