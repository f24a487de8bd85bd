"""Serving at completion speed: the engine, the gateway, concurrency, and feedback ingest, each against its
baseline in the same run (interleaved, so both sides see the same machine load), reported as ratios.

    python benchmarks/bench_serve.py [--model-dir models/base] [--pg-url URL] [--only engine,gateway,load,ingest,llama]

1. engine   greedy 32 new tokens (forced: min = max = 32) after a ~200-token prompt of real stdlib code, p50/p90:
            Hugging Face `generate` vs CTranslate2 float32 vs int8, for the default model and a 125M-shaped
            Llama (d768 x 12 layers, vocab 2048, random weights). Target: CT2 >= 3x lower p50 at 125M.
2. gateway  the same completion through `ownllm serve` (real HTTP, auth, routing, logging to SQLite):
            engine=ctranslate2 vs engine=transformers, and the CT2 gateway vs the CT2 backend called directly
            in this process (the gateway's overhead; target <= 10%). Also the HTTP floor: the same request to a
            do-nothing ASGI app under the same uvicorn (httptools, uvloop) in its own process, sent at the same
            point of the cycle, which is what any HTTP server costs here before the gateway does anything.
   phases   (--only phases) where the gateway's time goes: its store phases timed in-process.
3. load     1, 8, 32 and 128 concurrent clients against `ownllm serve` on the default model: the batched CT2
            engine vs the transformers backend (one at a time): throughput, p50/p99, 5xx. Target at 32: >= 4x
            throughput, p99 < 2 s, no 5xx.
4. ingest   one feedback event per request from 32 clients into PostgreSQL (--pg-url, default
            $OWNLLM_TEST_PG_URL) through `ownllm serve`: one transaction per request (the baseline) vs the group
            commit (feedback/ingest.py) with --workers 1 and N; 100-event batches for reference. Target >= 1,000
            events/s, none lost (rows counted). Its clients are aiohttp (lighter than httpx on shared cores).
5. llama    the same completion through the gateway to llama.cpp's `llama-server` (an upstream, `fim: template`,
            GGUF f32 of the same weights; built by scripts/build_llama_server.sh) vs the gateway's local engines
            (ctranslate2, transformers), and llama-server called directly (the gateway's overhead on it).
            Not in the default --only (it needs the built server): --only llama.

Without --model-dir (or when it is missing), models of params.yaml's shape and the 125M shape with random
weights and a BPE tokenizer fitted on stdlib code are built in a temp dir: latency depends on the shape, not
the weights. Clients are asyncio + httpx in this process, on the same cores as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `ownllm serve` sets it: the baselines run alike

from feedback import store  # noqa: E402
from feedback.db import session_factory, upgrade  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NEW_TOKENS = 32
PROMPT_TOKENS = 200


# ------------------------------------------------------------------------------------------------ models
def build_model(out: Path, d_model: int | None = None, n_layers: int | None = None, n_heads: int | None = None,
                intermediate: int | None = None, max_pos: int | None = None) -> Path:
    """A Llama of params.yaml's shape (or the given one) with random weights, plus its CT2 conversion."""
    from benchmarks.tiny_models import stdlib_texts, tiny_model
    from pipeline.config import load_params
    from pipeline.train.export import convert_to_ct2

    p = load_params(REPO / "params.yaml")
    shape = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_heads,
             "intermediate_size": intermediate, "max_seq_len": max_pos}
    tiny_model(out, stdlib_texts(first=60), p.tokenizer.vocab_size, p.model,
               **{k: v for k, v in shape.items() if v is not None})
    convert_to_ct2(out)
    return out


def real_prompt(tok) -> str:
    """~PROMPT_TOKENS tokens of real stdlib code (the start of textwrap.py), cut at a token boundary."""
    ids = tok((STDLIB / "textwrap.py").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:PROMPT_TOKENS])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"


