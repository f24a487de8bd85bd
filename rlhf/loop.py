"""The loop report: base vs tuned on every gate metric, ``reports/loop.json`` and ``reports/loop.png``.

Written from the gate result whatever its verdict, with the held-out simulated acceptance rate's 95%
interval for both models: a tuned model that did not improve, or did worse, is reported as such.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.tracking import write_json


def loop_report(params: Params, gate: dict, manifest: dict | None, tune: dict | None = None) -> dict:
    eval_out = Path(params.eval.out)
    ci = {}
    for side, name in (("parent", "rlhf-parent"), ("tuned", "rlhf-tuned")):
        p = eval_out / name / "heldout.json"
        ci[side] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    return {
        "gate_passed": gate["passed"],
        "parent": gate["parent"].get("version") or gate["parent"].get("model_dir"),
        "metrics": {r["metric"]: {"base": r["parent"], "tuned": r["tuned"], "delta": r["delta"],
                                  "tolerance": r["tolerance"], "ok": r["ok"]} for r in gate["metrics"]},
        "heldout_acceptance": {side: v for side, v in ci.items()},
        "snapshot": (manifest or {}).get("counts"),
        "snapshot_hash": (manifest or {}).get("content_hash"),
        "tuning": tune or {},
    }


def plot(report: dict, out: str | Path) -> Path:
    """Grouped bars, base vs tuned per metric; the acceptance bars carry their 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m, v in report["metrics"].items() if v["base"] is not None and v["tuned"] is not None]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) + 2), 3.6), dpi=100)
    width = 0.38
    for k, (side, color) in enumerate((("base", "#8c8c8c"), ("tuned", "#2f6fb0"))):
        xs = [i + (k - 0.5) * width for i in range(len(metrics))]
        ys = [report["metrics"][m][side] for m in metrics]
        err = [[0] * len(metrics), [0] * len(metrics)]
        heldout = report["heldout_acceptance"].get("parent" if side == "base" else "tuned")
        if heldout and "heldout.acceptance" in metrics:
            i = metrics.index("heldout.acceptance")
            lo, hi = heldout["ci95"]
            err[0][i], err[1][i] = ys[i] - lo, hi - ys[i]
        ax.bar(xs, ys, width, label=side, color=color, yerr=err, capsize=4)
    ax.set_xticks(range(len(metrics)), metrics, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"RLHF loop: gate {'passed' if report['gate_passed'] else 'FAILED'}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata so the PNG is byte-identical on rerun (matplotlib stamps its version otherwise).
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)
    return out


def write_loop(params: Params, gate: dict, manifest: dict | None, tune: dict | None = None) -> dict:
    report = loop_report(params, gate, manifest, tune)
    reports = Path(params.tracking.reports_dir)
    write_json(reports / "loop.json", report)
    plot(report, reports / "loop.png")
    return report
