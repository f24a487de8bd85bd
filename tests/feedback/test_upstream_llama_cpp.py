"""The upstream backend against a real OpenAI-compatible server that is not ours: llama.cpp's ``llama-server``.

The server is built from the llama-cpp-python sdist on PyPI by ``scripts/build_llama_server.sh`` (`.ci/run`
runs it; a rerun finds it in the cache) and serves a GGUF export of the tiny test model made by llama.cpp's own
converter (``scripts/hf_to_gguf.py``). Without the server the tests skip on a developer's machine and fail
under CI, as the PostgreSQL tests do. What they show, through the real gateway:

- llama.cpp tokenises our prompts to the same ids as our Hugging Face tokenizer (the converter was told the
  pre-tokenizer is GPT-2's; this is the check that it is);
- ``fim: template``: the FIM prompt built by pipeline/fim_prompt.py, sent as a plain prompt, gets exactly the
  greedy answer of the local backend on the same weights (streamed or not);
- ``fim: infill``: llama.cpp's own /infill builds the same PSM prompt from the same FIM tokens and gets the same
  answer;
- what llama-server refuses (``suffix`` on /v1/completions, ``n`` > 1: a 500 of its own; a wrong key: 401)
  reaches the client as a 502 carrying the server's message and naming it; a prompt beyond its context (a 400
  of its own, or under a 200 as an ``error`` event when streamed) as a 400; what the gateway itself refuses for
  /infill (``n`` > 1) is a 400 — streamed or not, always before any byte of a stream.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from feedback.app import create_app
from feedback.backends import GenRequest
from feedback.config import ServeConfig, UpstreamConfig
from gateway_fixtures import free_port, live_server, staff_front
from pipeline.fim_prompt import EOS, fim_text

REPO = Path(__file__).resolve().parents[2]
PREFIX, SUFFIX = "def shorten(text, width):\n    ", "\n    return result\n"
LONG_PREFIX = "".join(f"value_{i} = compute_{i}(value_{i - 1})\n" for i in range(1, 80))  # 1,315 tokens > 256

_spec = importlib.util.spec_from_file_location("hf_to_gguf", REPO / "scripts" / "hf_to_gguf.py")
hf_to_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_to_gguf)


@pytest.fixture(scope="module")
def llama_server_bin() -> Path:
    """``OWNLLM_LLAMA_SERVER``, else where scripts/build_llama_server.sh puts it. Missing: skip, but fail under CI."""
    path = Path(os.environ.get("OWNLLM_LLAMA_SERVER") or hf_to_gguf.DEFAULT_TREE / "bin" / "llama-server")
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = f"llama-server not found at {path} (run scripts/build_llama_server.sh; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the llama.cpp upstream tests must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tiny_gguf(llama_server_bin, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    tree = llama_server_bin.parent.parent  # <cache>/llama-server-<version>/{bin,src,pylib}
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "hf_to_gguf.py"), str(tiny_model_dir), str(out),
                          "--llama-cpp", str(tree), "--outtype", "f32"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@contextmanager
def running_llama_server(binary: Path, gguf: Path, log: Path, *extra: str):
    """A real llama-server on 127.0.0.1 serving ``gguf`` (context 256 as trained, one slot, one thread)."""
    port = free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "256",
                                 "-np", "1", "-t", "1", "--no-webui", *extra], stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not healthy after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()  # it waits for idle keep-alive connections (the gateway's client) before exiting
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llama_server(llama_server_bin, tiny_gguf, tmp_path_factory):
    # --no-context-shift: a prompt beyond the context is an error, not silently cut (docs/serving.md, "Context")
    with running_llama_server(llama_server_bin, tiny_gguf, tmp_path_factory.mktemp("llama-server") / "server.log",
                              "-a", "tiny", "--no-context-shift") as url:
        yield url


@pytest.fixture
def front(tmp_path):
    return staff_front(tmp_path, {"tiny": "all"})


def gateway(db: str, server: str, fim: str = "template"):
    return live_server(create_app(ServeConfig(db_url=db, upstreams={"tiny": UpstreamConfig(url=server + "/v1",
                                                                                              fim=fim)})))


def complete(url: str, auth: dict, stream: bool = False, **body) -> httpx.Response | tuple[int, str, list[dict]]:
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, **body}
    if not stream:
        return httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
    import json

    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=auth, timeout=60) as r:
        r.read()
        if r.status_code != 200:
            return r.status_code, r.json()["error"]["message"], []
        events = [json.loads(line[5:]) for line in r.text.splitlines()
                  if line.startswith("data:") and line.strip() != "data: [DONE]"]
        return 200, "".join(e["choices"][0]["text"] for e in events), events


def test_llama_cpp_tokenises_our_prompts_as_hugging_face_does(llama_server, tiny_backend):
    tok = tiny_backend.tok
    texts = [fim_text(PREFIX, SUFFIX), EOS + PREFIX, "x = {'naïve': \"ünïcode\"}  # 3.14 → π\n\t\tpass\n"]
    for text in texts:
        r = httpx.post(llama_server + "/tokenize", json={"content": text}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == tok(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("suffix", [SUFFIX, None])
@pytest.mark.parametrize("stream", [False, True])
def test_template_mode_gets_the_local_greedy_answer(front, llama_server, tiny_backend, suffix, stream):
    db, auth = front
    with gateway(db, llama_server) as url:
        r = complete(url, auth, stream=stream, prompt=PREFIX, suffix=suffix)
    local = tiny_backend.complete(GenRequest(prompt=PREFIX, suffix=suffix, max_tokens=12, temperature=0))
    want = local.choices[0].text
    assert want  # the comparison means something only if the model wrote something
    if stream:
        status, text, events = r
        assert status == 200, text
        assert text == want and events[-1]["choices"][0]["finish_reason"] == local.choices[0].finish_reason
    else:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want  # same prompt tokens, same weights, same greedy answer
        assert r.json()["usage"]["prompt_tokens"] == local.prompt_tokens
        assert r.json()["choices"][0]["finish_reason"] == local.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_infill_mode_uses_llama_cpps_own_fim_and_gets_the_same_answer(front, llama_server, tiny_backend, stream):
    db, auth = front
    with gateway(db, llama_server, fim="infill") as url:
        r = complete(url, auth, stream=stream, prompt=PREFIX, suffix=SUFFIX)
        plain = complete(url, auth, prompt=PREFIX)  # no suffix: /v1/completions, as in template mode
    local = tiny_backend.complete(GenRequest(prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0))
    text = r[1] if stream else r.json()["choices"][0]["text"]
    assert (r[0] if stream else r.status_code) == 200, text
    assert text == local.choices[0].text
    if not stream:
        assert r.json()["usage"]["prompt_tokens"] == local.prompt_tokens  # llama.cpp built the same PSM prompt
    local_plain = tiny_backend.complete(GenRequest(prompt=PREFIX, max_tokens=12, temperature=0))
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == local_plain.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_what_llama_server_refuses_is_a_clear_error_with_its_message(front, llama_server, llama_server_bin,
                                                                     tiny_gguf, tmp_path, stream):
    """llama-server answers a request it cannot serve with a 500 of its own ("server_error"), so the gateway says
    502 with the server's message; a prompt beyond its context (with --no-context-shift) is its 400, so ours; a
    wrong key (401) is the gateway's setup, a 502. Streamed requests get the same JSON error before any byte."""
    db, auth = front

    def call(server: str, fim: str, **body) -> tuple[int, str]:
        with gateway(db, server, fim=fim) as url:
            r = complete(url, auth, stream=stream, **body)
        return (r[0], r[1]) if stream else (r.status_code, r.json()["error"]["message"])

    cases = [("suffix", {"prompt": PREFIX, "suffix": SUFFIX}, 502, "failed with 500: Unsupported param: suffix"),
             ("template", {"prompt": PREFIX, "n": 2}, 502, "failed with 500: Only one completion choice is allowed"),
             ("infill", {"prompt": PREFIX, "suffix": SUFFIX, "n": 2}, 400,
              "llama.cpp's /infill returns one completion"),
             # a 400 of llama-server's; streamed, it comes as an `error` event under a 200, read before answering
             ("template", {"prompt": LONG_PREFIX}, 400,
              "upstream rejected the request: the request exceeds the available context size")]
    for fim, body, status, message in cases:
        got, msg = call(llama_server, fim, **body)
        assert got == status and message in msg, (fim, body, got, msg)
        if status == 502:
            assert msg.startswith(f"upstream {llama_server}/v1/completions"), msg  # names the server
    with running_llama_server(llama_server_bin, tiny_gguf, tmp_path / "keyed.log",
                              "--api-key", "not-the-gateways") as keyed:
        got, msg = call(keyed, "template", prompt=PREFIX)
    assert got == 502 and "refused the gateway (401): Invalid API Key" in msg, (got, msg)
