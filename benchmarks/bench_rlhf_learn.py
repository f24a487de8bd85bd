"""Does the model itself learn from the feedback? SFT / DPO on kept code, judged by the gate's paired replay.

For the embedded default (``models/base``, ``data/dedup``): builds the learners' rows the way the simulated
user + snapshot do (``feedback.simulate.cursors`` on the *feedback* part of the validation split; prompt = the
cursor's FIM prompt, ``rlhf.snapshot.render_prompt``; completion / chosen = what the user kept there; rejected
= the parent's greedy suggestion when it differs), tunes with ``rlhf.tune`` (TRL SFT, then optionally DPO),
and replays the gate's held-out cursors (``rlhf.heldout.replay``, the other part of the split) for parent and
tuned model. Prints the paired difference of accepted characters per cursor and of utility per cursor (95%
file-clustered CI, permutation p: ``rlhf.gate.paired_tests``) and the seconds each step took.

The gateway round trip of ``ownllm feedback simulate`` is skipped (it only stores these same rows), so many
settings can be tried in the time of one refresh; the sizes that win go to params.yaml (docs/BENCHMARKS.md).

    python benchmarks/bench_rlhf_learn.py --cursors-per-file 16 --sft-steps 120 --lr 1e-3 [--dpo-steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OWNLLM_WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def kept_rows(params, per_file: int, rounds: int, files: int | None) -> tuple[list, list[dict]]:
    """The simulated user's cursors (rounds 0..rounds-1) on the feedback files, and SFT rows (prompt -> kept)."""
    from feedback.simulate import cursors, pick_files
    from pipeline.eval.fim import validation_docs
    from rlhf.snapshot import render_prompt

    sim = params.feedback.simulate
    docs = validation_docs(params, part="feedback", gate_frac=params.rlhf.gate.heldout_frac)
    docs = pick_files(docs, sim.model_copy(update={"files": files or len(docs)}))
    cases = [c for d in docs for r in range(rounds) for c in cursors(d, sim, r, per_file=per_file)]
    rows = [{"prompt": render_prompt(c.prefix, c.suffix, params.rlhf.max_prompt_chars), "completion": c.kept}
            for c in cases if c.kept.strip()]
    return cases, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default=None, help="parent (default rlhf.base_model)")
    ap.add_argument("--cursors-per-file", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--files", type=int, default=None, help="feedback files (default: all)")
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--dpo-steps", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--dpo-lr", type=float, default=None)
    ap.add_argument("--beta", type=float, default=None)
    ap.add_argument("--rpo-alpha", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/bench_rlhf_learn")
    ap.add_argument("--max-gate-files", type=int, default=None)
    args = ap.parse_args()

    import torch

    from pipeline.config import load_params
    from rlhf.gate import paired_tests
    from rlhf.heldout import gate_docs, replay, suggest
    from rlhf.tune import run_preference, run_sft, weights_hash

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    work = Path(args.work)
    snap = work / "snapshot"
    snap.mkdir(parents=True, exist_ok=True)
    r = params.rlhf
    upd = {"snapshot_dir": str(snap), "sft_out": str(work / "sft"), "tuned_out": str(work / "tuned"),
           "work_dir": str(work / "trainer"), "sft_max_steps": args.sft_steps, "dpo_max_steps": args.dpo_steps,
           "device": "cpu"}
    for k, v in (("lr", args.lr), ("beta", args.beta), ("batch_size", args.batch), ("rpo_alpha", args.rpo_alpha)):
        if v is not None:
            upd[k] = v
    gate = r.gate if args.max_gate_files is None else r.gate.model_copy(update={"max_files": args.max_gate_files})
    params = params.model_copy(update={"rlhf": r.model_copy(update={**upd, "gate": gate})})
    parent = Path(args.model or r.base_model)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    cases, rows = kept_rows(params, args.cursors_per_file, args.rounds, args.files)
    (snap / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
    timings["rows"] = time.perf_counter() - t0
    print(f"[learn] {len(rows)} kept rows from {len(cases)} cursors", flush=True)

    t0 = time.perf_counter()
    sft = run_sft(params, model_dir=parent) if args.sft_steps > 0 else None
    timings["sft"] = time.perf_counter() - t0
    tuned = Path(params.rlhf.sft_out) if sft else parent
    if args.dpo_steps > 0:
        t0 = time.perf_counter()
        sugg, _ = suggest(tuned, params, cases)
        pairs = [{"prompt": row["prompt"], "chosen": c.kept, "rejected": s}
                 for c, row, s in zip([c for c in cases if c.kept.strip()], rows, sugg) if s.strip() and s != c.kept]
        (snap / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs), encoding="utf-8")
        timings["pairs"] = time.perf_counter() - t0
        dpo_params = params if args.dpo_lr is None else params.model_copy(
            update={"rlhf": params.rlhf.model_copy(update={"dpo_lr": args.dpo_lr})})
        t0 = time.perf_counter()
        run_preference(dpo_params, model_dir=tuned)
        timings["dpo"] = time.perf_counter() - t0
        tuned = Path(params.rlhf.tuned_out)
        print(f"[learn] {len(pairs)} pairs", flush=True)

    docs = gate_docs(params)
    cache = work / f"parent-{weights_hash(parent)[:12]}-{args.max_gate_files}"
    t0 = time.perf_counter()
    if not (cache / "heldout_results.jsonl").is_file():
        replay(str(parent), params, docs, out_dir=cache)
    prow = [json.loads(x) for x in (cache / "heldout_results.jsonl").read_text().splitlines()]
    timings["replay_parent"] = time.perf_counter() - t0
    if args.dpo_steps > 0 and sft is not None:  # the SFT model alone too: what each learner adds
        srow = replay(str(params.rlhf.sft_out), params, docs)["rows"]
        t = paired_tests(prow, srow, params)["tests"]["accepted_chars"]
        print(f"[learn] SFT alone: accepted_chars diff {t['diff']:+.4f} CI [{t['ci95'][0]:+.4f}, "
              f"{t['ci95'][1]:+.4f}] p={t['p_value']:.4f}")
    t0 = time.perf_counter()
    trow = replay(str(tuned), params, docs)["rows"]
    timings["replay_tuned"] = time.perf_counter() - t0
    p = paired_tests(prow, trow, params)
    out = {"args": vars(args), "kept_rows": len(rows), "sft": None if sft is None else {
        "steps": sft.steps, "loss": sft.train_loss}, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "paired": {k: p["tests"][k] for k in ("accepted_chars", "utility", "accepted")}, "mcnemar": p["mcnemar"]}
    for k in ("accepted_chars", "utility", "accepted"):
        t = p["tests"][k]
        print(f"[learn] {k:<15} parent {t['parent']:.4f} tuned {t['tuned']:.4f} diff {t['diff']:+.4f} "
              f"CI [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] p={t['p_value']:.4f}")
    print(f"[learn] mcnemar {p['mcnemar']}  timings {out['timings_s']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
