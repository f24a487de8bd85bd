"""Group commit of POST /v1/feedback (feedback/ingest.py): concurrent one-event requests share transactions,
every request still gets its own answer, nothing answered 200 is missing and nothing missing was answered 200."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import insert, select, text

from feedback import store
from feedback.db import session_factory
from feedback.models import Completion, FeedbackEvent, FeedbackKind, utcnow
from gateway_fixtures import fresh_pg_url, live_server, start_gateway


def _completions(factory, keys: dict[str, str], per_user: int) -> None:
    with factory.begin() as s:
        v = store.get_version(s, "tiny")
        users = {name: store.authenticate(s, key) for name, key in keys.items()}
        s.execute(insert(Completion), [dict(request_id=f"cmpl-{name}-{i}", choice_index=0, user_id=u.id,
                                            model_version_id=v.id, language="python", prompt="p", completion="ret",
                                            prompt_hash="h", finish_reason="stop", prompt_tokens=1,
                                            completion_tokens=1, latency_ms=1.0,
                                            created_at=utcnow() - timedelta(seconds=1))
                                       for name, u in users.items() for i in range(per_user)])


async def _send_all(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Every request at once, each on its own connection: the writer sees them queue up together."""
    limits = httpx.Limits(max_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return await asyncio.gather(*(c.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"})
                                      for key, body in requests))


def test_store_decides_a_group_in_order_and_each_request_all_or_nothing(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        a, b = store.get_or_create_user(s, "alice"), store.get_or_create_user(s, "bob")
        v = store.register_model_version(s, "base", "models/base", state="all")
        for user, rid in ((a, "a1"), (a, "a2"), (b, "b1"), (b, "b2")):
            s.add(Completion(request_id=rid, choice_index=0, user_id=user.id, model_version_id=v.id,
                             language="python", prompt="p", completion="ret", prompt_hash="h", finish_reason="stop",
                             prompt_tokens=1, completion_tokens=1, latency_ms=1.0, created_at=utcnow()))
    acc, rej = FeedbackKind.accepted, FeedbackKind.rejected
    with f.begin() as s:
        a, b = store.get_or_create_user(s, "alice"), store.get_or_create_user(s, "bob")
        out = store.record_feedback_many(s, [
            (a, [store.FeedbackInput("a1", acc)]),
            (a, [store.FeedbackInput("a1", rej)]),  # contradicts the request before it in the same group
            (a, [store.FeedbackInput("a2", acc), store.FeedbackInput("b1", acc)]),  # bob's: the whole request fails
            (b, [store.FeedbackInput("b1", rej, accepted_chars=None)]),
            (a, [store.FeedbackInput("a1", acc)]),  # a repeat of the first: a duplicate, not an error
            (b, [store.FeedbackInput("b2", acc, accepted_chars=99)]),  # longer than the suggestion
        ])
    assert not isinstance(out[0], Exception) and out[0][0].duplicate is False
    assert isinstance(out[1], store.Conflict)
    assert isinstance(out[2], store.NotFound)  # and a2 is not stored although it alone was fine
    assert not isinstance(out[3], Exception)
    assert not isinstance(out[4], Exception) and out[4][0].duplicate is True
    assert type(out[5]) is store.StoreError
    with f() as s:
        stored = {(c.request_id, e.kind) for e, c in s.execute(select(FeedbackEvent, Completion).join(Completion))}
    assert stored == {("a1", acc), ("b1", rej)}


def test_concurrent_requests_share_transactions_and_each_gets_its_own_answer(tmp_path, tiny_backend, tiny_model_dir):
    app, keys, factory = start_gateway(f"sqlite:///{tmp_path / 'f.db'}", tiny_backend, tiny_model_dir)
    _completions(factory, {"alice": keys["alice"], "bob": keys["bob"]}, 40)
    reqs = [(keys["alice"], {"id": f"cmpl-alice-{i}", "event": "accepted"}) for i in range(40)]
    reqs += [(keys["bob"], {"id": f"cmpl-bob-{i}", "event": "rejected"}) for i in range(30)]
    reqs += [(keys["alice"], {"id": "cmpl-bob-35", "event": "accepted"}),  # someone else's completion: 404
             (keys["bob"], {"id": "cmpl-alice-0", "event": "rejected"}),  # someone else's again
             ("ollm-not-a-key", {"id": "cmpl-bob-36", "event": "accepted"}),  # unknown key: 401
             (keys["bob"], {"id": "cmpl-bob-37", "event": "accepted", "accepted_chars": 50})]  # 400
    with live_server(app) as url:
        first = asyncio.run(_send_all(url, reqs))
        # the same decisions again are duplicates; the opposite decision is a conflict
        again = asyncio.run(_send_all(url, [(keys["alice"], {"id": f"cmpl-alice-{i}", "event": "accepted"})
                                            for i in range(5)]
                                      + [(keys["alice"], {"id": "cmpl-alice-5", "event": "rejected"})]))
    codes = [r.status_code for r in first]
    assert codes == [200] * 70 + [404, 404, 401, 400], [r.text for r in first if r.status_code != 200][:3]
    assert all(r.json()["duplicate"] is False for r in first[:70])
    assert first[0].json() == {"id": "cmpl-alice-0", "index": 0, "event": "accepted", "duplicate": False}
    assert "cmpl-bob-35" in first[70].json()["error"]["message"]
    assert [r.status_code for r in again] == [200] * 5 + [409]
    assert all(r.json()["duplicate"] is True for r in again[:5])
    writer = app.state.feedback_writer
    assert writer.groups < 74, "74 requests at once were written one transaction each: nothing was grouped"
    with factory() as s:
        stored = dict(s.execute(select(Completion.request_id, FeedbackEvent.kind).join(FeedbackEvent)).all())
    assert stored == {**{f"cmpl-alice-{i}": FeedbackKind.accepted for i in range(40)},
                      **{f"cmpl-bob-{i}": FeedbackKind.rejected for i in range(30)}}


@pytest.mark.postgres
def test_a_commit_that_fails_answers_every_request_of_its_group_with_an_error(tiny_backend, tiny_model_dir):
    """A real failure at COMMIT (a deferred constraint trigger), not an injected exception: every request in a
    failed group gets a 503 and has nothing stored; every 200 is stored. No lie either way."""
    url_db = fresh_pg_url()
    app, keys, factory = start_gateway(url_db, tiny_backend, tiny_model_dir)
    _completions(factory, {"alice": keys["alice"]}, 60)
    with factory.begin() as s:
        s.execute(text("""CREATE FUNCTION refuse_666() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.time_to_decision_ms = 666 THEN RAISE EXCEPTION 'refused at commit'; END IF;
            RETURN NEW; END $$"""))
        s.execute(text("CREATE CONSTRAINT TRIGGER refuse_666 AFTER INSERT ON feedback_events "
                       "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_666()"))
    poisoned = {7, 31, 55}
    reqs = [(keys["alice"], {"id": f"cmpl-alice-{i}", "event": "accepted",
                             "time_to_decision_ms": 666 if i in poisoned else 10}) for i in range(60)]
    with live_server(app) as url:
        out = asyncio.run(_send_all(url, reqs))
    with factory() as s:
        stored = set(s.scalars(select(Completion.request_id).join(FeedbackEvent)))
    ok = {f"cmpl-alice-{i}" for i, r in enumerate(out) if r.status_code == 200}
    assert {r.status_code for r in out} <= {200, 503}
    assert all(out[i].status_code == 503 and out[i].json()["error"]["type"] == "store_unavailable" for i in poisoned)
    assert stored == ok and ok  # every 200 is stored, every 503 is not
