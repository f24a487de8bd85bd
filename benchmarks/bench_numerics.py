"""What portable numerics cost: training tokens/s of the embedded default's model, portable vs native, same run.

Each measurement is a fresh process (the pins are read when torch loads) that builds params.yaml's Llama
(model.*, tokenizer.vocab_size, shards.max_seq_len, train.global_batch_size) and times AdamW steps with gradient
clipping on random tokens. Modes are interleaved round by round, so load from other work on a shared machine
falls on both; the median per mode and the ratio are printed, per wall second and per CPU second of the process
(the steadier measure when other jobs share the cores; with --threads 1 it is the work each mode costs).

    python benchmarks/bench_numerics.py [--params params.yaml] [--rounds 3] [--steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time
from pipeline.config import load_params
from pipeline import numerics
params = load_params(sys.argv[1]); steps = int(sys.argv[2])
numerics.apply(params.numerics)
import torch
from transformers import LlamaConfig, LlamaForCausalLM
m, seq, bs = params.model, params.shards.max_seq_len, params.train.global_batch_size
vocab = params.tokenizer.vocab_size
inter = m.intermediate_size or -(-int(8 * m.d_model / 3) // 64) * 64
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=m.d_model, intermediate_size=inter,
    num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
    max_position_embeddings=m.max_seq_len, tie_word_embeddings=m.tie_word_embeddings))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
def step():
    x = torch.randint(0, vocab, (bs, seq), generator=g)
    model(input_ids=x, labels=x).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
step()  # warm-up
t, c = time.perf_counter(), time.process_time()
for _ in range(steps):
    step()
dt, dc = time.perf_counter() - t, time.process_time() - c
rec = numerics.record(params.numerics)
print(json.dumps({"tokens_per_s": steps * bs * seq / dt, "tokens_per_cpu_s": steps * bs * seq / dc,
                  "capability": rec["aten_cpu_capability"],
                  "mkl_cbwr": rec["mkl_cbwr"], "threads": rec["threads"]}))
"""


def run(params: Path, steps: int) -> dict:
    from pipeline import numerics
    from pipeline.config import load_params

    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV}
    env.update(numerics.environment(load_params(params).numerics), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", WORKER, str(params), str(steps)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, help="intra-op threads in every mode (default: numerics.intra_op_threads)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    base = yaml.safe_load(Path(args.params).read_text())
    tmp = REPO / "var" / "bench_numerics"
    tmp.mkdir(parents=True, exist_ok=True)
    # native: the libraries' own choice, with the same thread count as portable (threads are not what is measured)
    threads = args.threads or base.get("numerics", {}).get("intra_op_threads") or 2
    modes = {
        "native": {"mode": "native", "intra_op_threads": threads, "inter_op_threads": 1},
        "portable": {**base.get("numerics", {}), "mode": "portable", "intra_op_threads": threads},
        "portable-avx2": {**base.get("numerics", {}), "mode": "portable", "cpu_capability": "avx2",
                          "intra_op_threads": threads},
    }
    files = {}
    for name, section in modes.items():
        files[name] = tmp / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump({**base, "numerics": section}))
    speeds: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(args.rounds):
        for name in modes:
            res = run(files[name], args.steps)
            speeds[name].append(res["tokens_per_s"])
            cpu[name].append(res["tokens_per_cpu_s"])
            print(f"round {r + 1} {name:<14} {res['tokens_per_s']:8.0f} tok/s  {res['tokens_per_cpu_s']:8.0f} tok/CPU-s  "
                  f"({res['capability']}, MKL_CBWR={res['mkl_cbwr']}, threads {res['threads']})", flush=True)
    med = {name: statistics.median(v) for name, v in speeds.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    for name in modes:
        print(f"median {name:<14} {med[name]:8.0f} tok/s (x{med[name] / med['native']:.2f} of native)  "
              f"{med_cpu[name]:8.0f} tok/CPU-s (x{med_cpu[name] / med_cpu['native']:.2f})")


if __name__ == "__main__":
    main()