# ------------------------------------------------------------------------------------------------ 1. engine
def bench_engine(label: str, model_dir: Path, runs: int, threads: int) -> dict:
    import torch

    from feedback.backends import GenRequest, LocalBackend
    from feedback.engine import CT2Engine

    hf = LocalBackend(model_dir, num_threads=threads)
    prompt = real_prompt(hf.tok)
    ids = hf.prompt_ids(GenRequest(prompt=prompt, max_tokens=NEW_TOKENS, temperature=0))
    toks = hf.tok.convert_ids_to_tokens(ids)
    engines = {q: CT2Engine(model_dir, q, threads, tok=hf.tok) for q in ("float32", "int8")}
    x = torch.tensor([ids])

    def run_hf() -> int:
        with torch.inference_mode():
            out = hf.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=hf.pad_id)
        return out.shape[1] - len(ids)

    def run_ct2(q: str) -> int:
        res = engines[q].generator.generate_batch([toks], max_length=NEW_TOKENS, min_length=NEW_TOKENS,
                                                  include_prompt_in_result=False)
        return len(res[0].sequences_ids[0])

    fns = {"HF generate": run_hf, "CT2 float32": lambda: run_ct2("float32"), "CT2 int8": lambda: run_ct2("int8")}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(runs + 2):  # 2 warm-up rounds, then interleaved
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
                assert n == NEW_TOKENS, (name, n)
    params = sum(p.numel() for p in hf.model.parameters())
    print(f"\n[engine] {label}: {params / 1e6:.1f}M params, prompt {len(ids)} tokens, {NEW_TOKENS} new tokens, "
          f"{runs} runs, {threads} threads")
    base = pct(times["HF generate"], .5)
    for name, xs in times.items():
        print(f"  {name:12s} p50 {ms(pct(xs, .5))}  p90 {ms(pct(xs, .9))}  speed-up p50 {base / pct(xs, .5):5.2f}x")
    for e in engines.values():
        e.close()
    return {k: pct(v, .5) for k, v in times.items()}


# ------------------------------------------------------------------------------------------------ servers
def start_server(db_url: str, model_dir: Path, port: int, threads: int, *extra: str,
                 params: Path = REPO / "params.yaml") -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "ownllm"), "serve", "--db-url", db_url, "--model-dir", str(model_dir),
           "--port", str(port), "--params", str(params), "--num-threads", str(threads), "--engine-threads", str(threads),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    return wait_healthy(proc, f"http://127.0.0.1:{port}/healthz", "ownllm serve", 300,
                        lambda: proc.stderr.read()[-2000:])


def wait_healthy(proc: subprocess.Popen, url: str, name: str, timeout_s: float, why=None) -> subprocess.Popen:
    """``proc`` once ``url`` answers 200; SystemExit naming ``name`` (and ``why()``) if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}" + (f": {why()}" if why else ""))
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not come up in {timeout_s:.0f} s")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_store(tmp: Path, name: str) -> tuple[str, str]:
    db = f"sqlite:///{tmp / f'{name}.db'}"
    upgrade(db)
    with session_factory(db).begin() as s:
        key = store.create_key(s, "bench")
    return db, key


def two_gateways(model_dir: Path, threads: int) -> tuple[dict, list[subprocess.Popen]]:
    """`ownllm serve` with engine=ctranslate2 and engine=transformers, each with its own SQLite store."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    urls, procs = {}, []
    for engine in ("ctranslate2", "transformers"):
        db, key = fresh_store(tmp, engine)
        port = free_port()
        procs.append(start_server(db, model_dir, port, threads, "--engine", engine))
        urls[engine] = (f"http://127.0.0.1:{port}/v1", key)
    return urls, procs


FLOOR_APP = """
import sys, uvicorn

async def app(scope, receive, send):  # reads the body, answers a completion-sized JSON: HTTP and nothing else
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"id":"cmpl-0","object":"text_completion","choices":[{"text":"' + b"x" * 96 + b'","index":0}]}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def start_floor_server(port: int) -> subprocess.Popen:
    """The HTTP floor: a do-nothing ASGI app under the gateway's uvicorn stack, in its own process."""
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_APP, str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    return wait_healthy(proc, f"http://127.0.0.1:{port}/", "the HTTP floor server", 60, lambda: proc.stderr.read())


