"""Continue's autocomplete outcomes (schema 0.2.0, as its http data destination POSTs them) into the store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from feedback.models import Completion, FeedbackEvent

FIXTURES = Path(__file__).parent / "fixtures"
URL = "/v1/events/continue"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


ALL = fixture("continue_autocomplete_0.2.0.json")
NOCODE = fixture("continue_autocomplete_0.2.0_nocode.json")


def envelope(completion_id: str, accepted: bool | None = True, **data) -> dict:
    env = copy.deepcopy(ALL)
    env["data"].update(completionId=completion_id, accepted=accepted, **data)
    if accepted is None:
        del env["data"]["accepted"]
    return env


def post(gw, user, body):
    return httpx.post(gw.url + URL, headers=gw.headers(user) if user else {}, json=body, timeout=30)


def continue_rows(gw, completion_id):
    with gw.factory() as s:
        return s.execute(select(Completion, FeedbackEvent).outerjoin(FeedbackEvent)
                         .options(selectinload(Completion.user), selectinload(Completion.model_version))
                         .where(Completion.request_id == f"continue-{completion_id}")).all()


def count_continue(gw) -> int:
    with gw.factory() as s:
        return s.scalar(select(func.count()).select_from(Completion).where(Completion.client == "continue"))


def feedback_counter(gw, language: str, event: str) -> float:
    want = {"model": "tiny", "language": language, "event": event}
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "ownllm_feedback_total" and sample.labels == want:
                return sample.value
    return 0.0


def test_an_accepted_outcome_as_continue_posts_it(gateway):
    before = feedback_counter(gateway, "python", "accepted")
    r = post(gateway, "alice", ALL)
    assert r.status_code == 200, r.text
    assert r.json() == {"events": [{"completionId": ALL["data"]["completionId"], "stored": True,
                                    "decision": "accepted"}], "skipped": 0}
    ((row, fb),) = continue_rows(gateway, ALL["data"]["completionId"])
    d = ALL["data"]
    assert (row.client, row.user.name, row.language, row.filepath, row.git_url) == (
        "continue", "alice", "python", d["filepath"], d["gitRepo"])
    assert (row.prompt, row.suffix, row.completion) == (d["prefix"], d["suffix"], d["completion"])
    assert row.model_version.name == "tiny" and row.latency_ms == pytest.approx(184.2)
    assert row.viewed_at == row.created_at and row.created_at.isoformat().startswith("2026-11-30T00:50:12.345")
    assert fb.kind.value == "accepted" and feedback_counter(gateway, "python", "accepted") == before + 1
    # Continue retries and replays: the same outcome again stores nothing twice.
    again = post(gateway, "alice", ALL).json()
    assert again["events"][0]["duplicate"] is True and len(continue_rows(gateway, d["completionId"])) == 1
    assert feedback_counter(gateway, "python", "accepted") == before + 1
    # ... and a contradicting decision for the same completionId is a conflict, not an overwrite.
    r = post(gateway, "alice", envelope(d["completionId"], accepted=False))
    assert r.status_code == 409 and "already accepted" in r.json()["error"]["message"]


def test_nocode_level_stores_counts_and_ids_only(gateway):
    r = post(gateway, "bob", NOCODE)
    assert r.status_code == 200, r.text
    ((row, fb),) = continue_rows(gateway, NOCODE["data"]["completionId"])
    assert (row.prompt, row.suffix, row.completion) == (None, None, None)
    assert row.language == "typescript" and fb.kind.value == "rejected"
    assert row.model_version.name == "tiny"  # an unregistered modelName: the version routed to this user


def test_a_batch_of_bare_outcomes_and_other_events(gateway):
    bare = [envelope(f"batch-{i}", accepted=i % 2 == 0)["data"] for i in range(3)]
    chat = {"name": "chatFeedback", "schema": "0.2.0", "level": "all", "data": {"feedback": True}}
    undecided = envelope("batch-undecided", accepted=None)
    r = post(gateway, "alice", [*bare, chat, undecided])
    assert r.status_code == 200, r.text
    assert r.json()["skipped"] == 1 and len(r.json()["events"]) == 4
    assert [continue_rows(gateway, f"batch-{i}")[0][1].kind.value for i in range(3)] == [
        "accepted", "rejected", "accepted"]
    ((row, fb),) = continue_rows(gateway, "batch-undecided")
    assert fb is None and row.viewed_at is not None


@pytest.mark.parametrize("body, status, needle", [
    ({**ALL, "data": {k: v for k, v in ALL["data"].items() if k != "completionId"}}, 400, "completionId"),
    (envelope("bad-accepted", accepted="yes"), 400, "accepted"),
    (envelope("bad-time", timestamp="yesterday"), 400, "timestamp"),
    (envelope("bad-time", time=-1), 400, "time"),
    ({**ALL, "schema": "9.9.9"}, 400, "9.9.9"),
    ([], 400, "empty batch"),
    ([envelope("ok-1"), "not an object"], 400, "event[1]"),
    ([envelope("ok-2"), envelope("bad", filepath=None)], 400, "event[1].data: filepath"),
    (envelope("too-long-id" * 10), 400, "completionId"),
])
def test_malformed_events_are_4xx_and_store_nothing(gateway, body, status, needle):
    before = count_continue(gateway)
    r = post(gateway, "alice", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert count_continue(gateway) == before  # a batch is all or nothing


def test_not_json_unauthenticated_and_oversized(gateway):
    r = httpx.post(gateway.url + URL, content=b"{not json", timeout=30,
                   headers={**gateway.headers("alice"), "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert post(gateway, None, ALL).status_code == 401
    before = count_continue(gateway)
    huge = envelope("huge", prefix="x = 1\n" * 200_000)  # over serve.max_body_bytes (1 MB)
    r = post(gateway, "alice", huge)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    big = envelope("big", prefix="x = 1\n" * 6000)  # under the body limit, over serve.max_prompt_chars
    r = post(gateway, "alice", big)
    assert r.status_code == 400 and "over the limit" in r.json()["error"]["message"]
    too_many = [envelope(f"n{i}")["data"] for i in range(1001)]
    for o in too_many:
        o["prefix"] = o["suffix"] = o["prompt"] = o["completion"] = ""
    r = post(gateway, "alice", too_many)
    assert r.status_code == 400 and "too many events" in r.json()["error"]["message"]
    assert count_continue(gateway) == before


def test_another_users_completion_id_is_a_conflict(gateway):
    assert post(gateway, "alice", envelope("shared-id")).status_code == 200
    r = post(gateway, "bob", envelope("shared-id"))
    assert r.status_code == 409
    ((row, _),) = continue_rows(gateway, "shared-id")
    assert row.user.name == "alice"
