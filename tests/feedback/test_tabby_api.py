"""The Tabby server API of the gateway over real HTTP: health, server setting, the Tabby completion shape
beside the OpenAI one on /v1/completions, events (view / select / line select / dismiss), auth, errors."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from feedback.analytics import report
from feedback.models import Completion, FeedbackEvent


def post(gw, user, path, body, **kw):
    return httpx.post(gw.url + path, json=body, headers=gw.headers(user) if user else {}, timeout=60, **kw)


def tabby_completion(gw, user="alice", language="python", prefix="def add(a, b):\n    ", suffix="\n",
                     filepath="src/calc.py", **extra):
    body = {"language": language, "segments": {"prefix": prefix, "suffix": suffix, "filepath": filepath,
                                               "git_url": "https://git.example.com/team/calc.git",
                                               "declarations": [{"filepath": "src/util.py", "body": "def f(): ..."}],
                                               "clipboard": "x"}, **extra}
    r = post(gw, user, "/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def rows(gw, rid):
    with gw.factory() as s:
        return s.scalars(select(Completion).options(selectinload(Completion.user))
                         .where(Completion.request_id == rid).order_by(Completion.choice_index)).all()


def decision(gw, rid, index=0):
    with gw.factory() as s:
        return s.scalar(select(FeedbackEvent).join(Completion).where(Completion.request_id == rid,
                                                                     Completion.choice_index == index))


def test_health_and_server_setting_answer_the_agent(gateway):
    assert httpx.get(gateway.url + "/v1/health").status_code == 401  # the agent turns "unauthorized"
    h = httpx.get(gateway.url + "/v1/health", headers=gateway.headers("alice")).json()
    assert h["model"] == "tiny" and h["device"] == "cpu" and isinstance(h["cuda_devices"], list)
    # tabby-agent fetches /v1beta/server_setting only from servers whose git_describe is >= 0.9.0
    assert h["version"]["git_describe"].startswith("v0.11.0-ownllm-")
    assert httpx.post(gateway.url + "/v1/health", headers=gateway.headers("alice")).json()["model"] == "tiny"
    s = httpx.get(gateway.url + "/v1beta/server_setting", headers=gateway.headers("bob"))
    assert s.status_code == 200 and s.json() == {"disable_client_side_telemetry": True}


def test_tabby_shape_is_served_and_logged_beside_the_openai_shape(gateway):
    out = tabby_completion(gateway, language="typescriptreact", user="bob", filepath="web/app.tsx")
    assert set(out) == {"id", "choices"} and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0] and isinstance(out["choices"][0]["text"], str)
    (row,) = rows(gateway, out["id"])
    assert (row.client, row.language, row.filepath, row.git_url) == (
        "tabby", "typescript", "web/app.tsx", "https://git.example.com/team/calc.git")
    assert row.user.name == "bob" and row.prompt == "def add(a, b):\n    " and row.suffix == "\n"
    assert row.completion == out["choices"][0]["text"]
    # The same path still speaks OpenAI, and the same cursor gives the same (greedy) text on both shapes.
    oa = post(gateway, "bob", "/v1/completions", {"model": "auto", "prompt": "def add(a, b):\n    ", "suffix": "\n",
                                                  "max_tokens": 64, "temperature": 0})
    assert oa.status_code == 200 and oa.json()["object"] == "text_completion"
    assert oa.json()["choices"][0]["text"] == out["choices"][0]["text"]
    assert rows(gateway, oa.json()["id"])[0].client == "openai"


@pytest.mark.parametrize("body, needle", [
    ({"language": "python", "segments": {"suffix": "x"}}, "segments.prefix"),
    ({"language": "python", "segments": "def f():"}, "segments"),
    ({"language": "python", "segments": {"prefix": "x", "filepath": "a" * 2000}}, "segments.filepath"),
    ({"language": "python", "segments": {"prefix": "x"}, "temperature": 9}, "temperature"),
    ({"segments": {"prefix": "x"}, "debug_options": {"raw_prompt": "<fim_prefix>"}}, "raw_prompt"),
    ({"prompt": "x"}, "model"),
])
def test_bad_completion_bodies_are_400_naming_the_field(gateway, body, needle):
    r = post(gateway, "alice", "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_events_view_select_line_select_dismiss(gateway):
    a = tabby_completion(gateway, prefix="import os\n\n\ndef main():\n    ")
    b = tabby_completion(gateway, prefix="import sys\n\n\ndef run():\n    ")
    ev = lambda **kw: post(gateway, "alice", "/v1/events", {"choice_index": 0, **kw})  # noqa: E731
    assert ev(type="view", completion_id=a["id"], view_id="v1").status_code == 200
    (row,) = rows(gateway, a["id"])
    first_view = row.viewed_at
    assert first_view is not None
    assert ev(type="view", completion_id=a["id"], view_id="v2").status_code == 200
    assert rows(gateway, a["id"])[0].viewed_at == first_view  # the first view is kept

    # A line-only accept, the way tabby-agent sends it: query parameter and body field.
    r = httpx.post(gateway.url + "/v1/events?select_kind=line", headers=gateway.headers("alice"), timeout=30,
                   json={"type": "select", "completion_id": a["id"], "choice_index": 0, "select_kind": "line",
                         "elapsed": 850})
    assert r.status_code == 200 and r.json()["duplicate"] is False
    text = a["choices"][0]["text"]
    fb = decision(gateway, a["id"])
    assert fb.kind.value == "accepted" and fb.time_to_decision_ms == 850
    assert fb.accepted_chars == (text.index("\n") + 1 if "\n" in text else len(text))
    # Accepting the rest makes it a whole accept; a second identical event is a no-op.
    assert ev(type="select", completion_id=a["id"], elapsed=900).json()["duplicate"] is True
    assert decision(gateway, a["id"]).accepted_chars is None

    assert ev(type="dismiss", completion_id=b["id"], elapsed=1200).status_code == 200
    fb = decision(gateway, b["id"])
    assert fb.kind.value == "rejected" and fb.time_to_decision_ms == 1200
    assert rows(gateway, b["id"])[0].viewed_at is not None  # a decision implies it was shown
    # VS Code dismisses whatever is shown when it asks for the next completion, then shows a cached completion
    # (same id) again: taken at a later showing, it is accepted.
    assert ev(type="view", completion_id=b["id"], view_id="v3").status_code == 200
    r = ev(type="select", completion_id=b["id"], select_kind="line", elapsed=300)
    assert r.status_code == 200 and r.json()["duplicate"] is False
    fb = decision(gateway, b["id"])
    assert fb.kind.value == "accepted" and fb.time_to_decision_ms == 300 and fb.accepted_chars is not None
    # ... and the rest of a partly accepted completion dismissed leaves the accept as it was.
    r = ev(type="dismiss", completion_id=b["id"], elapsed=900)
    assert r.status_code == 200 and r.json()["duplicate"] is True
    assert decision(gateway, b["id"]).kind.value == "accepted"


def test_events_are_the_users_own_and_well_formed(gateway):
    a = tabby_completion(gateway, user="alice")
    r = post(gateway, "bob", "/v1/events", {"type": "select", "completion_id": a["id"], "choice_index": 0})
    assert r.status_code == 404 and decision(gateway, a["id"]) is None  # someone else's = not there
    assert post(gateway, None, "/v1/events", {"type": "view", "completion_id": a["id"]}).status_code == 401
    r = post(gateway, "alice", "/v1/events", {"type": "hover", "completion_id": a["id"], "choice_index": 0})
    assert r.status_code == 400 and "type" in r.json()["error"]["message"]
    r = post(gateway, "alice", "/v1/events", {"type": "view", "completion_id": a["id"], "choice_index": 3})
    assert r.status_code == 404 and "choice 3" in r.json()["error"]["message"]
    r = post(gateway, "alice", "/v1/events", {"type": "dismiss", "completion_id": a["id"], "elapsed": -5})
    assert r.status_code == 400 and "elapsed" in r.json()["error"]["message"]


def test_views_are_the_denominator_and_silence_counts_as_ignored(gateway):
    # Its own language, so this cell holds only this test's completions.
    ids = [tabby_completion(gateway, language="rust", prefix=f"fn f{i}() {{\n    ")["id"] for i in range(4)]
    ev = lambda t, i: post(gateway, "alice", "/v1/events", {"type": t, "completion_id": ids[i]})  # noqa: E731
    for i in range(4):
        assert ev("view", i).status_code == 200
    ev("select", 0)
    ev("dismiss", 1)
    with gateway.factory.begin() as s:  # completion 2 was shown a minute ago; 3 was just shown
        row = s.scalar(select(Completion).where(Completion.request_id == ids[2]))
        row.viewed_at -= timedelta(seconds=60)
    with gateway.factory() as s:
        (cell,) = [c for c in report(s, None, None, ignored_after_s=10)["by_version_language"]
                   if c["language"] == "rust"]
    assert (cell["served"], cell["viewed"], cell["decided"], cell["ignored"], cell["shown"]) == (4, 4, 2, 1, 3)
    assert cell["rate"] == pytest.approx(1 / 3)
    with gateway.factory() as s:  # a longer window: completion 2 is still undecided, not yet ignored
        (cell,) = [c for c in report(s, None, None, ignored_after_s=120)["by_version_language"]
                   if c["language"] == "rust"]
    assert (cell["ignored"], cell["rate"]) == (0, 0.5)
