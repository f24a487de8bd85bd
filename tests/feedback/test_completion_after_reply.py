"""A completion's rows are completed after its reply, and lookups are reused for a second (feedback/inflight.py).

Real uvicorn on 127.0.0.1, the tiny model on the CTranslate2 engine (the path whose rows are completed after the
reply), real SQLite and PostgreSQL. The writes after the reply are held back by occupying the pool that runs
them, so "the reply came first" and "the reader waited for the row" are observed, not assumed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import select, update

from feedback import store
from feedback.app import create_app
from feedback.config import ServeConfig
from feedback.models import ApiKey, Completion, FeedbackEvent
from gateway_fixtures import PreloadedPool, live_server, start_gateway

BODY = {"model": "auto", "prompt": "import os\n", "max_tokens": 8, "temperature": 0}


@contextmanager
def completions_held(app):
    """Occupy every thread that completes rows after a reply, until the block ends."""
    inflight = app.state.service.inflight
    release = threading.Event()
    blockers = [inflight.pool.submit(release.wait, 60) for _ in range(inflight.pool._max_workers)]
    try:
        yield
    finally:
        release.set()
        for b in blockers:
            b.result()


def row_of(factory, rid: str) -> Completion:
    with factory() as s:
        return s.scalar(select(Completion).where(Completion.request_id == rid))


def decision_of(factory, rid: str) -> FeedbackEvent | None:
    with factory() as s:
        return s.scalar(select(FeedbackEvent).join(Completion).where(Completion.request_id == rid))


@pytest.fixture
def ct2_gateway(tmp_path, tiny_ct2_backend, tiny_ct2_model_dir):
    app, keys, factory = start_gateway(f"sqlite:///{tmp_path / 'store.db'}", tiny_ct2_backend, tiny_ct2_model_dir)
    with live_server(app) as url:
        yield app, url, keys, factory


def test_the_reply_comes_before_the_completed_row_and_feedback_waits_for_it(ct2_gateway):
    app, url, keys, factory = ct2_gateway
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    with ThreadPoolExecutor(2) as pool:
        with completions_held(app):
            r = httpx.post(url + "/v1/completions", json=BODY, headers=auth, timeout=60)
            assert r.status_code == 200
            rid, text = r.json()["id"], r.json()["choices"][0]["text"]
            assert text
            # Served, and logged before the reply: the row exists, still pending (a crash now leaves it so).
            assert row_of(factory, rid).status == "pending" and row_of(factory, rid).completion == ""
            # An editor's partial accept of the whole text, sent at once, waits for the row (not checked against "").
            accept = pool.submit(httpx.post, url + "/v1/feedback", headers=auth, timeout=60,
                                 json={"id": rid, "event": "accepted", "accepted_chars": len(text)})
            fetch = pool.submit(httpx.get, url + f"/v1/completions/{rid}", headers=auth, timeout=60)
            time.sleep(0.5)
            assert not accept.done() and not fetch.done()
        assert accept.result().status_code == 200, accept.result().text
        assert fetch.result().json()["choices"][0]["text"] == text
    row = row_of(factory, rid)
    assert row.status == "served" and row.completion == text
    assert decision_of(factory, rid).accepted_chars == len(text)
    assert len(app.state.service.inflight) == 0

    # Unheld, the same at full speed: an over-long partial accept is refused against the stored text.
    r = httpx.post(url + "/v1/completions", json=BODY, headers=auth, timeout=60).json()
    bad = httpx.post(url + "/v1/feedback", headers=auth, timeout=60,
                     json={"id": r["id"], "event": "accepted", "accepted_chars": len(text) + 1})
    assert bad.status_code == 400
    assert f"exceeds the suggestion's {len(text)} characters" in bad.json()["error"]["message"]


def test_a_line_accept_from_tabby_waits_for_the_row(ct2_gateway):
    app, url, keys, factory = ct2_gateway
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    body = {"language": "python", "segments": {"prefix": "import os\n", "suffix": ""}}
    with ThreadPoolExecutor(1) as pool, completions_held(app):
        got = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60).json()
        rid, text = got["id"], got["choices"][0]["text"]
        select_line = pool.submit(httpx.post, url + "/v1/events?select_kind=line", headers=auth, timeout=60,
                                  json={"type": "select", "completion_id": rid, "choice_index": 0})
        time.sleep(0.5)
        assert not select_line.done()
    assert select_line.result().status_code == 200
    nl = text.find("\n")
    assert decision_of(factory, rid).accepted_chars == (len(text) if nl < 0 else nl + 1) > 0


@pytest.mark.parametrize("group_commit", [True, False])
def test_another_process_sees_the_row_pending_and_its_feedback_waits(db_url, tiny_ct2_backend, tiny_ct2_model_dir,
                                                                      group_commit):
    """`ownllm serve --workers 2`: the reply came from one process, the feedback goes to the other, which cannot
    see the first one's in-flight map; it finds the row pending and retries until the row is complete."""
    serving, keys, factory = start_gateway(db_url, tiny_ct2_backend, tiny_ct2_model_dir)
    cfg = ServeConfig(db_url=db_url, feedback_group_commit=group_commit, pending_feedback_wait_s=30)
    other = create_app(cfg, backends=PreloadedPool(cfg, tiny_ct2_backend))
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    with live_server(serving) as url_a, live_server(other) as url_b, ThreadPoolExecutor(2) as pool:
        with completions_held(serving):
            r = httpx.post(url_a + "/v1/completions", json=BODY, headers=auth, timeout=60).json()
            rid, text = r["id"], r["choices"][0]["text"]
            accept = pool.submit(httpx.post, url_b + "/v1/feedback", headers=auth, timeout=60,
                                 json={"id": rid, "event": "accepted", "accepted_chars": len(text)})
            time.sleep(0.6)
            assert not accept.done()
            assert decision_of(factory, rid) is None
        assert accept.result().status_code == 200, accept.result().text
        assert decision_of(factory, rid).accepted_chars == len(text)
        assert row_of(factory, rid).status == "served"
        # and a wrong one is still told the stored length, from the other process too
        with completions_held(serving):
            r2 = httpx.post(url_a + "/v1/completions", json=BODY, headers=auth, timeout=60).json()
            bad = pool.submit(httpx.post, url_b + "/v1/feedback", headers=auth, timeout=60,
                              json={"id": r2["id"], "event": "accepted", "accepted_chars": len(text) + 1})
            time.sleep(0.3)
        assert bad.result().status_code == 400
        assert f"exceeds the suggestion's {len(text)} characters" in bad.result().json()["error"]["message"]


