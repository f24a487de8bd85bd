"""Several refresh rounds in `dvc repro`, and the loop report: ``reports/loop.json`` + plot.

The rounds (docs/RLHF.md "Several rounds"): round 1 is the ``simulate`` → ``snapshot`` → ``sft`` →
``preference`` → ``gate`` → ``register`` stages (what `ownllm rlhf refresh` runs from the live store). Each
later round is one DVC stage, ``refresh@round-N`` (``rlhf.loop.rounds``), writing one folder,
``<rlhf.loop.dir>/round-N/``, laid out like the classic outputs (:func:`round_params`):
``feedback/simulate.json`` + ``feedback/simulated/`` (this round's traffic), ``snapshot/``, ``sft/``, ``tuned/``,
``eval/rlhf-{parent,tuned,deployed}/``, ``rlhf_{snapshot,sft,dpo,gate,register}.json``. Round N:

1. the simulated users draw round N-1's cursors (``ownllm feedback simulate --round N-1``: disjoint from every
   other round's and from the gate's held-out files), served by the gateway as in production: the version
   serving everyone after round N-1 (:func:`serving_after`; restored if a rerun finds a later round's
   promotion in the store); the store accumulates the feedback of every round so far;
2. the snapshot of the whole store; its parent is the version round N-1 deployed: the version round N-1
   registered if its gate passed, else round N-1's own parent (:func:`deployed_after`);
3. SFT, preference tuning, gate and register exactly as in round 1 (the register stage's ``--on-fail record``);
   the gate reuses round N-1's evaluation of the parent (same weights, held-out files and params: the same
   files a new evaluation would write) instead of evaluating it again.

``reports/loop.json`` (stage ``loop``, :func:`write_loop`)::

    {"rounds": [                      # one entry per refresh round, oldest first
       {"round": 1, "parent": "base", "gate_passed": true, "significant": false, "promote_to": "staff",
        "registered": "ft-...",        # the version the round registered (null: gate failed)
        "deployed": "ft-...",          # what the next round tunes from
        "traffic": {"simulate_round": 0, "cursors": 191, "accepted": 3, "served_by": "base", ...},
        "reasons": [...],              # why it failed / why the gain is not significant
        "heldout": {"parent": {...}, "tuned": {...}, "deployed": {...}},  # heldout.json: rates, chars, utility
        "paired": {"utility": {"diff", "ci95", "p_value", "n", "clusters", ...}, "accepted_chars": {...},
                   "accepted": {...}, "shown": {...}, "mcnemar": {...}},   # tuned - parent, both models alone
        "versus": {                     # the same paired tests (tests + mcnemar), on the same held-out cursors:
           "deployed_vs_before": ...,   #   this round's model + filter - what users got after the round before
           "model_vs_base": ...,        #   this round's model alone - the base model
           "deployed_vs_base": ...},    #   this round's model + filter - the base model (which has no filter)
        "metrics": {"fim.infill_exact": {"base", "tuned", "delta", "tolerance", "ok"}, ...},
        "snapshot": {...counts}, "tuning": {...}}, ...],
     "gate_passed": <last round's verdict>}

Every round is reported whatever its verdict: a tuned model that did not improve, or did worse, is reported
as such. The plot shows the utility and accepted-characters differences per round with their 95% CIs.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from rlhf.config import RLHFParams
from pipeline.tracking import say, write_json


def round_report(params: RLHFParams, gate: dict, manifest: dict | None, tune: dict | None = None,
                 round_no: int = 1) -> dict:
    eval_out = Path(params.eval.out)
    heldout = {}
    for side, name in (("parent", "rlhf-parent"), ("tuned", "rlhf-tuned"), ("deployed", "rlhf-deployed")):
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


ROUND1_REPORT = "rlhf_register.json"  # round 1's last output: what round 2 continues from


def round_number(name: str) -> int:
    """``round-N`` → N (``N`` alone is accepted too, for the command line)."""
    m = re.fullmatch(r"(?:round-)?([0-9]+)", name.strip())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"round {name!r}: expected round-N with N >= 1 (round-2, round-3, ...)")
    return int(m.group(1))


def round_dir(params: RLHFParams, n: int) -> Path:
    return Path(params.rlhf.loop.dir) / f"round-{n}"


def round_params(params: RLHFParams, n: int) -> RLHFParams:
    """The parameters round ``n`` runs with: round 1's are ``params`` (the classic stages' paths); a later
    round writes everything under its own folder, laid out the same way (so every stage function works
    unchanged). The registry and the feedback store are shared, as in production."""
    if n == 1:
        return params
    d = round_dir(params, n)
    return params.model_copy(update={
        "rlhf": params.rlhf.model_copy(update={"snapshot_dir": str(d / "snapshot"), "sft_out": str(d / "sft"),
                                               "tuned_out": str(d / "tuned")}),
        "tracking": params.tracking.model_copy(update={"reports_dir": str(d)}),
        "eval": params.eval.model_copy(update={"out": str(d / "eval")}),
        "feedback": params.feedback.model_copy(update={"reports_dir": str(d / "feedback")}),
    })


def previous_output(params: RLHFParams, n: int) -> Path:
    """What round ``n`` (>= 2) continues from, as ``rlhf.loop.rounds`` must name it (DVC's dependency)."""
    return Path(params.tracking.reports_dir) / ROUND1_REPORT if n == 2 else round_dir(params, n - 1)


def later_rounds(params: RLHFParams) -> list[int]:
    """The configured rounds after the first, in order; they must be 2, 3, ... each after the one before."""
    rounds = sorted(round_number(k) for k in params.rlhf.loop.rounds)
    if rounds != list(range(2, len(rounds) + 2)):
        raise ValueError(f"rlhf.loop.rounds: {sorted(params.rlhf.loop.rounds)} must be round-2 ... round-K "
                         f"with none missing")
    for n in rounds:
        want = previous_output(params, n)
        got = params.rlhf.loop.rounds[f"round-{n}"]
        if Path(got) != want:
            raise ValueError(f"rlhf.loop.rounds.round-{n} is {got!r}; it must be {str(want)!r}, the output of "
                             f"round {n - 1} (DVC runs round {n} after it)")
    return rounds


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def deployed_after(params: RLHFParams, n: int) -> dict:
    """The version round ``n`` leaves deployed, ``{"version", "model_dir"}``: the one it registered if its gate
    passed (its weights: round n's tuned output, identical to the registry's copy, hash-checked by register),
    else the parent it tuned from."""
    from rlhf.tune import PARENT_FILE

    rp = round_params(params, n)
    reg = _read(Path(rp.tracking.reports_dir) / ROUND1_REPORT)
    parent = _read(Path(rp.rlhf.snapshot_dir) / PARENT_FILE)
    if reg is None or parent is None:
        raise FileNotFoundError(f"round {n} has not run: no {Path(rp.tracking.reports_dir) / ROUND1_REPORT} "
                                f"or {Path(rp.rlhf.snapshot_dir) / PARENT_FILE}")
    if reg.get("registered"):
        out = {"version": reg["version"], "model_dir": rp.rlhf.tuned_out}
        from rlhf.gate import DEPLOYED_NAME

        filt = _read(Path(rp.eval.out) / DEPLOYED_NAME / "filter.json") if rp.rlhf.filter.enabled else None
        return {**out, "filter": filt} if filt else out  # what users got: the model with the filter it registered
    return {k: parent[k] for k in ("version", "model_dir", "filter") if k in parent}


def deployed_evaluation(params: RLHFParams, n: int) -> dict | None:
    """Where round ``n``'s gate evaluated the model it left deployed, with the weights it evaluated: round n+1's
    gate reuses it for its parent (:func:`rlhf.gate.reuse_evaluation` checks the weights)."""
    from rlhf.gate import PARENT_NAME, TUNED_NAME

    rp = round_params(params, n)
    reg = _read(Path(rp.tracking.reports_dir) / ROUND1_REPORT) or {}
    gate = _read(Path(rp.tracking.reports_dir) / "rlhf_gate.json")
    if gate is None:
        return None
    side, name = ("tuned", TUNED_NAME) if reg.get("registered") else ("parent", PARENT_NAME)
    sha = gate.get(side, {}).get("weights_sha256")
    return {"dir": str(Path(rp.eval.out) / name), "weights_sha256": sha} if sha else None


def serving_after(params: RLHFParams, n: int) -> str | None:
    """The version serving everyone after round ``n``, as the rounds decided it: the one that served round 1's
    simulated users (round 1's simulate report), replaced by each round's version that ``register`` promoted to
    ``all`` (a significant gain). None when round 1's users were served by several versions (an A/B test)."""
    from feedback.simulate import STAGE as SIMULATE_STAGE

    served = list((_read(Path(params.tracking.reports_dir) / f"{SIMULATE_STAGE}.json") or {}).get("by_model") or {})
    version = served[0] if len(served) == 1 else None
    for k in range(1, n + 1):
        reg = _read(Path(round_params(params, k).tracking.reports_dir) / ROUND1_REPORT) or {}
        if reg.get("registered") and (reg.get("lineage") or {}).get("rollout") == "all":
            version = reg["version"]
    return version


def restore_serving(db_url: str, version: str) -> str | None:
    """Make ``version`` the one serving everyone again if the store says otherwise (a rerun of round N finds
    what later rounds promoted); returns the version it replaced, if any."""
    from feedback.db import session_factory
    from feedback.store import current_all, promote

    with session_factory(db_url).begin() as s:
        now = current_all(s)
        if now is not None and now.name == version:
            return None
        promote(s, version, "all")
        return now.name if now is not None else None


def run_round(params: RLHFParams, db_url: str, name: str) -> dict:
    """Round ``name`` (``round-N``, N >= 2): simulate round N-1's traffic, then snapshot → sft → preference →
    gate → register from the version round N-1 deployed, all into ``<rlhf.loop.dir>/round-N/``."""
    from feedback.simulate import STAGE as SIMULATE_STAGE, simulate
    from pipeline.cli import UserError
    from rlhf import stages

    n = round_number(name)
    try:
        if n < 2 or n not in later_rounds(params):
            raise ValueError(f"round {name!r} is not one of rlhf.loop.rounds ({sorted(params.rlhf.loop.rounds)}); "
                             f"round 1 is the snapshot ... register stages")
        parent = deployed_after(params, n - 1)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    rp = round_params(params, n)
    out = round_dir(params, n)
    shutil.rmtree(out, ignore_errors=True)  # DVC removes its output first; a direct call must start clean too
    out.mkdir(parents=True)
    say(f"[rlhf round {n}] traffic: simulate round {n - 1}; tuning from {parent['version'] or parent['model_dir']} "
        f"(deployed after round {n - 1})")
    from pipeline import numerics
    from pipeline.tracking import stage_run

    numerics.apply(params.numerics)
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args, **kw):
        t0 = time.monotonic()
        out = fn(*args, **kw)
        seconds[step] = time.monotonic() - t0
        return out

    serving = serving_after(params, n - 1)
    if serving and (replaced := restore_serving(db_url, serving)):
        say(f"[rlhf round {n}] {serving} serves everyone again, as after round {n - 1} (the store had {replaced})")
    with stage_run(SIMULATE_STAGE, rp) as run:  # → <round>/feedback/simulate.json, like round 1's reports/...
        sim = timed("simulate", simulate, rp, db_url, round_no=n - 1)
        run.summary(sim)
    ev = sim["choice_events"]
    say(f"[rlhf round {n}] simulate round {n - 1}: {sim['cursors']} fresh cursors x {sim['choices']} suggestions, "
        f"{ev['accepted']} accepted, {ev['rejected']} rejected (served by {', '.join(sim['by_model']) or '-'})")
    timed("snapshot", stages.snapshot, rp, db_url, parent=parent)
    timed("sft", stages.sft, rp)
    timed("preference", stages.preference, rp)
    timed("gate", stages.gate, rp, parent_eval=deployed_evaluation(params, n - 1))
    result = timed("register", stages.register, rp, db_url, on_fail="record")
    # Wall times go to the console only: the outputs must hash the same on every rerun.
    say(f"[rlhf round {n}] done in {sum(seconds.values()):.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f") → {out}")
    return result


