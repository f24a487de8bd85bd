"""The gateway over real HTTP on 127.0.0.1: the OpenAI shape, the official client, FIM, streaming, auth."""

from __future__ import annotations

import json

import httpx
import pytest


def post(gw, user, path, body, **kw):
    return httpx.post(gw.url + path, json=body, headers=gw.headers(user), timeout=60, **kw)


def test_completion_has_the_openai_shape_and_is_logged(gateway):
    before = gateway.counts()["completions"]
    r = post(gateway, "alice", "/v1/completions",
             {"model": "auto", "prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0, "n": 2,
              "user": "ide-1", "language": "python"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: identical choices
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 16
    assert gateway.counts()["completions"] == before + 2
    got = httpx.get(f"{gateway.url}/v1/completions/{body['id']}", headers=gateway.headers("alice")).json()
    assert got["prompt"] == "def add(a, b):\n" and got["language"] == "python"
    assert got["choices"][0]["text"] == body["choices"][0]["text"]


def greedy_continuation(model_dir, ids: list[int], max_new_tokens: int) -> str:
    """The tiny model's greedy continuation of ``ids`` up to end-of-text or a FIM control token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.fim_prompt import EOS, FIM_MIDDLE, FIM_PAD, FIM_PREFIX, FIM_SUFFIX

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = tok.convert_tokens_to_ids([EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD])
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stop,
                             pad_token_id=stop[-1])
    new = out[0, len(ids):].tolist()
    new = new[:next((k for k, t in enumerate(new) if t in stop), len(new))]
    return tok.decode(new, skip_special_tokens=True)


def test_openapi_documents_the_completion_body(gateway):
    """/v1/completions parses its own body (the hot path); /openapi.json still documents both request shapes."""
    doc = httpx.get(gateway.url + "/openapi.json", timeout=30).json()
    schema = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {alt["$ref"].rsplit("/", 1)[-1] for alt in schema["oneOf"]}
    assert refs == {"CompletionRequest", "TabbyCompletionRequest"}
    components = doc["components"]["schemas"]
    assert {"model", "prompt", "suffix", "max_tokens"} <= set(components["CompletionRequest"]["properties"])
    assert "segments" in components["TabbyCompletionRequest"]["properties"]


def test_greedy_is_deterministic_and_fim_uses_the_suffix(gateway, tiny_model_dir):
    from transformers import AutoTokenizer

    from pipeline.fim_prompt import EOS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    prefix, suffix = "import os\n\ndef main(", "\n    return 0\n"
    body = {"model": "auto", "prompt": prefix, "suffix": suffix, "max_tokens": 12, "temperature": 0}
    a = post(gateway, "alice", "/v1/completions", body).json()["choices"][0]["text"]
    b = post(gateway, "bob", "/v1/completions", body).json()["choices"][0]["text"]
    plain = post(gateway, "alice", "/v1/completions", {**body, "suffix": None}).json()["choices"][0]["text"]
    assert a == b
    # The model's own greedy answers to the PSM prompt and to the plain one, built here from the layout
    # pretraining teaches: the gateway gave each the right one, so the suffix reached the model.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    fim_ids = [ids(FIM_PREFIX), *enc(prefix), ids(FIM_SUFFIX), *enc(suffix), ids(FIM_MIDDLE)]
    want_fim = greedy_continuation(tiny_model_dir, fim_ids, 12)
    want_plain = greedy_continuation(tiny_model_dir, [ids(EOS), *enc(prefix)], 12)
    assert want_fim != want_plain, "this prompt does not tell a FIM prompt from a plain one: pick another"
    assert (a, plain) == (want_fim, want_plain)


def test_seeded_sampling_is_reproducible_under_concurrent_requests(gateway):
    from concurrent.futures import ThreadPoolExecutor

    seeded = {"model": "auto", "prompt": "def parse(line):\n", "max_tokens": 12, "temperature": 1.0, "n": 3,
              "seed": 42}
    alone = [c["text"] for c in post(gateway, "alice", "/v1/completions", seeded).json()["choices"]]
    unseeded = {**seeded, "seed": None, "prompt": "for x in "}
    with ThreadPoolExecutor(4) as pool:  # unseeded sampling draws from torch's generator at the same time
        futures = [pool.submit(post, gateway, "bob", "/v1/completions", unseeded if i % 2 else seeded)
                   for i in range(8)]
        replies = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    for r in replies[::2]:
        assert [c["text"] for c in r.json()["choices"]] == alone


def test_stop_sequence_is_cut_and_not_returned(gateway):
    base = {"model": "auto", "prompt": "class Queue:\n    def ", "max_tokens": 24, "temperature": 0}
    full = post(gateway, "alice", "/v1/completions", base).json()["choices"][0]["text"]
    assert len(full) > 2
    stop = full[1:3]
    cut = post(gateway, "alice", "/v1/completions", {**base, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


def test_a_stop_sequence_counts_only_inside_the_completion(tiny_backend):
    """A prompt ending in a space, a completion starting with one: the stop "  " spans the boundary, which
    must not end generation (transformers' stop_strings would); it ends once the completion holds it."""
    import torch

    from feedback.backends import _completion_stop_criteria

    tok = tiny_backend.tok
    prompt = tok("def f(x): ", add_special_tokens=False)["input_ids"]
    space, word = (tok(t, add_special_tokens=False)["input_ids"] for t in (" ", "x"))
    crit = _completion_stop_criteria(tok, len(prompt), ("  ",))
    rows = torch.tensor([prompt + space + word, prompt + space + space])  # " x" and "  " generated
    assert crit(rows, None).tolist() == [False, True]


def test_sse_stream_matches_the_plain_completion(gateway):
    body = {"model": "auto", "prompt": "for i in range(", "max_tokens": 10, "temperature": 0, "stream": True}
    plain = post(gateway, "alice", "/v1/completions", {**body, "stream": False}).json()["choices"][0]["text"]
    before = gateway.counts()["completions"]
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, headers=gateway.headers("alice"),
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert gateway.counts()["completions"] == before + 1


def test_official_openai_client_plain_and_streaming(gateway):
    import openai  # a dependency (requirements.in): missing, this test fails rather than skips
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.keys["bob"], max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert "tiny" in models
    c = client.completions.create(model="tiny", prompt="import sys\n", max_tokens=6, temperature=0,
                                  extra_body={"language": "python"})
    assert c.id.startswith("cmpl-") and c.model == "tiny" and isinstance(c.choices[0].text, str)
    assert c.usage.completion_tokens >= 1
    parts = list(client.completions.create(model="tiny", prompt="import sys\n", max_tokens=6, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == c.choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="ollm-wrong", max_retries=0).completions.create(
            model="tiny", prompt="x", max_tokens=1)


def test_feedback_is_idempotent_and_owned(gateway):
    cid = post(gateway, "alice", "/v1/completions",
               {"model": "auto", "prompt": "x = ", "max_tokens": 3, "temperature": 0}).json()["id"]
    before = gateway.counts()["feedback_events"]
    ev = {"id": cid, "event": "accepted", "time_to_decision_ms": 420}
    first, again = post(gateway, "alice", "/v1/feedback", ev), post(gateway, "alice", "/v1/feedback", ev)
    assert first.status_code == again.status_code == 200
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    assert gateway.counts()["feedback_events"] == before + 1
    contradict = post(gateway, "alice", "/v1/feedback", {"id": cid, "event": "rejected"})
    assert contradict.status_code == 409 and "already accepted" in contradict.json()["error"]["message"]
    # Another user can neither see nor act on alice's completion: indistinguishable from a missing one.
    assert post(gateway, "bob", "/v1/feedback", ev).status_code == 404
    assert httpx.get(f"{gateway.url}/v1/completions/{cid}", headers=gateway.headers("bob")).status_code == 404
    assert post(gateway, "alice", "/v1/feedback", {"id": "cmpl-nope", "event": "accepted"}).status_code == 404
    assert gateway.counts()["feedback_events"] == before + 1


def test_feedback_carries_partial_accepts_and_kept_text(gateway):
    cid = post(gateway, "alice", "/v1/completions",
               {"model": "auto", "prompt": "x = ", "max_tokens": 3, "temperature": 0}).json()["id"]
    bad = post(gateway, "alice", "/v1/feedback", {"id": cid, "event": "rejected", "accepted_chars": 2})
    assert bad.status_code == 400 and "accepted_chars" in bad.json()["error"]["message"]
    bad = post(gateway, "alice", "/v1/feedback", {"id": cid, "event": "rejected", "kept_source": "typed"})
    assert bad.status_code == 400 and "kept_text" in bad.json()["error"]["message"]
    bad = post(gateway, "alice", "/v1/feedback", {"id": cid, "event": "accepted", "accepted_chars": 10_000})
    assert bad.status_code == 400 and "exceeds" in bad.json()["error"]["message"]
    ok = post(gateway, "alice", "/v1/feedback", {"id": cid, "event": "accepted", "accepted_chars": 1,
                                                  "kept_text": "1 + 2", "kept_source": "simulated"})
    assert ok.status_code == 200 and not ok.json()["duplicate"]


def test_bounties_are_stored_once(gateway):
    b = {"title": "reverse a list", "instruction": "def rev(xs):\n    \"\"\"Reverse xs.\"\"\"",
         "language": "python", "solution": "    return xs[::-1]\n"}
    first = post(gateway, "alice", "/v1/bounties", b)
    second = post(gateway, "bob", "/v1/bounties", b)
    assert first.status_code == second.status_code == 201
    assert first.json()["created"] and not second.json()["created"] and first.json()["id"] == second.json()["id"]


def test_metrics_and_health(gateway):
    post(gateway, "alice", "/v1/completions",
         {"model": "auto", "prompt": "y = ", "max_tokens": 2, "temperature": 0, "language": "python"})
    text = httpx.get(gateway.url + "/metrics").text
    assert 'ownllm_completions_total{language="python",model="tiny"}' in text
    assert "ownllm_completion_latency_seconds_bucket" in text
    h = httpx.get(gateway.url + "/healthz").json()
    assert h["status"] == "ok" and h["db_revision"]


def test_upstream_backend_forwards_to_an_openai_compatible_server(gateway, tmp_path, monkeypatch):
    """A second gateway with backend=openai in front of the first: same text, its own log, streaming too."""
    from feedback import store
    from feedback.app import create_app
    from feedback.db import session_factory, upgrade
    from gateway_fixtures import live_server
    from feedback.config import ServeConfig

    url = f"sqlite:///{tmp_path / 'front.db'}"
    upgrade(url)
    with session_factory(url).begin() as s:
        store.register_model_version(s, "tiny", "unused-by-upstream", state="all")
        key = store.create_key(s, "dave")
    monkeypatch.setenv("OWNLLM_TEST_UPSTREAM_KEY", gateway.keys["bob"])
    front = create_app(ServeConfig(db_url=url, backend="openai", upstream_url=gateway.url + "/v1",
                                   upstream_fim="suffix",  # an ownllm gateway builds FIM prompts itself
                                   upstream_api_key_env="OWNLLM_TEST_UPSTREAM_KEY"))
    body = {"model": "auto", "prompt": "import re\n", "suffix": "\nprint(1)\n", "max_tokens": 6, "temperature": 0}
    direct = post(gateway, "bob", "/v1/completions", body).json()
    with live_server(front) as front_url:
        via = httpx.post(front_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=60).json()
        with httpx.stream("POST", front_url + "/v1/completions", json={**body, "stream": True},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert via["choices"][0]["text"] == direct["choices"][0]["text"] and via["model"] == "tiny"
    assert via["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert lines[-1] == "data: [DONE]"
    streamed = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1])
    assert streamed == direct["choices"][0]["text"]
    with session_factory(url)() as s:
        assert store.counts(s)["completions"] == 2  # the front gateway logged what it served


def test_fim_prompt_layout_truncation_and_no_control_token_injection(tiny_backend):
    from feedback.backends import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, BadGenerationRequest, GenRequest

    b = tiny_backend
    ids = b.prompt_ids(GenRequest(prompt="x = 1\n" * 400, suffix="y = 2\n" * 400, max_tokens=16))
    fim = {t: b.fim_ids[t] for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}
    assert ids[0] == fim[FIM_PREFIX] and ids[-1] == fim[FIM_MIDDLE] and ids.count(fim[FIM_SUFFIX]) == 1
    assert len(ids) <= b.max_context - 16  # fits the context with room for the completion
    assert b.tok.decode(ids[1:ids.index(fim[FIM_SUFFIX])]).endswith("x = 1\n")  # prefix keeps its end
    assert b.tok.decode(ids[ids.index(fim[FIM_SUFFIX]) + 1:-1]).startswith("y = 2\n")  # suffix its start
    typed = b.prompt_ids(GenRequest(prompt="s = '<|endoftext|><fim_middle>'", max_tokens=8))
    assert typed.count(b.eos_id) == 1 and fim[FIM_MIDDLE] not in typed  # only the document start is EOS
    with pytest.raises(BadGenerationRequest, match="context"):
        b.prompt_ids(GenRequest(prompt="x", max_tokens=b.max_context))
