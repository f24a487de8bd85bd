"""Bad input is a 4xx with a message (never a 500); a store that is unreachable is a 503 with nothing half-written."""

from __future__ import annotations

import shutil
import sqlite3
import time

import httpx
import pytest

from gateway_fixtures import live_server, start_gateway

OK = {"model": "auto", "prompt": "def f(x):\n", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tiny_backend, tiny_model_dir):
    """A gateway with small limits, so each limit can be hit with a small request."""
    db = f"sqlite:///{tmp_path_factory.mktemp('strict') / 'feedback.db'}"
    app, keys, factory = start_gateway(db, tiny_backend, tiny_model_dir, max_prompt_chars=200, max_tokens_limit=16,
                                       max_n=2, max_body_bytes=4096)
    with live_server(app) as url:
        yield url, {"Authorization": f"Bearer {keys['alice']}"}


@pytest.mark.parametrize("body, field", [
    ({**OK, "prompt": None}, "prompt"),
    ({k: v for k, v in OK.items() if k != "prompt"}, "prompt"),
    ({k: v for k, v in OK.items() if k != "model"}, "model"),
    ({**OK, "model": "m" * 200}, "model"),
    ({**OK, "user": "u" * 300}, "user"),
    ({**OK, "max_tokens": 0}, "max_tokens"),
    ({**OK, "max_tokens": 17}, "max_tokens"),
    ({**OK, "temperature": -1}, "temperature"),
    ({**OK, "n": 3}, "n"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**OK, "prompt": "x" * 201}, "prompt"),
    ({**OK, "prompt": ["a", "b"]}, "prompt"),
    ({**OK, "language": "py thon"}, "language"),
    ({**OK, "logprobs": 5}, "logprobs"),
    ([1, 2, 3], "body"),
])
def test_invalid_completion_request_is_400_naming_the_field(strict, body, field):
    url, auth = strict
    r = httpx.post(url + "/v1/completions", json=body, headers=auth)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_is_400(strict):
    url, auth = strict
    r = httpx.post(url + "/v1/completions", content=b'{"model": "auto", "prompt": ', headers={
        **auth, "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_oversized_body_is_413_even_without_content_length(strict):
    url, auth = strict
    big = {**OK, "prompt": "x" * 10_000}
    r = httpx.post(url + "/v1/completions", json=big, headers=auth)
    assert r.status_code == 413 and "larger than 4096" in r.json()["error"]["message"]

    def chunks():  # chunked transfer encoding: no Content-Length to trust
        yield b'{"model": "auto", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_model_and_unknown_route(strict):
    url, auth = strict
    r = httpx.post(url + "/v1/completions", json={**OK, "model": "gpt-4"}, headers=auth)
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]
    assert httpx.get(url + "/v2/nothing", headers=auth).status_code == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer ollm-not-a-key"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer"}])
def test_no_key_or_wrong_key_is_401(strict, headers):
    url, _ = strict
    for method, path, body in (("POST", "/v1/completions", OK), ("POST", "/v1/feedback", {"id": "x", "event": "accepted"}),
                               ("GET", "/v1/models", None)):
        r = httpx.request(method, url + path, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body", [{"id": "cmpl-x", "event": "maybe"}, {"id": "", "event": "accepted"},
                                  {"id": "cmpl-x", "event": "accepted", "time_to_decision_ms": -1},
                                  {"events": []}, {"id": "cmpl-x", "event": "accepted", "extra": 1}])