def collect_round(params: RLHFParams, n: int) -> dict:
    """Round ``n``'s entry of ``reports/loop.json``, read from its outputs."""
    from rlhf.gate import read_gate
    from rlhf.snapshot import read_manifest

    rp = round_params(params, n)
    reports = Path(rp.tracking.reports_dir)
    tune = {name.removeprefix("rlhf_"): r for name in ("rlhf_sft", "rlhf_dpo")
            if (r := _read(reports / f"{name}.json")) is not None}
    entry = round_report(rp, read_gate(rp), read_manifest(rp.rlhf.snapshot_dir), tune, n)
    reg = _read(reports / ROUND1_REPORT) or {}
    entry["registered"] = reg.get("version") if reg.get("registered") else None
    entry["deployed"] = deployed_after(params, n)["version"] if reg else None
    from feedback.simulate import STAGE as SIMULATE_STAGE

    sim = _read(reports / f"{SIMULATE_STAGE}.json") or {}
    entry["traffic"] = {"simulate_round": sim.get("round"), "cursors": sim.get("cursors"),
                        "accepted": sim.get("accepted"), "rate": sim.get("rate"), "ci95": sim.get("ci95"),
                        "choice_events": sim.get("choice_events"), "served_by": sim.get("by_model")}
    return entry


