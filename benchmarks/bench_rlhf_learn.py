"""Does the model itself learn from the feedback? SFT / DPO on kept code, judged by the gate's paired replay.

For the embedded default (``models/base``, ``data/dedup``): builds the learners' rows the way the simulated
user + snapshot do (``feedback.simulate.cursors`` on the *feedback* part of the validation split; prompt = the
cursor's FIM prompt, ``rlhf.snapshot.render_prompt``; completion / chosen = what the user kept there; rejected
= the parent's greedy suggestion when it differs), tunes with ``rlhf.tune`` (TRL SFT, then optionally DPO),
and replays the gate's held-out cursors (``rlhf.heldout.replay``, the other part of the split) for parent and
tuned model. Prints the paired difference of accepted characters per cursor and of utility per cursor (95%
file-clustered CI, permutation p: ``rlhf.gate.paired_tests``) and the seconds each step took.

With a preference step (``--dpo-steps N``, ``--method dpo|kto``, ``--beta``, ``--dpo-lr``) each learner is judged
separately: SFT alone vs the parent, the tuned model vs the parent, and the tuned model vs the SFT model it
started from (what the preference step adds), plus the chosen − rejected log-probability margin on *held-out
pairs*: at the gate's held-out cursors (never trained on), chosen = what the user kept, rejected = the SFT
model's greedy suggestion where the simulated user rejects it. ``--sft-from DIR`` reuses the SFT model and the
learner rows of an earlier run's ``--work`` DIR, so a sweep over the preference step trains SFT once; replays
and margins are cached by weights hash under ``--cache``.

The gateway round trip of ``ownllm feedback simulate`` is skipped (it only stores these same rows), so many
settings can be tried in the time of one refresh; the sizes that win go to params.yaml (docs/BENCHMARKS.md).

    python benchmarks/bench_rlhf_learn.py --cursors-per-file 16 --sft-steps 120 --lr 1e-3 [--dpo-steps 30]
    python benchmarks/bench_rlhf_learn.py --sft-steps 200 --lr 3e-3 --batch 4 --work /tmp/learn/sft   # SFT alone
    python benchmarks/bench_rlhf_learn.py --sft-from /tmp/learn/sft --dpo-steps 30 --beta 0.3 --work /tmp/learn/b03
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


def cached_replay(model_dir: Path, params, docs, cache: Path, tag) -> list[dict]:
    """The gate's held-out replay of ``model_dir``, cached by weights hash (a sweep replays each model once)."""
    from rlhf.heldout import RESULTS_FILE, read_rows, replay
    from rlhf.tune import weights_hash

    out = cache / f"replay-{weights_hash(model_dir)[:16]}-{tag}"
    if not (out / RESULTS_FILE).is_file():
        replay(str(model_dir), params, docs, out_dir=out)
    return read_rows(out)


def heldout_pairs(params, docs, sft_rows: list[dict]) -> list[dict]:
    """Preference pairs nothing trained on: at the gate's held-out cursors, chosen = what the user kept,
    rejected = the SFT model's greedy suggestion where the simulated user rejects it (shown, not accepted)."""
    from rlhf.heldout import gate_cursors
    from rlhf.snapshot import render_prompt

    cases = {c.key: c for c in gate_cursors(docs, params)}
    pairs = []
    for r in sft_rows:
        c = cases[r["key"]]
        if r["shown"] and not r["accepted"] and c.kept.strip() and r["suggestion"] != c.kept:
            pairs.append({"key": r["key"], "file": r["file"], "chosen": c.kept, "rejected": r["suggestion"],
                          "prompt": render_prompt(c.prefix, c.suffix, params.rlhf.max_prompt_chars)})
    return pairs