# ------------------------------------------------------------------------------------------------ 2. gateway
def bench_gateway(label: str, model_dir: Path, runs: int, threads: int) -> None:
    from feedback.backends import GenRequest
    from feedback.engine import CT2Backend

    direct = CT2Backend(model_dir, num_threads=threads)
    prompt = real_prompt(direct.tok)
    req = GenRequest(prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    body = {"model": "auto", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "language": "python"}
    urls, procs = two_gateways(model_dir, threads)
    floor_port = free_port()
    procs.append(start_floor_server(floor_port))
    times: dict[str, list[float]] = {"CT2 backend, direct": [], "HTTP floor": [], "gateway, ctranslate2": [],
                                     "gateway, transformers": []}
    tokens: dict[str, list[int]] = {k: [] for k in times if k != "HTTP floor"}
    try:
        clients = {e: httpx.Client(base_url=u, headers={"Authorization": f"Bearer {k}"}, timeout=300)
                   for e, (u, k) in urls.items()}
        floor = httpx.Client(base_url=f"http://127.0.0.1:{floor_port}/v1", headers={"Authorization": "Bearer x"},
                             timeout=60)
        for i in range(runs + 3):
            t0 = time.perf_counter()
            out = direct.complete(req)
            t1 = time.perf_counter()
            got = {}
            for engine, c in clients.items():
                if engine == "transformers":  # the floor's request also follows a direct call, as the gateway's
                    direct.complete(req)
                    f0 = time.perf_counter()
                    floor.post("/completions", json=body).raise_for_status()
                    floor_dt = time.perf_counter() - f0
                s0 = time.perf_counter()
                r = c.post("/completions", json=body)
                got[engine] = (time.perf_counter() - s0, r)
                r.raise_for_status()
            if i >= 3:
                times["HTTP floor"].append(floor_dt)
                times["CT2 backend, direct"].append(t1 - t0)
                tokens["CT2 backend, direct"].append(out.choices[0].completion_tokens)
                for engine, (dt, r) in got.items():
                    times[f"gateway, {engine}"].append(dt)
                    tokens[f"gateway, {engine}"].append(r.json()["usage"]["completion_tokens"])
    finally:
        stop(*procs)
        direct.engine.close()
    print(f"\n[gateway] {label}: {runs} sequential requests, prompt ~{PROMPT_TOKENS} tokens, max_tokens {NEW_TOKENS}")
    for name, xs in times.items():
        n_tok = f"  tokens {statistics.mean(tokens[name]):.1f}" if name in tokens else "  (no generation)"
        print(f"  {name:22s} p50 {ms(pct(xs, .5))}  p90 {ms(pct(xs, .9))}{n_tok}")
    ct2, hf, d = (pct(times[k], .5) for k in ("gateway, ctranslate2", "gateway, transformers", "CT2 backend, direct"))
    print(f"  gateway ctranslate2 vs transformers: p50 {hf / ct2:.2f}x faster")
    print(f"  gateway overhead over the CT2 backend called directly: p50 {100 * (ct2 / d - 1):+.1f}%  "
          f"p90 {100 * (pct(times['gateway, ctranslate2'], .9) / pct(times['CT2 backend, direct'], .9) - 1):+.1f}%"
          f"  (target <= +10%)")
    diffs = [g - d for g, d in zip(times["gateway, ctranslate2"], times["CT2 backend, direct"])]
    print(f"  paired (each gateway request minus the direct call just before it): median {ms(pct(diffs, .5))}, "
          f"= {100 * pct(diffs, .5) / d:+.1f}% of the direct p50")
    floor_p50 = pct(times["HTTP floor"], .5)
    print(f"  of which the HTTP floor (do-nothing app, same server stack): p50 {ms(floor_p50)} = "
          f"{100 * floor_p50 / d:+.1f}% of the direct p50; the gateway's own: {ms(pct(diffs, .5) - floor_p50)} = "
          f"{100 * (pct(diffs, .5) - floor_p50) / d:+.1f}%")


def bench_phases(model_dir: Path, runs: int, threads: int) -> None:
    """Where a gateway request's time goes: the service's store phases timed in-process (the server runs in a
    thread of this process, its client too, so the round trip is inflated; the phases are what to read)."""
    import collections
    import functools

    from transformers import AutoTokenizer

    from feedback.app import create_app, serve_in_thread
    from feedback.config import ServeConfig

    db, key = fresh_store(Path(tempfile.mkdtemp(prefix="bench-phases-")), "phases")
    with session_factory(db).begin() as s:
        store.register_model_version(s, "base", str(model_dir), state="all")
    app = create_app(ServeConfig(db_url=db, model_dir=str(model_dir), num_threads=threads, engine_threads=threads))
    svc = app.state.service
    spent: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name].append(time.perf_counter() - t0)
        return wrapper

    labels = {"_prepare": "key + routing + filter (lookup-cache misses)", "_write_pending": "pending rows "
              "(overlapped with decoding)", "_complete_rows": "completing the rows (after the reply)"}
    for name in labels:
        setattr(svc, name, timed(name, getattr(svc, name)))
    body = {"model": "auto", "prompt": real_prompt(AutoTokenizer.from_pretrained(model_dir)),
            "max_tokens": NEW_TOKENS, "temperature": 0, "language": "python"}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                                   timeout=120) as c:
        for i in range(runs + 3):
            if i == 3:
                spent.clear()
            c.get("/metrics")
            t0 = time.perf_counter()
            c.get("/metrics")
            spent["http"].append(time.perf_counter() - t0)
            c.post("/v1/completions", json=body).raise_for_status()
    app.state.backends.cache.clear()
    print(f"\n[phases] default: {runs} sequential completions through the gateway, store phases timed in-process")
    for name, label in {**labels, "http": "GET /metrics round trip (HTTP alone)"}.items():
        print(f"  {label:45s} p50 {ms(pct(spent[name], .5)) if spent[name] else '      -  '}  ({len(spent[name])} calls)")
    cache = svc.lookups
    print(f"  lookup cache (serve.lookup_cache_s {cache.ttl_s:g} s): {cache.hits} hits, {cache.misses} misses")