def deployed_replays(params: RLHFParams, n: int) -> tuple[Path, Path]:
    """The held-out replays of what users get after round ``n`` (``n`` = 0: before any round, the base model, which
    has no filter): (its model alone, its model + filter) — round n's tuned and deployed replays if it registered a
    version, else what was deployed before it."""
    from rlhf.gate import DEPLOYED_NAME, PARENT_NAME, TUNED_NAME

    if n == 0:
        base = Path(round_params(params, 1).eval.out) / PARENT_NAME
        return base, base
    rp = round_params(params, n)
    if (_read(Path(rp.tracking.reports_dir) / ROUND1_REPORT) or {}).get("registered"):
        deployed = Path(rp.eval.out) / DEPLOYED_NAME
        tuned = Path(rp.eval.out) / TUNED_NAME
        return tuned, deployed if (deployed / "heldout_results.jsonl").is_file() else tuned
    return deployed_replays(params, n - 1)


def versus(params: RLHFParams, n: int) -> dict:
    """Round ``n`` against what users had before it and against the base, on the same held-out cursors. The gate
    compares the tuned model (and its filter) with the parent model alone; after round 1 the parent is served with
    its own filter, so "did what users get fall" needs the parent's deployed replay (rlhf/gate.py paired_tests)."""
    from rlhf.gate import DEPLOYED_NAME, TUNED_NAME, paired_tests
    from rlhf.heldout import read_rows

    rp = round_params(params, n)
    tuned, deployed = Path(rp.eval.out) / TUNED_NAME, Path(rp.eval.out) / DEPLOYED_NAME
    if not (deployed / "heldout_results.jsonl").is_file():
        deployed = tuned  # filter off: the model alone is what users get
    base = deployed_replays(params, 0)[0]
    before = deployed_replays(params, n - 1)[1]
    rows = {p: read_rows(p) for p in {tuned, deployed, base, before}}
    return {"deployed_vs_before": paired_tests(rows[before], rows[deployed], rp),
            "model_vs_base": paired_tests(rows[base], rows[tuned], rp),
            "deployed_vs_base": paired_tests(rows[base], rows[deployed], rp)}


def write_loop(params: RLHFParams, rounds: list[int] | None = None) -> dict:
    """Write ``reports/loop.json`` + ``loop.png``: round 1 and every configured later round (or ``rounds``)."""
    rounds = [1, *later_rounds(params)] if rounds is None else rounds
    entries = [collect_round(params, n) for n in rounds]
    for n, entry in zip(rounds, entries):
        entry["versus"] = versus(params, n)
    report = {"rounds": entries, "gate_passed": entries[-1]["gate_passed"], "margin": params.rlhf.gate.margin,
              "reject_cost_chars": params.rlhf.gate.reject_cost_chars}
    reports = Path(params.tracking.reports_dir)
    write_json(reports / "loop.json", report)
    plot(report, reports / "loop.png")
    return report
