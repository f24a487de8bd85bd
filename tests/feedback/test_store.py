"""The store on SQLite and PostgreSQL: keys hashed, rollout and A/B routing, retention, bounty import, CLI."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from feedback import store
from feedback.db import session_factory
from feedback.models import ApiKey, Completion, FeedbackKind, RolloutState, utcnow
from feedback.routing import NoModel, bucket, route, visible_versions
from pipeline.cli import main as ownllm


def _completion(s, user, version, rid, lang="python", age_days=0.0):
    c = Completion(request_id=rid, choice_index=0, user_id=user.id, model_version_id=version.id, language=lang,
                   prompt="def f():", suffix="\n", completion="    pass", prompt_hash=store.sha256("def f():"),
                   finish_reason="stop", prompt_tokens=3, completion_tokens=2, latency_ms=5.0,
                   created_at=utcnow() - timedelta(days=age_days))
    s.add(c)
    s.flush()
    return c


def test_keys_are_stored_hashed(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        key = store.create_key(s, "alice")
    with f() as s:
        stored = s.scalars(select(ApiKey.key_hash)).all()
        assert stored == [store.sha256(key)] and key not in stored
        assert store.authenticate(s, key).name == "alice"
        assert store.authenticate(s, key + "x") is None
        dump = " ".join(str(v) for row in s.execute(text("select * from api_keys")) for v in row)
        assert key not in dump


def test_rollout_staff_ab_all_retire(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        base = store.register_model_version(s, "base", "models/base", state="all", git_rev="abc",
                                            dvc_lock_hash="d" * 64, eval_results={"fim": {"exact": 0.1}})
        store.register_model_version(s, "tuned", "models/tuned", parent="base", snapshot_hash="s" * 64)
        staff = store.get_or_create_user(s, "staff", staff=True)
        users = [store.get_or_create_user(s, f"user{i}") for i in range(400)]
        assert route(s, staff, None).version.name == "tuned"  # staff see staff versions first
        assert {route(s, u, None).version.name for u in users} == {"base"}
        assert store.get_version(s, "tuned").parent.name == "base"
        with pytest.raises(NoModel):
            route(s, users[0], "tuned")  # not theirs to pick
        store.promote(s, "tuned", "ab:25")
    with f() as s:
        arms = {u.name: route(s, u, None).arm for u in users}
        assert arms == {u.name: route(s, u, None).arm for u in users}  # sticky
        share = Counter(arms.values())["treatment"] / len(users)
        assert 0.18 < share < 0.32
        assert {v.name for v in visible_versions(s, users[0])} >= {"base"}
    with f.begin() as s:
        with pytest.raises(store.StoreError, match="serving everyone"):
            store.promote(s, "base", "staff")  # would leave users without a model
        store.promote(s, "tuned", "all")
        assert store.get_version(s, "base").rollout_state == RolloutState.staff  # one command to roll back
        assert store.running_experiment(s) is None
        assert route(s, users[0], None).version.name == "tuned"
        store.retire(s, "base")
        with pytest.raises(NoModel):
            route(s, staff, "base")
        with pytest.raises(store.StoreError, match="PCT must be between 0 and 100"):
            store.promote(s, "tuned", "ab:150")
        with pytest.raises(store.NotFound):
            store.promote(s, "nope", "all")
        with pytest.raises(store.Conflict, match="other weights"):
            store.register_model_version(s, "base2", "x", model_hash="a" * 64)
            store.register_model_version(s, "base2", "x", model_hash="b" * 64)


def test_bucket_is_stable_and_uniform():
    assert bucket("alice", "exp1") == bucket("alice", "exp1") != bucket("alice", "exp2")
    values = [bucket(f"u{i}", "e") for i in range(2000)]
    assert 0.45 < sum(v < 0.5 for v in values) / len(values) < 0.55


def test_retention_purge_clears_texts_and_keeps_counts(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        u = store.get_or_create_user(s, "alice")
        v = store.register_model_version(s, "base", "models/base", state="all")
        old = _completion(s, u, v, "cmpl-old", age_days=40)
        _completion(s, u, v, "cmpl-new", age_days=1)
        store.record_feedback(s, u, [store.FeedbackInput("cmpl-old", FeedbackKind.accepted)])
        old_hash = old.prompt_hash
    with f.begin() as s:
        assert store.purge_texts(s, 30) == 1
        assert store.purge_texts(s, 30) == 0  # already purged
    with f() as s:
        rows = {c.request_id: c for c in s.scalars(select(Completion))}
        assert rows["cmpl-old"].prompt is None and rows["cmpl-old"].completion is None
        assert rows["cmpl-old"].prompt_hash == old_hash and rows["cmpl-old"].texts_purged_at is not None
        assert rows["cmpl-new"].prompt == "def f():"
        assert store.counts(s)["completions"] == 2 and store.counts(s)["feedback_events"] == 1


def test_feedback_batch_is_all_or_nothing(db_url):
    f = session_factory(db_url)
    with f.begin() as s:
        a, b = store.get_or_create_user(s, "alice"), store.get_or_create_user(s, "bob")
        v = store.register_model_version(s, "base", "models/base", state="all")
        _completion(s, a, v, "cmpl-a")
        _completion(s, b, v, "cmpl-b")
    with pytest.raises(store.NotFound):
        with f.begin() as s:  # bob's completion in alice's batch: nothing of the batch is stored
            store.record_feedback(s, a, [store.FeedbackInput("cmpl-a", FeedbackKind.accepted),
                                         store.FeedbackInput("cmpl-b", FeedbackKind.accepted)])
    with f() as s:
        assert store.counts(s)["feedback_events"] == 0
    with f.begin() as s:
        res = store.record_feedback(s, a, [store.FeedbackInput("cmpl-a", FeedbackKind.rejected)] * 2)
        assert [r.duplicate for r in res] == [False, True]


def test_cli_keys_bounties_models_purge(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert ownllm(["feedback", "create-key", "--user", "x", "--db-url", url]) == 2  # not migrated: clear error
    assert "ownllm feedback migrate" in capsys.readouterr().err
    assert ownllm(["feedback", "migrate", "--db-url", url]) == 0
    capsys.readouterr()
    assert ownllm(["feedback", "create-key", "--user", "carol", "--staff", "--db-url", url]) == 0
    key = capsys.readouterr().out.strip()
    with session_factory(url)() as s:
        assert store.authenticate(s, key).is_staff
    jsonl = tmp_path / "b.jsonl"
    good = {"title": "t", "instruction": "def f():", "language": "python", "solution": "    return 1"}
    jsonl.write_text("\n".join([json.dumps(good), json.dumps(good), "{not json", json.dumps({"title": "x"}),
                                json.dumps({**good, "title": "t2"}), ""]))
    assert ownllm(["feedback", "import-bounties", str(jsonl), "--db-url", url]) == 0
    err = capsys.readouterr().err
    assert "2 added, 1 already present, 2 skipped" in err and ":3: malformed JSON" in err
    with session_factory(url)() as s:
        assert store.counts(s)["bounties"] == 2
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert ownllm(["models", "register", str(model), "--name", "v1", "--state", "all", "--db-url", url]) == 0
    assert ownllm(["models", "register", str(model), "--name", "v2", "--parent", "v1", "--db-url", url]) == 0
    assert ownllm(["models", "promote", "v2", "--to", "ab:10", "--db-url", url]) == 0
    assert ownllm(["models", "promote", "v2", "--to", "sideways", "--db-url", url]) == 2
    capsys.readouterr()
    assert ownllm(["models", "list", "--json", "--db-url", url]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["v1"]["state"] == "all" and rows["v2"]["state"] == "ab:10" and rows["v2"]["parent"] == "v1"
    assert rows["v1"]["model_hash"]
    assert ownllm(["models", "retire", "v2", "--db-url", url]) == 0
    with session_factory(url)() as s:  # every rollout change is in the audit trail, as the console's are
        from feedback.models import AuditEvent

        audit = [(a.action, a.target, a.detail["from"], a.detail["to"], a.detail["via"], a.user_id)
                 for a in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert audit == [("promote", "v2", "staff", "ab:10", "cli", None), ("retire", "v2", "ab:10", "retired", "cli", None)]
    assert ownllm(["feedback", "purge", "--days", "0", "--db-url", url]) == 0


def test_partial_accept_and_kept_text_are_stored(db_url):
    from feedback.models import FeedbackEvent

    f = session_factory(db_url)
    with f.begin() as s:
        a = store.get_or_create_user(s, "alice")
        v = store.register_model_version(s, "base", "models/base", state="all")
        _completion(s, a, v, "cmpl-p")  # completion "    pass": 8 characters
        _completion(s, a, v, "cmpl-k")
    with f.begin() as s:
        store.record_feedback(s, a, [
            store.FeedbackInput("cmpl-p", FeedbackKind.accepted, accepted_chars=6, kept_text="    pa",
                                kept_source="simulated"),
            store.FeedbackInput("cmpl-k", FeedbackKind.rejected, kept_text="    return 1")])
    with f() as s:
        rows = {c.request_id: c for c in s.scalars(select(Completion))}
        events = {e.completion_id: e for e in s.scalars(select(FeedbackEvent))}
        p, k = rows["cmpl-p"], rows["cmpl-k"]
        assert events[p.id].accepted_chars == 6 and events[k.id].accepted_chars is None
        assert (p.kept_text, p.kept_source) == ("    pa", "simulated") and p.kept_at is not None
        assert (k.kept_text, k.kept_source) == ("    return 1", "typed")  # a client's own report by default
    for bad, match in ((store.FeedbackInput("cmpl-k", FeedbackKind.rejected, accepted_chars=1), "needs event"),
                       (store.FeedbackInput("cmpl-p", FeedbackKind.accepted, accepted_chars=9), "exceeds"),
                       (store.FeedbackInput("cmpl-p", FeedbackKind.accepted, kept_text="x", kept_source="guessed"),
                        "kept_source")):
        with pytest.raises(store.StoreError, match=match):
            with f.begin() as s:
                store.record_feedback(s, a, [bad])
