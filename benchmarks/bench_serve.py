"""Gateway latency vs direct `generate`, and feedback-event ingest rate into the store.

    python benchmarks/bench_serve.py [--model-dir models/base] [--requests 30] [--pg-url URL]

1. p50/p95 latency of a 32-token completion through `ownllm serve` (a separate process, real HTTP on
   127.0.0.1, auth + routing + logging to SQLite included) next to calling the same model's `generate`
   directly in this process, interleaved so both see the same machine load. Target: overhead <= 10%.
2. Sustained feedback ingest (POST /v1/feedback) into PostgreSQL (--pg-url, default $OWNLLM_TEST_PG_URL):
   one event per request from concurrent clients, and batches of 100 events per request. Target: >= 1000/s.

Without models/base, a model with the architecture of params.yaml `model:` (random weights) and a BPE
tokenizer fitted on stdlib code are built in a temp dir: latency depends on the shape, not the weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from feedback import store  # noqa: E402
from feedback.db import session_factory, upgrade  # noqa: E402
from pipeline.fim_prompt import SPECIAL_TOKENS  # noqa: E402

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
SPECIAL = list(SPECIAL_TOKENS)


def build_model(out: Path) -> Path:
    """params.yaml's model shape with random weights, plus a BPE tokenizer fitted on stdlib code."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.config import load_params

    p = load_params(REPO / "params.yaml")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(stdlib.glob("*.py"))[:60]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=p.tokenizer.vocab_size, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[4],
                                 additional_special_tokens=SPECIAL[1:])
    hf.save_pretrained(out)
    m = p.model
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                      intermediate_size=m.intermediate_size or 4 * m.d_model, max_position_embeddings=m.max_seq_len,
                      eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def start_server(db_url: str, model_dir: Path, port: int, threads: int) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "ownllm"), "serve", "--db-url", db_url, "--model-dir", str(model_dir),
           "--port", str(port), "--params", str(REPO / "params.yaml"), "--num-threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"ownllm serve exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("ownllm serve did not come up in 180 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def bench_latency(model_dir: Path, n: int, max_tokens: int, threads: int) -> None:
    import torch

    from feedback.backends import GenRequest, LocalBackend

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    db = f"sqlite:///{tmp / 'feedback.db'}"
    upgrade(db)
    with session_factory(db).begin() as s:
        key = store.create_key(s, "bench")
    port = free_port()
    server = start_server(db, model_dir, port, threads)
    backend = LocalBackend(model_dir, num_threads=threads)  # same threads as the server: a like-for-like baseline
    req = GenRequest(prompt=PROMPT, max_tokens=max_tokens, temperature=0)
    body = {"model": "auto", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "language": "python"}
    direct, gateway, toks_d, toks_g = [], [], [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {key}"},
                          timeout=120) as client:
            for i in range(n + 3):  # 3 warm-up rounds, then interleaved measurements
                t0 = time.perf_counter()
                ids = backend.prompt_ids(req)  # tokenisation is part of a direct call too
                with torch.inference_mode():
                    out = backend.model.generate(**backend._gen_kwargs(req, ids))
                t1 = time.perf_counter()
                r = client.post("/completions", json=body)
                t2 = time.perf_counter()
                r.raise_for_status()
                if i >= 3:
                    direct.append(t1 - t0)
                    gateway.append(t2 - t1)
                    toks_d.append(out.shape[1] - len(ids))
                    toks_g.append(r.json()["usage"]["completion_tokens"])
    finally:
        server.terminate()
        server.wait(30)
    d50, d95, g50, g95 = pct(direct, .5), pct(direct, .95), pct(gateway, .5), pct(gateway, .95)
    print(f"model: {model_dir}  torch threads: {threads}  requests: {n}  tokens/completion: direct {statistics.mean(toks_d):.1f}, "
          f"gateway {statistics.mean(toks_g):.1f}")
    print(f"direct generate   p50 {d50 * 1000:8.1f} ms   p95 {d95 * 1000:8.1f} ms")
    print(f"gateway (HTTP)    p50 {g50 * 1000:8.1f} ms   p95 {g95 * 1000:8.1f} ms")
    print(f"gateway overhead  p50 {100 * (g50 / d50 - 1):+.1f}%   p95 {100 * (g95 / d95 - 1):+.1f}%   "
          f"(ratio p50 {g50 / d50:.3f})  target <= +10%")


def bench_ingest(pg_url: str, model_dir: Path, singles: int, batches: int, clients: int, threads: int) -> None:
    """Feedback events/s over HTTP into PostgreSQL, through a gateway process."""
    from sqlalchemy import insert, text

    from feedback.models import Completion, utcnow
    from feedback.db import make_engine

    # A fresh schema state: the bench owns this database (never point it at production).
    upgrade(pg_url)
    eng = make_engine(pg_url)
    with eng.begin() as c:
        c.execute(text("TRUNCATE feedback_events, completions, api_keys, users, experiment_arms, experiments, "
                       "bounties, model_versions RESTART IDENTITY CASCADE"))
    f = session_factory(eng)
    total = singles + batches * 100
    with f.begin() as s:
        key = store.create_key(s, "bench")
        user = store.authenticate(s, key)
        v = store.register_model_version(s, "bench", str(model_dir), state="all")
        now = utcnow()
        s.execute(insert(Completion), [dict(request_id=f"cmpl-bench-{i}", choice_index=0, user_id=user.id,
                                            model_version_id=v.id, language="python", prompt="p", completion="c",
                                            prompt_hash="h", finish_reason="stop", prompt_tokens=1,
                                            completion_tokens=1, latency_ms=1.0, created_at=now)
                                       for i in range(total)])
    port = free_port()
    server = start_server(pg_url, model_dir, port, threads)
    base, headers = f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {key}"}
    try:
        def send_singles(chunk: range) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
                for i in chunk:
                    c.post("/feedback", json={"id": f"cmpl-bench-{i}", "event": "accepted" if i % 3 else "rejected",
                                              "time_to_decision_ms": 500}).raise_for_status()

        step = singles // clients
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(send_singles, [range(k * step, (k + 1) * step) for k in range(clients)]))
        single_rate = clients * step / (time.perf_counter() - t0)

        def send_batches(chunk: range) -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=60) as c:
                for b in chunk:
                    ids = range(singles + b * 100, singles + (b + 1) * 100)
                    c.post("/feedback", json={"events": [{"id": f"cmpl-bench-{i}", "event": "accepted"}
                                                         for i in ids]}).raise_for_status()

        bstep = batches // 4
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send_batches, [range(k * bstep, (k + 1) * bstep) for k in range(4)]))
        batch_rate = 4 * bstep * 100 / (time.perf_counter() - t0)
    finally:
        server.terminate()
        server.wait(30)
    with f() as s:
        stored = store.counts(s)["feedback_events"]
    print(f"feedback ingest into PostgreSQL ({pg_url.split('@')[-1]}), HTTP via ownllm serve:")
    print(f"  1 event/request, {clients} clients   {single_rate:8.0f} events/s")
    print(f"  100 events/request, 4 clients  {batch_rate:8.0f} events/s   target >= 1000/s")
    print(f"  stored {stored} of {clients * step + 4 * bstep * 100} sent")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REPO / "models" / "base"))
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--pg-url", default=os.environ.get("OWNLLM_TEST_PG_URL"))
    ap.add_argument("--singles", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, server and baseline alike (1: stable on a shared machine)")
    args = ap.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        model_dir = build_model(Path(tempfile.mkdtemp(prefix="bench-model-")))
        print(f"{args.model_dir} not found: using a random-weight model of params.yaml's shape in {model_dir}")
    if not args.skip_latency:
        bench_latency(model_dir, args.requests, args.max_tokens, args.threads)
    if args.pg_url:
        bench_ingest(args.pg_url, model_dir, args.singles, args.batches, args.clients, args.threads)
    else:
        print("feedback ingest: skipped (no --pg-url / $OWNLLM_TEST_PG_URL)")


if __name__ == "__main__":
    main()
