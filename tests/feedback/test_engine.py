"""The CTranslate2 engine: greedy output equal to transformers token for token, dynamic batching across
concurrent requests, per-request seeds, streaming with cancel, int8, and the registry picking the format."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from feedback.backends import GenRequest, LocalBackend
from feedback.engine import CT2Backend, CT2Engine, Job

PROMPTS = [("import os\nimport sys\n\n\ndef main(argv):\n    ", None),
           ("class Queue:\n    def __init__(self, maxsize=0):\n        self.", None),
           ("def shorten(text, width):\n    ", "\n    return result\n"),  # FIM
           ("x", None)]


@pytest.mark.parametrize("prompt, suffix", PROMPTS)
def test_greedy_equals_transformers_token_for_token(tiny_backend, tiny_ct2_backend, prompt, suffix):
    req = GenRequest(prompt=prompt, suffix=suffix, max_tokens=24, temperature=0)
    ids = tiny_backend.prompt_ids(req)
    assert tiny_ct2_backend.prompt_ids(req) == ids
    with torch.inference_mode():
        hf = tiny_backend.model.generate(**tiny_backend._gen_kwargs(req, ids))[0, len(ids):].tolist()
    (ct2,) = tiny_ct2_backend.engine.generate_batch([ids], 24, stop_ids=tiny_backend.stop_ids)
    assert ct2 == hf[:len(ct2)] and len(ct2) == len(hf)  # HF pads nothing for one row: same length, same ids
    a, b = tiny_backend.complete(req), tiny_ct2_backend.complete(req)
    assert a.choices == b.choices and a.prompt_tokens == b.prompt_tokens


def test_stop_sequences_and_streaming_match_the_completion(tiny_backend, tiny_ct2_backend):
    req = GenRequest(prompt=PROMPTS[0][0], max_tokens=24, temperature=0, stop=("(",), n=2)
    full = tiny_ct2_backend.complete(req)
    assert full.choices == tiny_backend.complete(req).choices
    deltas = list(tiny_ct2_backend.stream(req).deltas)
    for i in range(2):
        mine = [d for d in deltas if d.index == i]
        assert "".join(d.text for d in mine) == full.choices[i].text
        assert mine[-1].finish_reason == full.choices[i].finish_reason
        assert "(" not in full.choices[i].text


def test_concurrent_requests_share_decoding_batches(tiny_ct2_model_dir, tiny_backend):
    engine_backend = CT2Backend(tiny_ct2_model_dir, num_threads=1, batch_wait_ms=200, max_batch=64)
    try:
        reqs = [GenRequest(prompt=p, suffix=s, max_tokens=16, temperature=0) for p, s in PROMPTS] * 3
        solo = [tiny_backend.complete(r).choices for r in reqs]
        before = engine_backend.engine.batcher.batches
        with ThreadPoolExecutor(len(reqs)) as pool:
            got = list(pool.map(lambda r: engine_backend.complete(r).choices, reqs))
        calls = engine_backend.engine.batcher.batches - before
        assert calls < len(reqs) / 2, f"{len(reqs)} concurrent requests took {calls} generate_batch calls"
        assert engine_backend.engine.batcher.waits >= 1  # a burst waits for its company
        assert got == solo  # batching changes nothing in a greedy request's output
    finally:
        engine_backend.engine.close()


def test_a_lone_request_does_not_wait_for_company(tiny_ct2_model_dir, tiny_backend):
    """One editor typing: nothing else arrived within the window, so the batcher decodes at once instead of
    holding the request for the window (20 s here: waiting would fail the time bound by far)."""
    engine_backend = CT2Backend(tiny_ct2_model_dir, num_threads=1, batch_wait_ms=20_000)
    try:
        req = GenRequest(prompt=PROMPTS[0][0], max_tokens=8, temperature=0)
        t0 = time.perf_counter()
        got = engine_backend.complete(req).choices
        assert time.perf_counter() - t0 < 10
        assert engine_backend.engine.batcher.waits == 0 and engine_backend.engine.batcher.batches == 1
        assert got == tiny_backend.complete(req).choices
    finally:
        engine_backend.engine.close()


def test_a_seeded_request_is_reproducible_whatever_else_is_served(tiny_ct2_backend, tiny_model_dir):
    other = LocalBackend(tiny_model_dir)  # a second version served at the same time (an A/B arm)
    req = GenRequest(prompt="def parse(line):\n    ", max_tokens=16, temperature=0.9, top_p=0.95, n=3, seed=42)
    alone = [c.text for c in tiny_ct2_backend.complete(req).choices]
    assert len(set(alone)) > 1  # n sampled choices, not one repeated

    stop = threading.Event()

    def noise():  # the other version samples unseeded, and someone reseeds torch's global generator
        while not stop.is_set():
            torch.manual_seed(int(time.time_ns()) % 1000)
            other.complete(GenRequest(prompt="import re\n", max_tokens=8, temperature=1.0, n=2))

    t = threading.Thread(target=noise)
    t.start()
    try:
        busy = [[c.text for c in tiny_ct2_backend.complete(req).choices] for _ in range(3)]
    finally:
        stop.set()
        t.join()
    assert all(b == alone for b in busy)
    other_seed = [c.text for c in tiny_ct2_backend.complete(GenRequest(**{**req.__dict__, "seed": 43})).choices]
    assert other_seed != alone


def test_a_stream_the_client_drops_is_cancelled(tiny_ct2_backend):
    req = GenRequest(prompt=PROMPTS[1][0], max_tokens=200, temperature=0)
    (whole,) = tiny_ct2_backend.complete(req).choices
    assert whole.completion_tokens == 200  # left alone, this prompt runs to max_tokens
    seen: list[int] = []
    job_done = threading.Event()
    original = tiny_ct2_backend.engine.submit

    def watch(job: Job):  # observe the real job (its rows and when the batcher finished it)
        inner = job.on_token

        def on_token(choice, token, so_far):
            seen.append(token)
            return inner(choice, token, so_far)

        job.on_token = on_token
        fut = original(job)
        fut.add_done_callback(lambda _f: job_done.set())
        return fut

    tiny_ct2_backend.engine.submit = watch
    try:
        deltas = tiny_ct2_backend.stream(req).deltas
        next(d for d in deltas if d.text)
        deltas.close()  # what Starlette does when the client disconnects
        assert job_done.wait(30)
    finally:
        del tiny_ct2_backend.engine.submit
    assert len(seen) < 200  # decoding stopped early instead of running to max_tokens
    # The engine keeps serving.
    assert tiny_ct2_backend.complete(GenRequest(prompt="x", max_tokens=4, temperature=0)).choices


def test_int8_quantization_loads_and_generates(tiny_ct2_model_dir):
    engine = CT2Engine(tiny_ct2_model_dir, quantization="int8", num_threads=1)
    try:
        (out,) = engine.generate_batch([engine.tok("def f(x):\n", add_special_tokens=False)["input_ids"]], 8)
        assert 1 <= len(out) <= 8 and engine.quantization == "int8"
    finally:
        engine.close()


def test_pool_serves_whichever_format_a_version_has(tiny_ct2_model_dir, tiny_model_dir):
    from feedback.app import BackendPool
    from feedback.models import ModelVersion
    from feedback.config import ServeConfig

    pool = BackendPool(ServeConfig(num_threads=1))
    with_ct2 = pool.get(ModelVersion(name="a", path=str(tiny_ct2_model_dir)))
    without = pool.get(ModelVersion(name="b", path=str(tiny_model_dir)))
    assert isinstance(with_ct2, CT2Backend) and type(without) is LocalBackend
    hf_only = BackendPool(ServeConfig(engine="transformers")).get(ModelVersion(name="a", path=str(tiny_ct2_model_dir)))
    assert type(hf_only) is LocalBackend
    with_ct2.engine.close()


def test_a_loading_version_does_not_block_loaded_ones(tiny_backend):
    from feedback.app import BackendPool
    from feedback.models import ModelVersion
    from feedback.config import ServeConfig

    release = threading.Event()

    class SlowPool(BackendPool):  # "slow" takes as long as the test says to load; the others are loaded
        def create(self, version):
            if version.name == "slow":
                release.wait(30)
            return tiny_backend

    pool = SlowPool(ServeConfig())
    fast = ModelVersion(name="fast", path="/fast")
    pool.get(fast)
    loading = threading.Thread(target=pool.get, args=(ModelVersion(name="slow", path="/slow"),))
    loading.start()
    try:
        time.sleep(0.1)
        t0 = time.perf_counter()
        assert pool.get(fast) is tiny_backend
        assert time.perf_counter() - t0 < 1.0
        assert loading.is_alive()  # still loading: the fast version was served meanwhile
    finally:
        release.set()
        loading.join()