def margins(model_dir: Path, pairs: list[dict], params, cache: Path) -> list[float]:
    """log p(chosen | prompt) − log p(rejected | prompt) per pair (summed over the completion's tokens + EOS),
    the prompt fitted to ``rlhf.max_length`` by the tuner's own ``fit_prompts``: what DPO pushes up. Cached."""
    import hashlib

    from rlhf.tune import fit_prompts, preference_margins, weights_hash

    key = hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:12]
    out = cache / f"margins-{weights_hash(model_dir)[:16]}-{key}.json"
    if out.is_file():
        return json.loads(out.read_text())
    from transformers import AutoTokenizer

    fitted = fit_prompts(pairs, AutoTokenizer.from_pretrained(model_dir), params.rlhf.max_length, ["chosen", "rejected"])
    res = preference_margins(model_dir, fitted)
    cache.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res))
    return res


def print_paired(label: str, p: dict) -> None:
    for k in ("accepted_chars", "utility", "accepted"):
        t = p["tests"][k]
        print(f"[learn] {label}: {k:<15} {t['parent']:.4f} -> {t['tuned']:.4f} diff {t['diff']:+.4f} "
              f"CI [{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}] p={t['p_value']:.4f}", flush=True)
    m = p["mcnemar"]
    print(f"[learn] {label}: mcnemar {m}", flush=True)


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
    ap.add_argument("--method", choices=("dpo", "kto"), default=None, help="preference step (default rlhf.method)")
    ap.add_argument("--sft-from", default=None,
                    help="an earlier run's --work dir: reuse its SFT model and learner rows (no SFT, no pair building)")
    ap.add_argument("--cache", default="/tmp/bench_rlhf_learn/cache", help="replays and margins, by weights hash")
    args = ap.parse_args()

    import torch

    from pipeline.config import load_params
    from rlhf.gate import paired_tests
    from rlhf.heldout import gate_docs, suggest
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
    for k, v in (("lr", args.lr), ("beta", args.beta), ("batch_size", args.batch), ("rpo_alpha", args.rpo_alpha),
                 ("method", args.method)):
        if v is not None:
            upd[k] = v
    gate = r.gate if args.max_gate_files is None else r.gate.model_copy(update={"max_files": args.max_gate_files})
    params = params.model_copy(update={"rlhf": r.model_copy(update={**upd, "gate": gate})})
    parent = Path(args.model or r.base_model)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    cases, rows = kept_rows(params, args.cursors_per_file, args.rounds, args.files)
    timings["rows"] = time.perf_counter() - t0
    print(f"[learn] {len(rows)} kept rows from {len(cases)} cursors", flush=True)
    sft = None
    if args.sft_from:  # the SFT model and learner rows of an earlier run: only the preference step is new
        src = Path(args.sft_from)
        for f in ("sft.jsonl", "pairs.jsonl", "unpaired.jsonl"):
            if (src / "snapshot" / f).is_file():
                (snap / f).write_bytes((src / "snapshot" / f).read_bytes())
        if (snap / "sft.jsonl").read_text(encoding="utf-8") != "".join(json.dumps(x) + "\n" for x in rows):
            raise SystemExit(f"--sft-from {src}: its kept rows differ from this run's (other cursor flags?)")
        tuned = src / "sft"
        sft_dir = tuned
    else:
        (snap / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows), encoding="utf-8")
        t0 = time.perf_counter()
        sft = run_sft(params, model_dir=parent) if args.sft_steps > 0 else None
        timings["sft"] = time.perf_counter() - t0
        tuned = Path(params.rlhf.sft_out) if sft else parent
        sft_dir = tuned
        t0 = time.perf_counter()
        sugg, _ = suggest(tuned, params, cases)
        kept = [c for c in cases if c.kept.strip()]
        pairs = [{"prompt": row["prompt"], "chosen": c.kept, "rejected": s}
                 for c, row, s in zip(kept, rows, sugg) if s.strip() and s != c.kept]
        # KTO's unpaired rows from the same pairs: the kept text desirable, the rejected suggestion not.
        unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                    for p in pairs for k in ("chosen", "rejected")]
        (snap / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs), encoding="utf-8")
        (snap / "unpaired.jsonl").write_text("".join(json.dumps(x) + "\n" for x in unpaired), encoding="utf-8")
        timings["pairs"] = time.perf_counter() - t0
    if args.dpo_steps > 0:
        dpo_params = params if args.dpo_lr is None else params.model_copy(
            update={"rlhf": params.rlhf.model_copy(update={"dpo_lr": args.dpo_lr})})
        t0 = time.perf_counter()
        pref = run_preference(dpo_params, model_dir=sft_dir)
        timings["preference"] = time.perf_counter() - t0
        tuned = Path(params.rlhf.tuned_out)
        print(f"[learn] {pref.method}: {pref.examples} examples, {pref.steps} steps, loss {pref.train_loss}", flush=True)

    docs = gate_docs(params)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    prow = cached_replay(parent, params, docs, cache, args.max_gate_files)
    srow = cached_replay(sft_dir, params, docs, cache, args.max_gate_files)
    timings["replay_parent_sft"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trow = cached_replay(tuned, params, docs, cache, args.max_gate_files)
    timings["replay_tuned"] = time.perf_counter() - t0
    p = paired_tests(prow, trow, params)
    out = {"args": vars(args), "kept_rows": len(rows), "sft": None if sft is None else {
        "steps": sft.steps, "loss": sft.train_loss}, "tuned_sha256": weights_hash(tuned),
        "parent_sha256": weights_hash(parent),
        "paired": {k: p["tests"][k] for k in ("accepted_chars", "utility", "accepted")}, "mcnemar": p["mcnemar"]}
    print_paired("tuned vs parent", p)
    if tuned != sft_dir and sft_dir != parent:  # each learner separately: SFT alone, and what preference adds
        ps = paired_tests(prow, srow, params)
        print_paired("SFT alone vs parent", ps)
        pt = paired_tests(srow, trow, params)
        print_paired("preference step (tuned vs SFT)", pt)
        out["sft_vs_parent"] = {k: ps["tests"][k] for k in ("accepted_chars", "utility", "accepted")}
        out["tuned_vs_sft"] = {k: pt["tests"][k] for k in ("accepted_chars", "utility", "accepted")}
        out["tuned_vs_sft"]["mcnemar"] = pt["mcnemar"]
    if sft_dir != parent:  # the chosen − rejected margin on held-out pairs: vs SFT (or, for SFT alone, the parent)
        from pipeline.eval.paired import clustered_mean_difference

        t0 = time.perf_counter()
        hp = heldout_pairs(params, docs, srow)
        m_sft = margins(sft_dir if tuned != sft_dir else parent, hp, params, cache)
        m_tuned = margins(tuned, hp, params, cache)
        timings["margins"] = time.perf_counter() - t0
        res = clustered_mean_difference("margin", m_sft, m_tuned, [x["file"] for x in hp], seed=params.rlhf.gate.seed,
                                        n_resamples=params.rlhf.gate.resamples).to_json()
        res["pairs"] = len(hp)
        res["reference"] = "sft" if tuned != sft_dir else "parent"
        res["reference_prefers_chosen"] = sum(m > 0 for m in m_sft) / len(hp)
        res["tuned_prefers_chosen"] = sum(m > 0 for m in m_tuned) / len(hp)
        out["heldout_margin"] = res
        print(f"[learn] held-out margin (nats, {len(hp)} pairs): {res['reference']} {res['parent']:+.3f} -> tuned "
              f"{res['tuned']:+.3f} diff {res['diff']:+.3f} CI [{res['ci95'][0]:+.3f}, {res['ci95'][1]:+.3f}] "
              f"p={res['p_value']:.4f}; prefers chosen {res['reference_prefers_chosen']:.3f} -> "
              f"{res['tuned_prefers_chosen']:.3f}", flush=True)
    out["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    print(f"[learn] timings {out['timings_s']}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
