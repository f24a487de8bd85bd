"""Privacy on the editor paths: a user who stores no code text, and retention of what users kept."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import select

from feedback import store
from feedback.db import session_factory
from feedback.models import Completion, FeedbackEvent, User
from pipeline.cli import main as ownllm


def test_create_key_can_turn_code_storage_off(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert ownllm(["feedback", "migrate", "--db-url", url]) == 0
    assert ownllm(["feedback", "create-key", "--user", "dana", "--store-code", "no", "--db-url", url]) == 0
    assert "no code text stored" in capsys.readouterr().err
    with session_factory(url)() as s:
        assert s.scalar(select(User).where(User.name == "dana")).store_code is False
    assert ownllm(["feedback", "create-key", "--user", "dana", "--db-url", url]) == 0  # unchanged by default
    with session_factory(url)() as s:
        assert s.scalar(select(User).where(User.name == "dana")).store_code is False
    assert ownllm(["feedback", "create-key", "--user", "dana", "--store-code", "yes", "--db-url", url]) == 0
    with session_factory(url)() as s:
        assert s.scalar(select(User).where(User.name == "dana")).store_code is True


def test_no_code_user_leaves_counts_ids_and_hashes_only(gateway):
    with gateway.factory.begin() as s:
        key = store.create_key(s, "nocode")
        store.get_or_create_user(s, "nocode").store_code = False
    auth = {"Authorization": f"Bearer {key}"}
    prefix, suffix = "def area(r):\n    ", "\n"

    def complete(p):
        body = {"language": "python", "segments": {"prefix": p, "suffix": suffix, "filepath": "geo/secret.py"}}
        r = httpx.post(gateway.url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    first = complete(prefix)
    for ev in ({"type": "view"}, {"type": "select"}):
        r = httpx.post(gateway.url + "/v1/events", json={**ev, "completion_id": first["id"], "choice_index": 0},
                       headers=auth, timeout=30)
        assert r.status_code == 200, r.text
    complete(prefix + "return 3.14 * r * r\n    ")  # would derive kept_text for a user who stores code
    outcome = {"completionId": "nocode-1", "accepted": True, "time": 50, "prefix": "SECRET = 1\n", "suffix": "",
               "prompt": "SECRET = 1\n", "completion": "SECRET_TOO = 2", "modelName": "tiny", "cacheHit": False,
               "filepath": "file:///p/secret.py", "timestamp": "2026-11-30T00:00:00Z"}
    assert httpx.post(gateway.url + "/v1/events/continue", json=outcome, headers=auth, timeout=30).status_code == 200
    with gateway.factory() as s:
        rows = s.scalars(select(Completion).join(User).where(User.name == "nocode")).all()
        assert len(rows) == 3
        for row in rows:
            assert (row.prompt, row.suffix, row.completion, row.kept_text) == (None, None, None, None)
            assert row.prompt_hash and row.filepath  # ids, hashes and where it was: what analytics needs
        tabby_row = next(r for r in rows if r.request_id == first["id"])
        assert tabby_row.prompt_hash == store.sha256(prefix) and tabby_row.viewed_at is not None
        assert s.scalar(select(FeedbackEvent.kind).where(FeedbackEvent.completion_id == tabby_row.id)).value == \
            "accepted"


def test_retention_purge_clears_derived_kept_text(gateway):
    head = "def area(r):\n    "
    h = gateway.headers("alice")
    body = lambda p: {"language": "python", "segments": {"prefix": p, "suffix": "\n", "filepath": "geo/old.py"}}  # noqa: E731
    first = httpx.post(gateway.url + "/v1/completions", json=body(head), headers=h, timeout=60).json()
    httpx.post(gateway.url + "/v1/completions", json=body(head + "return r * r\n    "), headers=h, timeout=60)
    with gateway.factory.begin() as s:
        row = s.scalar(select(Completion).where(Completion.request_id == first["id"]))
        assert (row.kept_text, row.kept_source) == ("return r * r", "derived")
        row.created_at -= timedelta(days=40)  # older than serve.retention_days
    with gateway.factory.begin() as s:
        assert store.purge_texts(s, 30) >= 1
    with gateway.factory() as s:
        row = s.scalar(select(Completion).where(Completion.request_id == first["id"]))
        assert (row.prompt, row.completion, row.kept_text) == (None, None, None)
        assert row.kept_source == "derived" and row.prompt_hash  # provenance and hashes survive, text does not
