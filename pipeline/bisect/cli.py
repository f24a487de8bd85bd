"""`ownllm bisect`: replay a loss spike, name the documents behind it, optionally exclude them.

1. Pick the spike (``--step``, else the first one in ``reports/train/spikes.json``) and the last
   checkpoint before it; the window is the steps from that checkpoint to the spike.
2. Replay the window unchanged: does the spike reproduce? (PaLM found some do not; that is an answer.)
3. Delta-debug over the window's documents: drop halves, replay, keep narrowing down the half whose
   removal alone calms the run (ddmin, so documents that only matter together are found too).
4. Report to ``reports/bisect/<run>-<step>.json`` and a table; ``--exclude`` appends the named ids to
   ``shards.exclude_ids`` so ``dvc repro`` rebuilds shards and model without them.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

from pipeline.cli import add_params_arg, lazy
from pipeline.config import Params


def register(sub) -> None:
    p = sub.add_parser("bisect", help="replay a loss spike and name the documents that cause it")
    add_params_arg(p)
    p.add_argument("--step", type=int, metavar="N", help="the spike step (default: the first in spikes.json)")
    p.add_argument("--spikes", metavar="FILE", help="spikes file (default: <train.reports_dir>/spikes.json)")
    p.add_argument("--exclude", action="store_true",
                   help="append the named document ids to the exclusion list (shards.exclude_ids)")
    p.set_defaults(func=lazy("pipeline.bisect.cli:main"))


# ------------------------------------------------------------------------------------------- inputs
def read_losses(params: Params) -> dict[int, float]:
    path = Path(params.train.reports_dir) / "loss.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no loss curve at {path}: bisect needs a finished (or killed) `ownllm train`")
    with path.open(newline="") as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r["skipped"] == "0"}


def pick_spike(params: Params, step: int | None, spikes_file: str | None) -> dict[str, Any]:
    """The spike record to bisect: ``step`` with its threshold, from spikes.json or recomputed from loss.csv."""
    path = Path(spikes_file or Path(params.train.reports_dir) / "spikes.json")
    spikes = json.loads(path.read_text()) if path.is_file() else []
    if step is None:
        if not spikes:
            raise ValueError(f"no spike recorded in {path}; pass --step to bisect a step of your choice")
        return spikes[0]
    for rec in spikes:
        if rec["step"] == step:
            return rec
    losses = read_losses(params)
    cfg = params.train.spike
    before = [losses[s] for s in sorted(losses) if s < step][-cfg.window:]
    if step not in losses or not before:
        raise ValueError(f"step {step} is not in {params.train.reports_dir}/loss.csv (or has no steps before it)")
    mean = sum(before) / len(before)
    return {"step": step, "loss": losses[step], "running_mean": mean, "ratio": losses[step] / mean}


# ------------------------------------------------------------------------------------------- search
def raise_open_file_limit() -> None:
    """Lift the soft open-files limit to the hard one: each replay leaves ~200 descriptors open.

    mosaicml-streaming 0.13 keeps its shared-memory segments (/dev/shm/*_resume, *_locals, ...) open for
    the life of the process, and a bisect opens the training data once per replay; with a 1024 soft
    limit a few replays would exhaust it.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))


def bisect_spike(params: Params, spike: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """Replay, confirm and narrow down one spike; returns (report, timings)."""
    from pipeline.bisect.ddmin import ddmin
    from pipeline.bisect.replay import checkpoint_before, load_window, replay
    from pipeline.bisect.report import document_table
    from pipeline.tools import git_revision
    from pipeline.train.data import load_tokenizer

    cfg, step = params.bisect, int(spike["step"])
    raise_open_file_limit()
    threshold = params.train.spike.k * float(spike["running_mean"])
    started = time.perf_counter()
    tokenizer = load_tokenizer(params)
    ckpt, start = checkpoint_before(params, step)
    window = load_window(params, start, step, tokenizer)
    docs = window.by_recency()

    history = read_losses(params)

    def threshold_of(result) -> float:
        """The detector's threshold on the replayed curve: k x the mean of the ``window`` losses before the spike.

        Judging each replay by its own curve matters: a replay without many documents trains less, so all of
        its losses sit higher, and the original run's threshold would call that a spike (or hide one).
        """
        curve = {**{s: v for s, v in history.items() if s < start}, **result.losses}
        before = [curve[s] for s in sorted(curve) if s < step and curve[s] is not None][-params.train.spike.window:]
        return params.train.spike.k * sum(before) / len(before) if before else threshold

    def spikes(result) -> bool:
        # A spike step with nothing left in it cannot spike. NaN/inf count as a spike, as in the detector.
        return result.spike_loss is not None and not result.spike_loss < threshold_of(result)

    replays = [replay(params, window, ckpt)]
    base = replays[0]
    reproduces = spikes(base)
    named: list[str] = []
    dd = None
    if reproduces:
        def calm_without(removed: list[str]) -> bool:
            # The question the exclusion list answers: does the run stay calm without these documents?
            # Everything else stays in, so the model each test replays stays close to the real one.
            replays.append(replay(params, window, ckpt, set(removed)))
            return not spikes(replays[-1])

        budget = max(0.0, cfg.max_seconds - (time.perf_counter() - started))
        dd = ddmin(docs, calm_without, min_candidates=cfg.min_candidates, max_tests=max(0, cfg.max_replays - 1),
                   max_seconds=budget)
        named = dd.candidates
    by_drop = {tuple(r.dropped): r for r in replays}
    without = by_drop.get(tuple(sorted(named))) or base
    if named and tuple(sorted(named)) not in by_drop:  # the search stopped before testing its own answer
        without = replay(params, window, ckpt, set(named))
        replays.append(without)

    rows = document_table(params, window, named, base.doc_losses, float(spike["running_mean"]), tokenizer) if named else []
    sample_docs = {idx: sorted({sp[0] for sp in window.spans[idx]}) for idx in base.sample_losses}
    report = {
        "run": params.train.run_name,
        "step": step,
        "checkpoint": str(ckpt) if ckpt else None,
        "window": {"start": start, "steps": step - start + 1, "documents": len(docs)},
        "original_loss": float(spike["loss"]),
        "running_mean": float(spike["running_mean"]),
        "threshold": threshold,
        "reproduces": reproduces,
        "bit_identical": base.spike_loss == float(spike["loss"]),
        "spike_step_samples": [{"sample_idx": idx, "loss": loss, "doc_ids": sample_docs[idx]}
                               for idx, loss in base.sample_losses.items()],
        "documents": rows,
        "evidence": {"with_all": base.spike_loss, "without_named": without.spike_loss,
                     "threshold_with_all": threshold_of(base), "threshold_without_named": threshold_of(without),
                     "losses_with_all": {str(k): v for k, v in base.losses.items()},
                     "losses_without_named": {str(k): v for k, v in without.losses.items()}},
        "search": {"replays": len(replays), "naive_replays": len(docs) + 1,
                   "stopped": dd.stopped if dd else "not_reproduced", "history": dd.history if dd else [],
                   "max_replays": cfg.max_replays, "min_candidates": cfg.min_candidates},
        "compare_against": {"git_revision": git_revision(),
                            "note": "re-run `dvc repro` after --exclude; steps before the window must match this run"},
    }
    timings = {"seconds": time.perf_counter() - started, "replays": len(replays),
               "replay_seconds": [round(r.seconds, 3) for r in replays]}
    return report, timings


# ----------------------------------------------------------------------------------------- exclusion
def append_exclusions(path: str | Path, ids: list[str], why: str) -> list[str]:
    """Append ids not yet listed, under one comment naming the spike; returns the ids added (idempotent)."""
    from pipeline.data.shards import read_exclude_ids

    p = Path(path)
    listed = set(read_exclude_ids(p)) if p.is_file() else set()
    new = [d for d in ids if d not in listed]
    if new:
        text = p.read_text(encoding="utf-8") if p.is_file() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + f"# {why}\n" + "".join(d + "\n" for d in new), encoding="utf-8")
    return new


def report_path(params: Params, step: int) -> Path:
    return Path(params.bisect.out) / f"{params.train.run_name}-{step}.json"


def main(args) -> int:
    from pipeline.bisect.report import render
    from pipeline.cli import UserError
    from pipeline.config import load_params
    from pipeline.tracking import say, write_json

    from pipeline import numerics

    params = load_params(args.params)
    numerics.apply(params.numerics)  # a replay is bit-identical only under the numerics of the run it replays
    try:
        spike = pick_spike(params, args.step, args.spikes)
        report, timings = bisect_spike(params, spike)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    out = write_json(report_path(params, report["step"]), report)
    # Wall time differs run to run, so it stays out of the report (which must hash the same every time).
    write_json(out.with_suffix(".timing.json"), timings)
    render(report)
    ids = [d["id"] for d in report["documents"]]
    added: list[str] = []
    if args.exclude and ids:
        why = (f"bisect: loss spike at step {report['step']} of run {report['run']} "
               f"(git {report['compare_against']['git_revision'] or 'unknown'}), see {out}")
        added = append_exclusions(params.shards.exclude_ids, ids, why)
    say(f"[bisect] step {report['step']}: spike {'reproduces' if report['reproduces'] else 'does not reproduce'}; "
        f"{len(ids)} of {report['window']['documents']} documents named in {report['search']['replays']} replays "
        f"({timings['seconds']:.0f}s; naive: {report['search']['naive_replays']} replays)"
        + (f"; {len(added)} added to {params.shards.exclude_ids}" if args.exclude else "") + f" → {out}")
    return 0
