"""Evaluation speed: sandbox overhead, batched+KV generation, and a whole HumanEval n=1 run.

    .venv/bin/python benchmarks/bench_eval.py [--model models/base] [--programs 82] [--gen-prompts 32] [--humaneval]

1. The same HumanEval programs (canonical solutions, all passing) executed through the sandbox and
   through plain ``subprocess.run([python, -I, -S, file])``, same worker count: samples/s and the ratio.
   Also checks that all 164 canonical solutions score pass@1 = 1.0 when ``--programs 164``.
2. Generation tokens/s on HumanEval prompts: batched (eval.humaneval.batch_size) with KV cache, next to
   unbatched ``generate`` (batch 1, KV cache) and batch 1 without KV cache, in the same run.
3. ``--humaneval``: the whole ``ownllm eval humaneval`` path (164 problems, n=1, params defaults), timed.

Without ``--model`` (or when models/base is missing) the model is the embedded default's shape from
params.yaml (``model:``) with random weights and a BPE tokenizer of ``tokenizer.vocab_size`` trained on a
few stdlib files: the speed of a model is its shape, not its weights. Random weights never emit
``<|endoftext|>``, so every sample runs to max_new_tokens: the worst case.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.eval.humaneval import STOP_SEQUENCES, load_problems, program_for, score  # noqa: E402
from pipeline.eval.sandbox import python_argv, sandbox_from_config  # noqa: E402



def bench_sandbox(params, n: int) -> None:
    problems = load_problems()[:n]
    programs = [program_for(p, p["canonical_solution"]) for p in problems]
    sandbox = sandbox_from_config(params.eval.sandbox)
    workers = sandbox.workers

    def plain(program: str) -> bool:
        with tempfile.TemporaryDirectory() as d:
            Path(d, "main.py").write_text(program)
            return subprocess.run(python_argv("main.py"), cwd=d, capture_output=True, timeout=10).returncode == 0

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        plain_ok = sum(pool.map(plain, programs))
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    summary, _ = score([{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems],
                       problems, sandbox, [1])
    sandbox_s = time.perf_counter() - t
    print(f"sandbox: {sandbox.isolation.describe()}, {workers} workers, {n} HumanEval canonical programs")
    print(f"  plain subprocess : {n / plain_s:6.1f} samples/s ({plain_s:.2f} s, {plain_ok}/{n} passed)")
    print(f"  sandbox          : {n / sandbox_s:6.1f} samples/s ({sandbox_s:.2f} s, pass@1 = {summary['pass@1']:.3f})")
    print(f"  overhead         : x{sandbox_s / plain_s:.2f} wall time vs plain subprocess")


def embedded_model(params, out: Path) -> Path:
    from benchmarks.tiny_models import stdlib_texts, tiny_model

    texts = stdlib_texts(["textwrap.py", "argparse.py", "typing.py", "inspect.py", "pathlib.py", "subprocess.py",
                          "collections/__init__.py", "dataclasses.py"])
    return tiny_model(out, texts, params.tokenizer.vocab_size, params.model)


def bench_generation(params, model_dir: Path, n_prompts: int) -> None:
    from pipeline.eval.generate import GenerationSettings, GenerationStats, generate, load_model

    cfg = params.eval.humaneval
    model, tok = load_model(model_dir, params.eval.num_threads)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [p["prompt"] for p in load_problems()[:n_prompts]]
    print(f"generation: {n_params / 1e6:.1f}M params, {n_prompts} HumanEval prompts, max_new_tokens="
          f"{cfg.max_new_tokens}, torch threads={params.eval.num_threads}")
    rows = []
    for label, bs, cache, count in (("batched + KV cache", cfg.batch_size, True, n_prompts),
                                    ("unbatched + KV cache", 1, True, max(2, n_prompts // 4)),
                                    ("unbatched, no KV cache", 1, False, 2)):
        stats = GenerationStats()
        generate(model, tok, prompts[:count], GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=bs,
                                                                 use_cache=cache, stop=STOP_SEQUENCES), stats=stats)
        rows.append((label, bs, stats))
        print(f"  {label:24s} batch {bs:3d}: {stats.tokens_per_s:8.1f} tokens/s ({stats.new_tokens} tokens in "
              f"{stats.seconds:.1f} s)")
    print(f"  speed-up batched+KV vs unbatched generate: x{rows[0][2].tokens_per_s / rows[1][2].tokens_per_s:.2f}")


def bench_humaneval(params, model_dir: Path) -> None:
    from pipeline.eval.humaneval import run_humaneval

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        p = params.model_copy(update={"eval": params.eval.model_copy(update={"out": d})})
        summary = run_humaneval(p, "bench", str(model_dir))
    total = time.perf_counter() - t
    print(f"humaneval n=1, {summary['problems']} problems: {total:.1f} s total (generation {summary['gen_seconds']:.1f} s,"
          f" {summary['gen_tokens_per_s']:.0f} tokens/s), pass@1 = {summary['pass@1']:.3f}, "
          f"{summary['timed_out']} timed out")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", help="HF model dir (default: models/base if present, else the embedded shape)")
    ap.add_argument("--programs", type=int, default=82)
    ap.add_argument("--gen-prompts", type=int, default=32)
    ap.add_argument("--humaneval", action="store_true", help="also time a whole HumanEval n=1 run")
    ap.add_argument("--skip-sandbox", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = load_params(args.params)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if not args.skip_sandbox:
        bench_sandbox(params, args.programs)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model or params.eval.model)
        if not (model_dir / "config.json").is_file():
            model_dir = embedded_model(params, Path(tmp))
            print(f"model: embedded-default shape, random weights ({params.model.d_model}d x {params.model.n_layers}L)")
        if args.gen_prompts:
            bench_generation(params, model_dir, args.gen_prompts)
        if args.humaneval:
            bench_humaneval(params, model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