def test_feedback_for_a_row_never_completed_is_stored_after_the_wait(tmp_path, tiny_ct2_backend, tiny_ct2_model_dir):
    """The serving process died between its reply and the completed row: the row stays pending (it says the text
    was never recorded as served), and the user's decision is still stored once the wait is over."""
    db = f"sqlite:///{tmp_path / 'store.db'}"
    serving, keys, factory = start_gateway(db, tiny_ct2_backend, tiny_ct2_model_dir)
    cfg = ServeConfig(db_url=db, pending_feedback_wait_s=0.3)
    other = create_app(cfg, backends=PreloadedPool(cfg, tiny_ct2_backend))
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    with live_server(serving) as url_a, live_server(other) as url_b, completions_held(serving):
        rid = httpx.post(url_a + "/v1/completions", json=BODY, headers=auth, timeout=60).json()["id"]
        t0 = time.perf_counter()
        r = httpx.post(url_b + "/v1/feedback", headers=auth, timeout=60,
                       json={"id": rid, "event": "accepted", "accepted_chars": 3})
        assert r.status_code == 200 and time.perf_counter() - t0 >= 0.3
        assert row_of(factory, rid).status == "pending"
        assert decision_of(factory, rid).accepted_chars == 3  # the text is unknown: not checkable


def test_a_revoked_key_and_a_changed_rollout_take_effect_within_the_lookup_ttl(tmp_path, tiny_ct2_backend,
                                                                              tiny_ct2_model_dir):
    ttl = 1.5
    app, keys, factory = start_gateway(f"sqlite:///{tmp_path / 'store.db'}", tiny_ct2_backend, tiny_ct2_model_dir,
                                       lookup_cache_s=ttl)
    with factory.begin() as s:
        store.register_model_version(s, "next", str(tiny_ct2_model_dir), state="staff")
    alice, bob = ({"Authorization": f"Bearer {keys[u]}"} for u in ("alice", "bob"))
    lookups = app.state.service.lookups
    with live_server(app) as url:
        def model_for(auth):
            r = httpx.post(url + "/v1/completions", json=BODY, headers=auth, timeout=60)
            return r.json()["model"] if r.status_code == 200 else r.status_code

        assert model_for(alice) == model_for(bob) == "tiny"
        t_cached = time.monotonic()
        hits = lookups.hits
        # Another process (the CLI) revokes alice's key and moves everyone to "next".
        with factory.begin() as s:
            s.execute(update(ApiKey).where(ApiKey.key_hash == store.sha256(keys["alice"])).values(
                revoked_at=store.utcnow()))
            store.promote(s, "next", "all")
        if time.monotonic() - t_cached < ttl - 0.3:  # still within the TTL: served from the cache, as documented
            assert model_for(bob) == "tiny" and lookups.hits > hits
        time.sleep(max(0.0, ttl - (time.monotonic() - t_cached)) + 0.05)
        assert model_for(alice) == 401
        assert model_for(bob) == "next"


