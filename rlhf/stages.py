"""The RLHF stages as functions: what each `ownllm rlhf ...` command (and so each DVC stage) does.

Each runs inside ``pipeline.tracking.stage_run`` (W&B offline by default, ``reports/rlhf_<stage>.json``
with deterministic values only) and ends with a one-line summary. ``rlhf.refresh`` calls them in order
when it runs without DVC.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import RLHFParams
from pipeline.tracking import say, stage_run, wandb_mode, write_json


def snapshot(params: RLHFParams, db_url: str, parent: dict | None = None, parent_from: str = "base") -> dict:
    """``parent``: the model to tune from (a later loop round's: the version the round before deployed); else
    ``parent_from`` says (:func:`rlhf.snapshot.snapshot_parent`): ``base`` (`dvc repro`'s round 1: rlhf.base_model)
    or ``production`` (`ownllm rlhf refresh`: the version serving everyone in the store)."""
    from rlhf.snapshot import take_snapshot, write_snapshot

    with stage_run("rlhf_snapshot", params) as run:
        snap, pinned = take_snapshot(params, db_url, parent_from)
        parent = parent or pinned
        manifest = write_snapshot(snap, params.rlhf.snapshot_dir, parent)
        run.summary(manifest)
    c = manifest["counts"]
    say(f"[rlhf snapshot] {c['sft']} SFT examples, {c['pairs']} preference pairs, {c['unpaired']} unpaired "
        f"→ {params.rlhf.snapshot_dir} (hash {manifest['content_hash'][:12]}, parent "
        f"{parent['version'] or parent['model_dir']}, dropped {snap.stats['rejected'] or 'none'})")
    return manifest


def _report_to(params: RLHFParams) -> str:
    # Explicit, never transformers' "all": W&B (offline unless WANDB_API_KEY) or nothing.
    return "none" if wandb_mode(params) == "disabled" else "wandb"


def _tune(stage: str, params: RLHFParams, fn) -> dict:
    import os

    if _report_to(params) == "wandb":
        os.environ["WANDB_MODE"] = wandb_mode(params)
    from pipeline import numerics
    from rlhf.tune import _use_cpu

    numerics.apply(params.numerics)
    with stage_run(stage, params) as run:
        res = fn(params, report_to=_report_to(params))
        run.log({"tokens_per_s": res.tokens_per_s, "seconds": res.seconds})
        run.summary({**res.metrics(), "numerics": numerics.record(params.numerics, "cpu" if _use_cpu(params.rlhf) else "gpu")})
    if res.skipped:
        say(f"[{stage.replace('_', ' ')}] skipped: {res.skipped} → {res.out_dir}")
        return {**res.metrics(), "tokens_per_s": res.tokens_per_s, "seconds": res.seconds}
    say(f"[{stage.replace('_', ' ')}] {res.method}: {res.examples} examples, {res.steps} steps, "
        f"loss {res.train_loss if res.train_loss is not None else '-'}, {res.tokens} tokens in {res.seconds:.1f}s "
        f"({res.tokens_per_s:.0f} tok/s) → {res.out_dir}")
    return {**res.metrics(), "tokens_per_s": res.tokens_per_s, "seconds": res.seconds}


def sft(params: RLHFParams) -> dict:
    from rlhf.tune import run_sft

    return _tune("rlhf_sft", params, run_sft)


def preference(params: RLHFParams) -> dict:
    from rlhf.tune import run_preference

    return _tune("rlhf_dpo", params, run_preference)


def gate(params: RLHFParams, parent_eval: dict | None = None) -> dict:
    """Evaluate tuned vs parent and write the gate result; never fails on a bad verdict. ``parent_eval``: an
    earlier evaluation of the parent to reuse if its weights match (:func:`rlhf.gate.reuse_evaluation`)."""
    from rlhf.gate import run_gate
    from rlhf.tune import PARENT_FILE

    cfg = params.rlhf
    parent_file = Path(cfg.snapshot_dir) / PARENT_FILE
    parent = json.loads(parent_file.read_text(encoding="utf-8")) if parent_file.is_file() else \
        {"version": None, "model_dir": cfg.base_model}
    with stage_run("rlhf_gate", params, write_metrics=False) as run:
        result = run_gate(params, parent, cfg.tuned_out, parent_eval=parent_eval)
        run.summary({r["metric"]: r["tuned"] for r in result.rows})
    print(result.table())
    say(f"[rlhf gate] {'passed' if result.passed else 'FAILED'}: tuned vs {parent['version'] or parent['model_dir']} "
        f"→ {Path(params.tracking.reports_dir) / 'rlhf_gate.json'}")
    return result.to_json()


def register(params: RLHFParams, db_url: str, on_fail: str = "exit") -> dict:
    """Register the tuned model if the gate passed. ``on_fail='exit'`` raises GateFailed (exit 1)."""
    from rlhf.gate import read_gate
    from rlhf.register import STAGE, register_tuned

    result = register_tuned(params, db_url)
    write_json(Path(params.tracking.reports_dir) / f"{STAGE}.json", result.to_json())
    if result.registered:
        rollout = result.lineage.get("rollout") or "staff"
        say(f"[rlhf register] registered {result.version} (rollout {rollout}, parent {result.lineage['parent']})"
            + ("; promote with `ownllm models promote " + result.version + " --to ab:10`" if rollout == "staff" else ""))
    else:
        gate_json = read_gate(params)
        from rlhf.gate import GateResult

        print(GateResult.from_json(gate_json).table())
        say(f"[rlhf register] nothing registered: {result.reason}")
        if on_fail == "exit":
            raise GateFailed(result.reason)
    return result.to_json()


def loop_round(params: RLHFParams, db_url: str, name: str) -> dict:
    """One later refresh round of `dvc repro` (DVC stage ``refresh@round-N``): see :func:`rlhf.loop.run_round`."""
    from rlhf.loop import run_round

    return run_round(params, db_url, name)


def loop(params: RLHFParams) -> dict:
    """``reports/loop.json`` + ``loop.png``: every round's gate metrics with their CIs (DVC stage ``loop``)."""
    from rlhf.loop import write_loop

    report = write_loop(params)
    verdicts = ", ".join(f"round {r['round']} {'pass' if r['gate_passed'] else 'FAIL'}" for r in report["rounds"])
    say(f"[rlhf loop] {len(report['rounds'])} round(s): {verdicts} → "
        f"{Path(params.tracking.reports_dir) / 'loop.json'}, loop.png")
    return report


class GateFailed(RuntimeError):
    """The tuned model regressed against its parent: nothing was registered."""
