"""int8 vs float32 CTranslate2 on the held-out replay: what quantisation costs in acceptance, and what it buys.

    python benchmarks/bench_quant.py [--model-dir models/base] [--params params.yaml] [--max-files N] [--out F]

The gate's held-out replay (rlhf/heldout.py): the simulated IDE user's cursors on the 'gate' part of the
validation split, one greedy suggestion per cursor cut at the end of its line, scored by the simulator's accept
rule. Here both suggestions come from the serving engine (feedback.engine.CT2Backend, batched as the gateway
batches them; ``serve.quantization`` float32 vs int8), and the two are compared cursor by cursor with the gate's
own paired statistics (rlhf.gate.paired_tests: exact McNemar on acceptance, file-clustered bootstrap CIs and
permutation p-values on utility and accepted characters). Speed: wall time of the whole replay per engine,
interleaved in two halves so both see the same machine load, as a ratio.
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


def suggestions(backend, cases, params) -> list[str]:
    """Every cursor's greedy suggestion, submitted at once so the batcher fills its batches."""
    from feedback.backends import GenRequest

    gate, chars = params.rlhf.gate, params.feedback.simulate.max_context_chars
    futs = [backend.complete_future(GenRequest(prompt=c.prefix[-chars:], suffix=c.suffix[:chars] or None,
                                               max_tokens=gate.max_tokens, temperature=0.0, stop=("\n",)))
            for c in cases]
    return [f.result().choices[0].text for f in futs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REPO / "models" / "base"))
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-files", type=int, help="replay only the first N held-out files (default: all)")
    ap.add_argument("--out", help="write the comparison as JSON here")
    args = ap.parse_args()

    from feedback.engine import CT2Backend
    from benchmarks.heldout_cases import held_out_cases
    from rlhf.gate import paired_tests
    from rlhf.heldout import score, summarise

    params, cases, halves = held_out_cases(args.params, args.max_files, args.model_dir)
    backends = {q: CT2Backend(args.model_dir, quantization=q, num_threads=args.threads, max_batch=64)
                for q in ("float32", "int8")}
    texts: dict[str, list[str]] = {q: [] for q in backends}
    wall: dict[str, float] = {q: 0.0 for q in backends}
    try:
        for part, order in zip(halves, (("float32", "int8"), ("int8", "float32"))):  # interleaved
            for q in order:
                t0 = time.perf_counter()
                texts[q] += suggestions(backends[q], part, params)
                wall[q] += time.perf_counter() - t0
                print(f"  {q}: {len(texts[q])}/{len(cases)} suggestions", flush=True)
    finally:
        for b in backends.values():
            b.engine.close()
    zeros = [0.0] * len(cases)
    rows = {q: score(cases, texts[q], zeros, params) for q in backends}
    summ = {q: summarise(rows[q]) for q in backends}
    paired = paired_tests(rows["float32"], rows["int8"], params)  # "parent" = float32, "tuned" = int8
    same = sum(a == b for a, b in zip(texts["float32"], texts["int8"]))
    print(f"\n[quant] held-out replay, CTranslate2 float32 vs int8 (greedy, max_tokens {params.rlhf.gate.max_tokens}, "
          f"cut at the end of the line)")
    print(f"  {'':8} {'shown':>7} {'accepted':>9} {'acceptance':>11} {'acc chars/cursor':>17} {'utility/cursor':>15} "
          f"{'wall':>8}")
    for q, s in summ.items():
        print(f"  {q:8} {s['shown']:7d} {s['accepted']:9d} {s['acceptance']:11.4f} "
              f"{s['accepted_chars_per_cursor']:17.4f} {s['utility_per_cursor']:15.4f} {wall[q]:7.1f}s")
    print(f"  identical suggestions: {same}/{len(cases)} ({same / len(cases):.1%})")
    m = paired["mcnemar"]
    print(f"  acceptance, exact McNemar: accepted by both {m['both']}, only float32 {m['only_parent']}, only int8 "
          f"{m['only_tuned']}, p = {m['p_value']:.4f}")
    for metric in ("utility", "accepted_chars"):
        t = paired["tests"][metric]
        print(f"  {metric} int8 - float32: {t['diff']:+.4f} per cursor, 95% CI [{t['ci95'][0]:+.4f}, "
              f"{t['ci95'][1]:+.4f}], p = {t['p_value']:.4f} ({t['test']})")
    print(f"  replay speed: int8 / float32 wall = {wall['int8'] / wall['float32']:.2f} "
          f"({wall['float32'] / wall['int8']:.2f}x)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summ, "paired": paired, "identical": same,
                                              "cursors": len(cases), "wall_s": wall}, indent=2) + "\n")


if __name__ == "__main__":
    main()
