"""What the suggestion filter's feature costs the serving engine, and whether it is the gate's feature.

    python benchmarks/bench_filter.py [--model-dir models/base] [--params params.yaml] [--max-files N]
                                      [--replay reports/eval/rlhf-parent/heldout_results.jsonl]

The gate's held-out cursors (rlhf.heldout.gate_cursors), one greedy suggestion each cut at the end of its line,
served by the gateway's CTranslate2 engine (feedback.engine.CT2Backend, batched as the gateway batches) twice:
without log-probabilities (the plain path, no per-token callback) and with them (``logprobs=True``: the
per-token callback and ``return_scores`` that a version with a suggestion filter needs). Speed: wall time of
each pass, interleaved in two halves so both see the same machine load, as a ratio. Agreement: each cursor's
mean token log-probability from the engine against the gate's own replay of the same model (transformers
``generate`` + ``compute_transition_scores``, the ``logprob`` column of ``--replay``), matched by cursor key —
the filter's input must be the same number in the gate and in the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ownllm serve` sets it


def suggestions(backend, cases, params, logprobs: bool, stop: tuple[str, ...] = ("\n",)):
    """Every cursor's greedy suggestion (and mean log-probability), submitted at once to fill the batches."""
    from feedback.backends import GenRequest

    gate, chars = params.rlhf.gate, params.feedback.simulate.max_context_chars
    futs = [backend.complete_future(GenRequest(c.prefix[-chars:], c.suffix[:chars] or None, max_tokens=gate.max_tokens,
                                               temperature=0.0, stop=stop, logprobs=logprobs))
            for c in cases]
    return [f.result().choices[0] for f in futs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="models/base")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-files", type=int, help="replay only the first N held-out files (default: all)")
    ap.add_argument("--no-stop", action="store_true",
                    help="no stop sequence: the plain pass then runs without the per-token callback (a stop "
                         "sequence needs it too), so the ratio includes the callback's own cost")
    ap.add_argument("--replay", default="reports/eval/rlhf-parent/heldout_results.jsonl",
                    help="the gate's replay rows of the same model (key, suggestion, logprob)")
    args = ap.parse_args()

    from feedback.engine import CT2Backend
    from benchmarks.heldout_cases import held_out_cases

    params, cases, halves = held_out_cases(args.params, args.max_files, args.model_dir)
    backend = CT2Backend(args.model_dir, num_threads=args.threads, max_batch=64)
    out = {"plain": [], "logprobs": []}
    wall = {"plain": 0.0, "logprobs": 0.0}
    try:
        suggestions(backend, cases[:8], params, False)  # warm-up
        for part, order in zip(halves, (("plain", "logprobs"), ("logprobs", "plain"))):  # interleaved
            for mode in order:
                t0 = time.perf_counter()
                out[mode] += suggestions(backend, part, params, mode == "logprobs", () if args.no_stop else ("\n",))
                wall[mode] += time.perf_counter() - t0
                print(f"  {mode}: {len(out[mode])}/{len(cases)} suggestions", flush=True)
    finally:
        backend.engine.close()
    same_text = sum(a.text == b.text for a, b in zip(out["plain"], out["logprobs"]))
    print(f"\n[filter feature] CTranslate2, greedy, max_tokens {params.rlhf.gate.max_tokens}, "
          + ("no stop sequence" if args.no_stop else "cut at the end of the line"))
    print(f"  identical suggestions with and without log-probabilities: {same_text}/{len(cases)}")
    print(f"  wall: plain {wall['plain']:.1f} s, with log-probabilities {wall['logprobs']:.1f} s; "
          f"ratio {wall['logprobs'] / wall['plain']:.2f}")
    replay = Path(args.replay)
    if replay.is_file() and not args.no_stop:
        rows = {r["key"]: r for r in map(json.loads, replay.read_text(encoding="utf-8").splitlines())}
        matched = [(c, o) for c, o in zip(cases, out["logprobs"]) if c.key in rows]
        same = [(c, o) for c, o in matched if rows[c.key]["suggestion"] == o.text]
        diffs = sorted(abs(round(o.logprob, 6) - rows[c.key]["logprob"]) for c, o in same)
        if diffs:
            print(f"  against the gate's replay ({replay}): {len(matched)} cursors matched by key, {len(same)} with the "
                  f"same suggestion; |engine - replay| mean log-probability: median {diffs[len(diffs) // 2]:.2e}, "
                  f"99th percentile {diffs[int(0.99 * (len(diffs) - 1))]:.2e}, max {diffs[-1]:.2e}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
