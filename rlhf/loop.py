"""The loop report: every gate metric of every refresh round, with its paired CI, ``reports/loop.json`` + plot.

``reports/loop.json``::

    {"rounds": [                      # one entry per refresh round, oldest first
       {"round": 1, "parent": "base", "gate_passed": true, "significant": false, "promote_to": "staff",
        "reasons": [...],              # why it failed / why the gain is not significant
        "heldout": {"parent": {...}, "tuned": {...}},   # heldout.json of each model (rates, chars, utility)
        "paired": {"utility": {"diff", "ci95", "p_value", "n", "clusters", ...}, "accepted_chars": {...},
                   "accepted": {...}, "shown": {...}, "mcnemar": {...}},
        "metrics": {"fim.infill_exact": {"base", "tuned", "delta", "tolerance", "ok"}, ...},
        "snapshot": {...counts}, "tuning": {...}}, ...],
     "gate_passed": <last round's verdict>}

Written from the gate result whatever its verdict: a tuned model that did not improve, or did worse, is
reported as such. The plot shows the utility and accepted-characters differences per round with their 95% CIs.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import RLHFParams
from pipeline.tracking import write_json


def round_report(params: RLHFParams, gate: dict, manifest: dict | None, tune: dict | None = None,
                 round_no: int = 1) -> dict:
    eval_out = Path(params.eval.out)
    heldout = {}
    for side, name in (("parent", "rlhf-parent"), ("tuned", "rlhf-tuned")):
        p = eval_out / name / "heldout.json"
        heldout[side] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    paired = dict(gate.get("paired", {}).get("tests", {}))
    if "mcnemar" in gate.get("paired", {}):
        paired["mcnemar"] = gate["paired"]["mcnemar"]
    return {
        "round": round_no,
        "parent": gate["parent"].get("version") or gate["parent"].get("model_dir"),
        "gate_passed": gate["passed"],
        "significant": gate.get("significant", False),
        "promote_to": gate.get("promote_to"),
        "reasons": gate.get("reasons", []),
        "heldout": heldout,
        "paired": paired,
        "metrics": {r["metric"]: {"base": r["parent"], "tuned": r["tuned"], "delta": r["delta"],
                                  "tolerance": r["tolerance"], "ok": r["ok"],
                                  **_paired_ci(paired, r["metric"])} for r in gate["metrics"]},
        "snapshot": (manifest or {}).get("counts"),
        "snapshot_hash": (manifest or {}).get("content_hash"),
        "tuning": tune or {},
    }


# The held-out summary metric each paired test is about (its per-cursor mean).
PAIRED_METRIC = {"heldout.utility_per_cursor": "utility", "heldout.accepted_chars_per_cursor": "accepted_chars",
                 "heldout.accepted_per_cursor": "accepted", "heldout.shown_rate": "shown"}


def _paired_ci(paired: dict, metric: str) -> dict:
    t = paired.get(PAIRED_METRIC.get(metric, ""))
    return {"ci95": t["ci95"], "p_value": t["p_value"]} if t else {}


def loop_report(params: RLHFParams, gate: dict, manifest: dict | None, tune: dict | None = None,
                round_no: int = 1, earlier: list[dict] | None = None) -> dict:
    """The whole ``reports/loop.json``: ``earlier`` rounds plus this gate's round."""
    rounds = [*(earlier or []), round_report(params, gate, manifest, tune, round_no)]
    return {"rounds": rounds, "gate_passed": rounds[-1]["gate_passed"], "margin": params.rlhf.gate.margin,
            "reject_cost_chars": params.rlhf.gate.reject_cost_chars}


def plot(report: dict, out: str | Path) -> Path:
    """Per round: the paired difference (tuned - parent) of utility and accepted characters per cursor,
    with 95% CIs; a dashed line at -margin (the non-inferiority bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rounds) + 3), 3.6), dpi=100)
    for k, (metric, color) in enumerate((("utility", "#2f6fb0"), ("accepted_chars", "#e07b39"))):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rounds):
            t = r["paired"].get(metric)
            if not t:
                continue
            xs.append(i + (k - 0.5) * 0.25)
            ys.append(t["diff"])
            # A BCa interval need not contain the point estimate: clip the bars at it.
            lo.append(max(0.0, t["diff"] - max(t["ci95"][0], -1e6)))
            hi.append(max(0.0, min(t["ci95"][1], 1e6) - t["diff"]))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4, color=color, label=f"{metric} per cursor")
    margin = report.get("margin")
    ax.axhline(0, color="#888", lw=0.8)
    if margin is not None:
        ax.axhline(-margin, color="#c33", lw=0.8, ls="--", label="-margin")
    ax.set_xticks(range(len(rounds)), [f"round {r['round']}\n{'pass' if r['gate_passed'] else 'FAIL'}"
                                       + (" *" if r["significant"] else "") for r in rounds], fontsize=8)
    ax.set_ylabel("tuned - parent (95% CI)", fontsize=8)
    ax.set_title("RLHF loop: paired held-out replay per round (* significant)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata so the PNG is byte-identical on rerun (matplotlib stamps its version otherwise).
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)
    return out


def write_loop(params: RLHFParams, gate: dict, manifest: dict | None, tune: dict | None = None,
               round_no: int = 1, earlier: list[dict] | None = None) -> dict:
    """Write ``reports/loop.json`` + ``loop.png`` with ``earlier`` rounds and this one."""
    report = loop_report(params, gate, manifest, tune, round_no, earlier)
    reports = Path(params.tracking.reports_dir)
    write_json(reports / "loop.json", report)
    plot(report, reports / "loop.png")
    return report