def test_bad_feedback_is_400(strict, body):
    url, auth = strict
    r = httpx.post(url + "/v1/feedback", json=body, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_unknown_completion_id_is_404(strict):
    url, auth = strict
    assert httpx.post(url + "/v1/feedback", json={"id": "cmpl-0000", "event": "accepted"},
                      headers=auth).status_code == 404
    assert httpx.get(url + "/v1/completions/cmpl-0000", headers=auth).status_code == 404


# ------------------------------------------------------------------------------------------ store down
@pytest.fixture
def fragile(tmp_path, tiny_backend, tiny_model_dir):
    """A gateway whose SQLite store lives in its own directory, with a short busy timeout."""
    db_dir = tmp_path / "store"
    db_path = db_dir / "feedback.db"
    app, keys, factory = start_gateway(f"sqlite:///{db_path}", tiny_backend, tiny_model_dir,
                                       sqlite_busy_timeout_s=0.3)
    with live_server(app) as url:
        yield url, {"Authorization": f"Bearer {keys['alice']}"}, db_path, factory


def _count(db_path, table):
    with sqlite3.connect(db_path) as c:
        return c.execute(f"select count(*) from {table}").fetchone()[0]


def test_store_locked_at_write_time_is_503_and_nothing_half_written(fragile):
    url, auth, db_path, _ = fragile
    cid = httpx.post(url + "/v1/completions", json=OK, headers=auth).json()["id"]
    before = (_count(db_path, "completions"), _count(db_path, "feedback_events"))
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: reads work (WAL), every write times out
    try:
        r = httpx.post(url + "/v1/completions", json={**OK, "n": 2}, headers=auth, timeout=30)
        assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
        assert r.headers["retry-after"]
        f = httpx.post(url + "/v1/feedback", json={"id": cid, "event": "accepted"}, headers=auth, timeout=30)
        assert f.status_code == 503
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (_count(db_path, "completions"), _count(db_path, "feedback_events")) == before
    # Once the store is back, the same feedback goes through: the failed attempt left nothing behind.
    ok = httpx.post(url + "/v1/feedback", json={"id": cid, "event": "accepted"}, headers=auth)
    assert ok.status_code == 200 and ok.json()["duplicate"] is False


def test_store_gone_is_503_everywhere_then_recovers(fragile):
    url, auth, db_path, _ = fragile
    before = _count(db_path, "completions")
    moved = db_path.parent.with_name("moved")
    shutil.move(db_path.parent, moved)  # the database directory disappears (disk unmounted, volume lost)
    try:
        for method, path, body in (("POST", "/v1/completions", OK), ("GET", "/v1/models", None),
                                   ("GET", "/healthz", None)):
            r = httpx.request(method, url + path, json=body, headers=auth, timeout=30)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["type"] == "store_unavailable"
    finally:
        shutil.move(moved, db_path.parent)
    assert httpx.post(url + "/v1/completions", json=OK, headers=auth).status_code == 200
    assert _count(db_path, "completions") == before + 1


@pytest.fixture
def fragile_ct2(tmp_path, tiny_ct2_backend, tiny_ct2_model_dir):
    """:func:`fragile` on the CTranslate2 engine, whose rows are written as 'pending' while it decodes."""
    db_path = tmp_path / "store" / "feedback.db"
    app, keys, factory = start_gateway(f"sqlite:///{db_path}", tiny_ct2_backend, tiny_ct2_model_dir,
                                       sqlite_busy_timeout_s=0.3)
    with live_server(app) as url:
        yield url, {"Authorization": f"Bearer {keys['alice']}"}, db_path, factory


def test_engine_rows_are_pending_during_decoding_and_served_right_after_the_reply(fragile_ct2):
    url, auth, db_path, _ = fragile_ct2
    r = httpx.post(url + "/v1/completions", json={**OK, "n": 2}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while True:  # written (pending) before the reply, completed just after it (feedback/inflight.py)
        with sqlite3.connect(db_path) as c:
            rows = c.execute("select choice_index, status, completion, prompt_tokens from completions "
                             "where request_id = ? order by choice_index", (r.json()["id"],)).fetchall()
        assert len(rows) == 2
        if all(st != "pending" for _, st, _, _ in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert [(i, st) for i, st, _, _ in rows] == [(0, "served"), (1, "served")]
    assert [t for _, _, t, _ in rows] == [c["text"] for c in r.json()["choices"]]
    assert all(p == r.json()["usage"]["prompt_tokens"] > 0 for _, _, _, p in rows)


def test_engine_store_locked_before_decoding_ends_is_503_and_nothing_recorded(fragile_ct2):
    url, auth, db_path, _ = fragile_ct2
    before = _count(db_path, "completions")
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        r = httpx.post(url + "/v1/completions", json=OK, headers=auth, timeout=30)
        assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _count(db_path, "completions") == before  # the pending rows were never written: nothing was served
