"""Upstream backends speak FIM: the prompt is built here (one builder) and sent as a plain `prompt`.

The server behind is a vLLM-shaped stand-in: vLLM itself cannot run on these CPUs, so this small FastAPI app
reproduces the two vLLM behaviours that matter (a 400 "suffix is not currently supported" for any ``suffix``;
a prompt whose special-token strings are read as control tokens, as vLLM's tokenizer call does) in front of
the real tiny model. A real third-party server, llama.cpp's llama-server, is tested in
test_upstream_llama_cpp.py; a real ownllm gateway upstream (``fim: suffix``) in test_gateway.py.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from feedback.app import create_app
from feedback.backends import GenRequest
from feedback.config import ServeConfig, UpstreamConfig
from gateway_fixtures import live_server, staff_front

PREFIX, SUFFIX = "def shorten(text, width):\n    ", "\n    return result\n"


def vllm_like(tiny_backend) -> FastAPI:
    app = FastAPI()
    app.state.prompts = []

    @app.post("/v1/completions")
    def completions(body: dict):
        if body.get("suffix") is not None:  # vllm/entrypoints/openai/serving_completion.py
            return JSONResponse({"object": "error", "message": "suffix is not currently supported",
                                 "type": "BadRequestError", "code": 400}, status_code=400)
        app.state.prompts.append(body["prompt"])
        tok, model = tiny_backend.tok, tiny_backend.model
        ids = tok(body["prompt"], add_special_tokens=False)["input_ids"]  # control-token strings are control tokens
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=body["max_tokens"], do_sample=False,
                                 eos_token_id=tiny_backend.stop_ids, pad_token_id=tiny_backend.pad_id)
        new = out[0, len(ids):].tolist()
        stopped = any(i in tiny_backend.stop_ids for i in new)
        new = new[:next((k for k, i in enumerate(new) if i in tiny_backend.stop_ids), len(new))]
        return {"id": "cmpl-vllm", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True),
                             "finish_reason": "stop" if stopped else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                          "total_tokens": len(ids) + len(new)}}

    return app


@pytest.fixture
def front(tmp_path):
    return staff_front(tmp_path, {"tiny": "all", "tuned": "staff"})


@pytest.mark.parametrize("suffix", [SUFFIX, None])
def test_template_mode_sends_the_builders_prompt_and_gets_the_local_answer(front, tiny_backend, suffix):
    db, auth = front
    upstream = vllm_like(tiny_backend)
    with live_server(upstream) as up_url:
        # backend stays `local`: the version's own upstream (serve.upstreams) takes precedence for it.
        app = create_app(ServeConfig(db_url=db, upstreams={"tiny": UpstreamConfig(url=up_url + "/v1")}))
        with live_server(app) as url:
            body = {"model": "tiny", "prompt": PREFIX, "suffix": suffix, "max_tokens": 12, "temperature": 0}
            r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    local = tiny_backend.complete(GenRequest(prompt=PREFIX, suffix=suffix, max_tokens=12, temperature=0))
    assert r.json()["choices"][0]["text"] == local.choices[0].text  # same prompt tokens, same greedy answer
    assert r.json()["usage"]["prompt_tokens"] == local.prompt_tokens
    (sent,) = upstream.state.prompts
    assert sent.startswith("<fim_prefix>" if suffix else "<|endoftext|>")


def test_suffix_mode_against_vllm_is_the_400_it_always_was(front, tiny_backend):
    db, auth = front
    with live_server(vllm_like(tiny_backend)) as up_url:
        app = create_app(ServeConfig(db_url=db, upstreams={"tiny": UpstreamConfig(url=up_url + "/v1", fim="suffix")}))
        with live_server(app) as url:
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PREFIX, "suffix": SUFFIX,
                                                          "max_tokens": 4}, headers=auth, timeout=60)
    assert r.status_code == 400 and "suffix is not currently supported" in r.json()["error"]["message"]


def test_each_version_goes_to_its_own_upstream(front, tiny_backend):
    db, auth = front
    a, b = vllm_like(tiny_backend), vllm_like(tiny_backend)
    with live_server(a) as url_a, live_server(b) as url_b:
        cfg = ServeConfig(db_url=db, backend="openai", upstream_url=url_a + "/v1",  # the default upstream
                          upstreams={"tuned": UpstreamConfig(url=url_b + "/v1", model="tuned-on-vllm-b")})
        with live_server(create_app(cfg)) as url:
            for model in ("tiny", "tuned", "tuned"):
                r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "import os\n",
                                                              "max_tokens": 3}, headers=auth, timeout=60)
                assert r.status_code == 200 and r.json()["model"] == model
    assert len(a.state.prompts) == 1 and len(b.state.prompts) == 2
