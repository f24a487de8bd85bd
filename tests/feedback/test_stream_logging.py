"""Nothing served unlogged, and nothing waits behind generation: real uvicorn, real SQLite, real sockets.

- a streamed completion's rows exist (status 'pending') before its first byte, and say how it ended:
  'served', 'disconnected' (the client dropped the connection mid-stream) or 'failed' (the store failed);
- /healthz, /metrics and /v1/feedback answer at once while every generation slot is busy.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from gateway_fixtures import live_server, start_gateway

LONG = {"model": "auto", "prompt": "import os\n", "max_tokens": 200,  # the tiny model: a token per line
        "temperature": 0, "stream": True}


def rows(db_path) -> list[tuple]:
    with sqlite3.connect(db_path) as c:
        return c.execute("select request_id, choice_index, status, completion, finish_reason from completions "
                         "order by id").fetchall()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture(params=["transformers", "ctranslate2"])
def served(request, tmp_path, tiny_backend, tiny_ct2_backend, tiny_model_dir):
    backend = tiny_backend if request.param == "transformers" else tiny_ct2_backend
    db_path = tmp_path / "feedback.db"
    app, keys, factory = start_gateway(f"sqlite:///{db_path}", backend, tiny_model_dir, sqlite_busy_timeout_s=0.3)
    with live_server(app) as url:
        yield url, {"Authorization": f"Bearer {keys['alice']}"}, db_path


def test_a_served_stream_is_pending_first_then_served(served):
    url, auth, db_path = served
    with httpx.stream("POST", url + "/v1/completions", json=LONG, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        # The first byte has arrived: the row was written before it.
        (rid, idx, status, text, _), = rows(db_path)
        assert rid == json.loads(first[6:])["id"] and status in ("pending", "served")
        rest = [ln for ln in lines if ln.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    sent = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in [first, *rest[:-1]])
    (_, _, status, text, finish), = rows(db_path)
    assert status == "served" and text == sent and finish == "length"


def test_a_client_that_drops_mid_stream_leaves_a_disconnected_row(served):
    url, auth, db_path = served
    u = urlparse(url)
    body = json.dumps(LONG).encode()
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: {auth['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"data: " not in got:  # the first event arrived
            got += sock.recv(4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    (_, _, status, text, _), = wait_for(lambda: [r for r in rows(db_path) if r[2] == "disconnected"])
    # What was logged is what was generated before the client left: a prefix of the full completion.
    full = httpx.post(url + "/v1/completions", json={**LONG, "stream": False}, headers=auth, timeout=60).json()
    assert full["choices"][0]["text"].startswith(text)
    assert len(text) < len(full["choices"][0]["text"])


def test_a_store_that_fails_mid_stream_leaves_a_row_that_says_so(served):
    url, auth, db_path = served
    blocker = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=LONG, headers=auth, timeout=60) as r:
        assert r.status_code == 200  # the pending row is in: headers are only sent after it
        blocker.execute("BEGIN IMMEDIATE")  # from now on every write to the store times out (0.3 s)
        try:
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            (_, _, status, text, _), = rows(db_path)  # WAL: reads still work while writes are locked out
            assert status == "pending" and text == ""
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
    last = json.loads(events[-1][6:])
    assert last["error"]["type"] == "store_unavailable"  # the client is told; no [DONE]
    assert "data: [DONE]" not in events
    sent = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in events[:-1])
    # Once the store is back, the background retry records what was sent, as failed.
    (_, _, status, text, _), = wait_for(lambda: [r for r in rows(db_path) if r[2] == "failed"])
    assert text == sent


def test_health_metrics_and_feedback_do_not_wait_behind_generation(tmp_path, tiny_backend, tiny_model_dir):
    """Far more concurrent completions than AnyIO's 40 threads, on the one-at-a-time transformers backend:
    when generation held those threads (before issue 16), each probe queued behind ~60 generations."""
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    app, keys, _ = start_gateway(db, tiny_backend, tiny_model_dir)
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    body = {"model": "auto", "prompt": "import os\n", "max_tokens": 40, "temperature": 0}
    n = 100
    with live_server(app) as url, ThreadPoolExecutor(n) as pool:
        cid = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60).json()["id"]
        busy = [pool.submit(httpx.post, url + "/v1/completions", json=body, headers=auth, timeout=600)
                for _ in range(n)]
        wait_for(lambda: sum(f.running() for f in busy) >= n - 5, 30)
        time.sleep(0.5)  # the requests are in the server, queued behind the generation lock
        in_flight = sum(not f.done() for f in busy)
        t0 = time.perf_counter()
        health = httpx.get(url + "/healthz", timeout=60)
        metrics = httpx.get(url + "/metrics", timeout=60)
        fb = httpx.post(url + "/v1/feedback", json={"id": cid, "event": "accepted"}, headers=auth, timeout=60)
        took = time.perf_counter() - t0
        still = sum(not f.done() for f in busy)
        assert [f.result().status_code for f in busy] == [200] * n
    assert health.status_code == 200 and metrics.status_code == 200 and fb.status_code == 200
    assert in_flight > 60 and still > 20, "generation finished before the probes: the test proved nothing"
    assert took < 1.5, f"health + metrics + feedback took {took:.1f} s behind {still} generations"


def test_an_engine_error_after_streamed_text_ends_the_stream_with_an_error_and_a_failed_row(
        tmp_path, tiny_backend, tiny_model_dir, monkeypatch):
    """The backend fails after text was sent: the client gets that text, then an error event (no [DONE]), and the
    row says ``failed`` with exactly the text sent. The backend is a real upstream (another ownllm gateway) whose
    own store fails mid-stream, so its stream ends with an error event after text, as llama-server's and vLLM's
    do when they fail mid-generation."""
    from feedback.app import create_app
    from feedback.config import ServeConfig
    from gateway_fixtures import staff_front

    up_db = tmp_path / "upstream.db"
    upstream, up_keys, _ = start_gateway(f"sqlite:///{up_db}", tiny_backend, tiny_model_dir, sqlite_busy_timeout_s=0.3)
    front_url, auth = staff_front(tmp_path, {"tiny": "all"})
    monkeypatch.setenv("OWNLLM_TEST_UPSTREAM_KEY", up_keys["alice"])
    blocker = sqlite3.connect(up_db, isolation_level=None, timeout=30)
    with live_server(upstream) as up_url:
        front = create_app(ServeConfig(db_url=front_url, backend="openai", upstream_url=up_url + "/v1",
                                       upstream_fim="suffix", upstream_api_key_env="OWNLLM_TEST_UPSTREAM_KEY"))
        with live_server(front) as url:
            with httpx.stream("POST", url + "/v1/completions", json=LONG, headers=auth, timeout=60) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                events = [next(ln for ln in lines if ln.startswith("data: "))]  # text has reached the client
                blocker.execute("BEGIN IMMEDIATE")  # the upstream cannot log its stream: it will end in an error
                try:
                    events += [ln for ln in lines if ln.startswith("data: ")]
                finally:
                    blocker.execute("ROLLBACK")
                    blocker.close()
    assert "data: [DONE]" not in events
    last = json.loads(events[-1][6:])
    assert last["error"]["type"] == "backend_error" and "failed mid-stream" in last["error"]["message"]
    sent = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in events[:-1])
    assert sent  # the error came after text
    (_, _, status, text, _), = rows(tmp_path / "front.db")  # staff_front's store
    assert status == "failed" and text == sent