# ------------------------------------------------------------------------------------------------ 5. llama.cpp
def start_llama_server(gguf: Path, port: int, threads: int) -> subprocess.Popen:
    spec = importlib.util.spec_from_file_location("hf_to_gguf", REPO / "scripts" / "hf_to_gguf.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    binary = Path(os.environ.get("OWNLLM_LLAMA_SERVER") or conv.DEFAULT_TREE / "bin" / "llama-server")
    proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "1",
                             "-t", str(threads), "--no-webui",
                             "--poll", "0"],  # no spin-waiting for work (as OMP_WAIT_POLICY=PASSIVE for the others)
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_healthy(proc, f"http://127.0.0.1:{port}/health", "llama-server", 120)


def bench_llama(label: str, model_dir: Path, runs: int, threads: int) -> None:
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    gguf = tmp / "model-f32.gguf"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts" / "hf_to_gguf.py"), str(model_dir), str(gguf)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"\n[llama] {label}: GGUF f32 conversion {time.perf_counter() - t0:.1f} s")
    prompt = real_prompt(AutoTokenizer.from_pretrained(model_dir))
    body = {"model": "auto", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "language": "python"}
    lport = free_port()
    procs = [start_llama_server(gguf, lport, threads)]
    sides: dict[str, tuple[str, dict]] = {
        # llama.cpp's own API, with the gateway's prompt: `<|endoftext|>` + the code (template mode's plain prompt)
        "llama-server, direct": (f"http://127.0.0.1:{lport}/v1", {})}
    try:
        for name, extra in (("gateway -> llama-server", ("--backend", "openai", "--upstream-url",
                                                        f"http://127.0.0.1:{lport}/v1")),
                            ("gateway, ctranslate2", ("--engine", "ctranslate2")),
                            ("gateway, transformers", ("--engine", "transformers"))):
            db, key = fresh_store(tmp, name.split()[-1].replace("-", "_"))
            if "--backend" in extra:  # `ownllm serve` registers --model-dir only for the local backend
                with session_factory(db).begin() as s:
                    store.register_model_version(s, model_dir.name, str(model_dir), state="all")
            port = free_port()
            procs.append(start_server(db, model_dir, port, threads, *extra))
            sides[name] = (f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {key}"})
        clients = {n: httpx.Client(base_url=u, headers=h, timeout=300) for n, (u, h) in sides.items()}
        times: dict[str, list[float]] = {n: [] for n in sides}
        tokens: dict[str, list[int]] = {n: [] for n in sides}
        texts: dict[str, str] = {}
        for i in range(runs + 3):
            for name, c in clients.items():
                b = dict(body, prompt="<|endoftext|>" + prompt, model="m") if name.endswith("direct") else body
                s0 = time.perf_counter()
                r = c.post("/completions", json=b)
                dt = time.perf_counter() - s0
                if r.status_code != 200:
                    raise SystemExit(f"[llama] {name}: {r.status_code} {r.text[:500]}")
                if i >= 3:
                    times[name].append(dt)
                    tokens[name].append(r.json()["usage"]["completion_tokens"])
                    texts[name] = r.json()["choices"][0]["text"]
    finally:
        stop(*procs)
    print(f"[llama] {label}: {runs} sequential requests each, interleaved, prompt ~{PROMPT_TOKENS} tokens, "
          f"max_tokens {NEW_TOKENS}, greedy, {threads} threads everywhere")
    base = pct(times["gateway, ctranslate2"], .5)
    for name, xs in times.items():
        print(f"  {name:24s} p50 {ms(pct(xs, .5))}  p90 {ms(pct(xs, .9))}  tokens {statistics.mean(tokens[name]):.1f}"
              f"  p50 vs gateway ctranslate2 {pct(xs, .5) / base:5.2f}x")
    g, d = pct(times["gateway -> llama-server"], .5), pct(times["llama-server, direct"], .5)
    print(f"  gateway overhead over llama-server called directly: p50 {1000 * (g - d):+.1f} ms "
          f"({100 * (g / d - 1):+.1f}%)")
    same = texts["gateway -> llama-server"] == texts["gateway, transformers"]
    print(f"  greedy text, gateway -> llama-server vs gateway transformers: {'identical' if same else 'DIFFERENT'}")


# ------------------------------------------------------------------------------------------------ 3. load
async def _load(url: str, key: str, body: dict, clients: int, total: int) -> tuple[float, list[float], int, int]:
    lat: list[float] = []
    errors_5xx = other = 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as c:
        async def client():
            nonlocal errors_5xx, other
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                r = await c.post("/completions", json=body)
                lat.append(time.perf_counter() - t0)
                if r.status_code >= 500:
                    errors_5xx += 1
                elif r.status_code != 200:
                    other += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return wall, lat, errors_5xx, other


def bench_load(model_dir: Path, threads: int, levels: list[int]) -> None:
    from transformers import AutoTokenizer

    prompt = real_prompt(AutoTokenizer.from_pretrained(model_dir))
    body = {"model": "auto", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "language": "python"}
    urls, procs = two_gateways(model_dir, threads)
    for url, key in urls.values():  # warm-up: the model loads on the first request
        for _ in range(3):
            httpx.post(url + "/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                       timeout=300).raise_for_status()
    print(f"\n[load] default model through `ownllm serve`, max_tokens {NEW_TOKENS}, greedy; requests per level = "
          f"max(32, 2 x clients); batched CT2 engine vs transformers (one generation at a time)")
    print(f"  {'clients':>7} {'engine':>13} {'req/s':>8} {'p50':>11} {'p99':>11} {'5xx':>4} {'4xx':>4}  ratio req/s")
    try:
        for clients in levels:
            total = max(32, 2 * clients)
            rates = {}
            for engine in ("transformers", "ctranslate2"):
                url, key = urls[engine]
                wall, lat, e5, e4 = asyncio.run(_load(url, key, body, clients, total))
                rates[engine] = total / wall
                ratio = f"{rates[engine] / rates['transformers']:.2f}x" if engine == "ctranslate2" else ""
                print(f"  {clients:>7} {engine:>13} {rates[engine]:8.1f} {ms(pct(lat, .5))} {ms(pct(lat, .99))} "
                      f"{e5:>4} {e4:>4}  {ratio}")
    finally:
        stop(*procs)


# ------------------------------------------------------------------------------------------------ 4. ingest
async def _feedback(url: str, key: str, ids: list[str], clients: int, batch: int) -> float:
    """Send the events from ``clients`` keep-alive connections; aiohttp, not httpx, because the client shares
    the two cores with the server: httpx spent 2.9 ms of CPU per request (more than the server's own work),
    aiohttp about a third of that."""
    import aiohttp

    chunks = [ids[i:i + batch] for i in range(0, len(ids), batch)]
    queue: asyncio.Queue = asyncio.Queue()
    for ch in chunks:
        queue.put_nowait(ch)
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url.rstrip("/") + "/", headers={"Authorization": f"Bearer {key}"},
                                     connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as c:
        async def client():
            while True:
                try:
                    ch = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = ({"id": ch[0], "event": "accepted", "time_to_decision_ms": 500} if batch == 1 else
                        {"events": [{"id": i, "event": "accepted"} for i in ch]})
                async with c.post("feedback", json=body) as r:
                    if r.status != 200:
                        raise SystemExit(f"feedback request failed: {r.status} {await r.text()}")
                    await r.read()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - t0


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (``--workers`` processes)."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_ingest(pg_url: str, model_dir: Path, singles: int, clients: int, workers: int, rounds: int) -> None:
    """Feedback events/s over HTTP into PostgreSQL through `ownllm serve`, interleaved: one transaction per
    request (serve.feedback_group_commit false, the baseline) vs the group commit, with 1 and N workers."""
    import yaml
    from sqlalchemy import insert, text

    from feedback.db import make_engine
    from feedback.models import Completion, utcnow

    upgrade(pg_url)  # a fresh state: the bench owns this database (never point it at production)
    eng = make_engine(pg_url)
    with eng.begin() as c:
        c.execute(text("TRUNCATE feedback_events, completions, api_keys, users, experiment_arms, experiments, "
                       "bounties, model_versions RESTART IDENTITY CASCADE"))
    f = session_factory(eng)
    setups = [("per-request transaction", False, 1), ("group commit", True, 1)]
    if workers > 1:
        setups.append(("group commit", True, workers))
    per_round = singles * len(setups) + 100 * 20
    total = per_round * rounds
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
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    servers = {}
    for label, group, n in setups:
        raw.setdefault("serve", {})["feedback_group_commit"] = group
        params = Path(tempfile.mkdtemp(prefix="bench-ingest-")) / "params.yaml"
        params.write_text(yaml.safe_dump(raw))
        port = free_port()
        servers[(label, n)] = (start_server(pg_url, model_dir, port, 1, "--workers", str(n), params=params),
                               f"http://127.0.0.1:{port}/v1")
    rates: dict[tuple[str, int, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}  # server CPU seconds per one-event request
    nxt = 0
    try:
        for _ in range(rounds):
            for (label, n), (_, url) in servers.items():
                runs = ((1, singles), (100, 100 * 20)) if label.startswith("per-request") else ((1, singles),)
                for batch, count in runs:
                    ids = [f"cmpl-bench-{i}" for i in range(nxt, nxt + count)]
                    nxt += count
                    cpu0 = _tree_cpu(servers[(label, n)][0].pid)
                    wall = asyncio.run(_feedback(url, key, ids, clients if batch == 1 else 4, batch))
                    rates.setdefault((label, n, batch), []).append(count / wall)
                    if batch == 1:
                        cpu.setdefault((label, n), []).append((_tree_cpu(servers[(label, n)][0].pid) - cpu0) / count)
    finally:
        stop(*(p for p, _ in servers.values()))
    with f() as s:
        stored = store.counts(s)["feedback_events"]
    print(f"\n[ingest] feedback into PostgreSQL ({pg_url.split('@')[-1]}) via `ownllm serve`, {rounds} interleaved "
          f"rounds; 1 event/request from {clients} clients (100 events/request from 4, for reference)")
    base = statistics.median(rates[("per-request transaction", 1, 1)])
    for (label, n, batch), xs in rates.items():
        med = statistics.median(xs)
        ratio = f"{med / base:5.2f}x" if batch == 1 else "      "
        per = f"  server CPU {1000 * statistics.median(cpu[(label, n)]):.2f} ms/request" if batch == 1 else ""
        print(f"  {label:<24} --workers {n}  {batch:>3} event(s)/request  {med:8.0f} events/s {ratio} "
              f"(runs: {', '.join(f'{x:.0f}' for x in xs)}){per}")
    print("  server CPU per request (all its processes, user + system) moves far less with the machine's load than "
          "requests/s: 1000 / it is roughly what one free core would serve")
    print(f"  target >= 1000 one-event requests/s; every request answered 200, stored {stored} of {nxt} sent"
          f"{'' if stored == nxt else '  <-- EVENTS LOST'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(REPO / "models" / "base"))
    ap.add_argument("--only", default="engine,gateway,load,ingest", help="comma-separated sections to run")
    ap.add_argument("--runs", type=int, default=20, help="runs per side at the default size (125M: half)")
    ap.add_argument("--threads", type=int, default=1, help="engine threads (CTranslate2 and torch), server and "
                    "baseline alike; 1 = serve.engine_threads' default")
    ap.add_argument("--levels", default="1,8,32,128", help="concurrent clients of the load test")
    ap.add_argument("--pg-url", default=os.environ.get("OWNLLM_TEST_PG_URL"))
    ap.add_argument("--singles", type=int, default=2000, help="one-event requests per ingest round")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4, help="server processes of the ingest comparison")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved ingest rounds")
    ap.add_argument("--skip-125m", action="store_true")
    args = ap.parse_args()
    only = set(args.only.split(","))
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        model_dir = build_model(Path(tempfile.mkdtemp(prefix="bench-model-")))
        print(f"{args.model_dir} not found: a random-weight model of params.yaml's shape in {model_dir}")
    else:
        from pipeline.train.export import convert_to_ct2, has_ct2

        if not has_ct2(model_dir):
            model_dir = Path(tempfile.mkdtemp(prefix="bench-model-")) / model_dir.name
            import shutil

            shutil.copytree(args.model_dir, model_dir)
            convert_to_ct2(model_dir)
    big = None
    if not args.skip_125m and only & {"engine", "gateway", "llama"}:
        big = build_model(Path(tempfile.mkdtemp(prefix="bench-125m-")), d_model=768, n_layers=12, n_heads=12,
                          max_pos=1024)  # intermediate 8/3 x d = 2048: 86.5M params with vocab 2048
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    if "engine" in only:
        bench_engine("default", model_dir, args.runs, args.threads)
        if big:
            bench_engine("125M-shaped", big, max(args.runs // 2, 3), args.threads)
    if "gateway" in only:
        bench_gateway("default", model_dir, args.runs, args.threads)
        if big:
            bench_gateway("125M-shaped", big, max(args.runs // 2, 3), args.threads)
    if "phases" in only:
        bench_phases(model_dir, args.runs, args.threads)
    if "load" in only:
        bench_load(model_dir, args.threads, [int(x) for x in args.levels.split(",")])
    if "llama" in only:
        bench_llama("default", model_dir, args.runs, args.threads)
        if big:
            bench_llama("125M-shaped", big, max(args.runs // 2, 3), args.threads)
    if "ingest" in only:
        if args.pg_url:
            bench_ingest(args.pg_url, model_dir, args.singles, args.clients, args.workers, args.rounds)
        else:
            print("[ingest] skipped (no --pg-url / $OWNLLM_TEST_PG_URL)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
