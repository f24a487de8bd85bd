"""How many CTranslate2 threads should `serve.engine_threads` be on this machine, for this model?

    python benchmarks/bench_engine_threads.py [--model-dir models/base] [--threads 1,2] [--runs 30]

CTranslate2's own ``generate_batch`` (no batcher, no gateway), greedy 32 new tokens after the ~200-token stdlib
prompt of bench_serve.py, one row, with OpenMP's passive waits (``OMP_WAIT_POLICY=PASSIVE``, as `ownllm serve` sets).
Each thread count is timed two ways: calls back to back (a busy engine) and with a 20 ms pause before each call
(an editor's requests arrive apart; the engine's threads have gone to sleep). p50 per cell; each thread count runs
in its own process (CTranslate2 sizes its OpenMP pool once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 32


def measure(model_dir: str, threads: int, runs: int) -> dict:
    import ctranslate2
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_serve import real_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = ctranslate2.Generator(str(Path(model_dir) / "ct2"), intra_threads=threads, inter_threads=1)
    start = tok.convert_ids_to_tokens(tok(real_prompt(tok))["input_ids"])
    out = {}
    for mode, pause in (("back to back", 0.0), ("20 ms apart", 0.02)):
        times = []
        for i in range(runs + 3):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            gen.generate_batch([start], max_length=NEW_TOKENS, min_length=NEW_TOKENS, include_prompt_in_result=False)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        out[mode] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REPO / "models" / "base"), help="a model directory with ct2/")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model_dir, args.child, args.runs)))
        return
    if not (Path(args.model_dir) / "ct2" / "model.bin").is_file():
        raise SystemExit(f"{args.model_dir}/ct2/model.bin not found: run `ownllm export` (or pass --model-dir)")
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "HF_HUB_OFFLINE": "1"}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; model {args.model_dir}; "
          f"{NEW_TOKENS} greedy tokens, p50 of {args.runs}; OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    for n in [int(x) for x in args.threads.split(",")]:
        res = subprocess.run([sys.executable, __file__, "--model-dir", args.model_dir, "--runs", str(args.runs),
                              "--child", str(n)], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{n} threads failed: {res.stderr[-2000:]}")
        got = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  {n} thread(s): " + "   ".join(f"{k} {1000 * v:8.1f} ms" for k, v in got.items()))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