def test_a_rollout_changed_in_this_processs_console_takes_effect_at_once(tmp_path, tiny_ct2_backend,
                                                                        tiny_ct2_model_dir):
    app, keys, factory = start_gateway(f"sqlite:///{tmp_path / 'store.db'}", tiny_ct2_backend, tiny_ct2_model_dir,
                                       lookup_cache_s=60)
    with factory.begin() as s:
        store.register_model_version(s, "next", str(tiny_ct2_model_dir), state="staff")
    bob = {"Authorization": f"Bearer {keys['bob']}"}
    with live_server(app) as url:
        assert httpx.post(url + "/v1/completions", json=BODY, headers=bob, timeout=60).json()["model"] == "tiny"
        r = httpx.post(url + "/console/versions/next/rollout", data={"to": "all", "confirm": "yes"},
                       headers={"Authorization": f"Bearer {keys['staff']}"}, timeout=60)
        assert r.status_code == 303, r.text
        assert httpx.post(url + "/v1/completions", json=BODY, headers=bob, timeout=60).json()["model"] == "next"


def test_a_store_failing_after_the_reply_leaves_the_row_pending_until_a_retry_completes_it(
        tmp_path, tiny_ct2_backend, tiny_ct2_model_dir):
    db_path = tmp_path / "store.db"
    app, keys, factory = start_gateway(f"sqlite:///{db_path}", tiny_ct2_backend, tiny_ct2_model_dir,
                                       sqlite_busy_timeout_s=0.3)
    auth = {"Authorization": f"Bearer {keys['alice']}"}
    failures = app.state.metrics.unlogged
    blocker = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    with live_server(app) as url:
        with completions_held(app):
            r = httpx.post(url + "/v1/completions", json=BODY, headers=auth, timeout=60).json()
            blocker.execute("BEGIN IMMEDIATE")  # the store refuses writes from now on (busy 0.3 s, then an error)
        try:
            deadline = time.monotonic() + 10
            while failures._value.get() < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert failures._value.get() == 1  # the write after the reply failed and is counted
            assert row_of(factory, r["id"]).status == "pending"  # WAL: reads still work
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        deadline = time.monotonic() + 15  # the background retry (0.5 s, 1 s, ...) records it once the store is back
        while row_of(factory, r["id"]).status == "pending" and time.monotonic() < deadline:
            time.sleep(0.1)
    row = row_of(factory, r["id"])
    assert row.status == "served" and row.completion == r["choices"][0]["text"]
