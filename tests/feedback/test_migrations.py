"""Alembic: empty database → head → base on SQLite and PostgreSQL; the models match the head schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from feedback.app import create_app
from feedback.config import ServeConfig
from feedback.db import StoreNotAtHead, current_revision, downgrade, head_revision, make_engine, upgrade
from feedback.models import Base

TABLES = {"users", "api_keys", "model_versions", "completions", "feedback_events", "bounties", "experiments",
          "experiment_arms", "audit_events"}


def test_upgrade_to_head_and_back_to_base(empty_db_url):
    engine = make_engine(empty_db_url)
    assert current_revision(engine) is None
    upgrade(empty_db_url)
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())
    # The ORM models and the migrated schema agree: a model change without a revision fails here.
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    downgrade(empty_db_url, "base")
    assert current_revision(engine) is None
    assert not TABLES & set(inspect(engine).get_table_names())
    upgrade(empty_db_url)  # and up again: the downgrade left nothing behind that blocks it
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_app_refuses_a_store_not_at_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(StoreNotAtHead, match=r"never been migrated.*ownllm feedback migrate"):
        create_app(ServeConfig(db_url=url))
    upgrade(url)
    downgrade(url, "base")
    with pytest.raises(StoreNotAtHead, match=head_revision()):
        create_app(ServeConfig(db_url=url))
    upgrade(url)
    create_app(ServeConfig(db_url=url))  # at head: starts


def test_0002_keeps_existing_rows_and_accepts_the_new_signals(empty_db_url):
    """A store in use at 0001 upgrades in place: old rows get the defaults, new kinds and columns work,
    and the downgrade drops what 0001 cannot hold (an 'ignored' decision) instead of failing."""
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(empty_db_url)
    upgrade(empty_db_url, "0001")
    with engine.begin() as c:
        c.execute(text("INSERT INTO users (id, name, is_staff, created_at) VALUES (1, 'ada', false, '2026-11-30')"))
        c.execute(text("INSERT INTO model_versions (id, name, path, rollout_state, created_at) "
                       "VALUES (1, 'base', '/m', 'all', '2026-11-30')"))
        c.execute(text("INSERT INTO completions (id, request_id, choice_index, user_id, model_version_id, language, "
                       "prompt_hash, finish_reason, prompt_tokens, completion_tokens, latency_ms, created_at) "
                       "VALUES (1, 'r1', 0, 1, 1, 'python', 'h', 'stop', 3, 2, 1.0, '2026-11-30')"))
        c.execute(text("INSERT INTO feedback_events (completion_id, kind, created_at) "
                       "VALUES (1, 'accepted', '2026-11-30')"))
    upgrade(empty_db_url)
    with engine.begin() as c:
        row = c.execute(text("SELECT client, status, kept_text FROM completions WHERE id = 1")).one()
        assert tuple(row) == ("openai", "served", None)
        assert c.execute(text("SELECT store_code FROM users WHERE id = 1")).scalar() in (True, 1)
        c.execute(text("INSERT INTO completions (id, request_id, choice_index, user_id, model_version_id, language, "
                       "prompt_hash, finish_reason, prompt_tokens, completion_tokens, latency_ms, created_at, "
                       "client, filepath, kept_text, kept_source) VALUES (2, 'r2', 0, 1, 1, 'python', 'h', 'stop', "
                       "3, 2, 1.0, '2026-11-30', 'tabby', 'a.py', 'x = 1', 'derived')"))
        c.execute(text("INSERT INTO feedback_events (completion_id, kind, accepted_chars, created_at) "
                       "VALUES (2, 'ignored', NULL, '2026-11-30')"))
    with pytest.raises(IntegrityError):  # the CHECK constraint still guards the kinds
        with engine.begin() as c:
            c.execute(text("INSERT INTO feedback_events (completion_id, kind, created_at) "
                           "VALUES (1, 'maybe', '2026-11-30')"))
    downgrade(empty_db_url, "0001")
    with engine.begin() as c:
        kinds = [r[0] for r in c.execute(text("SELECT kind FROM feedback_events ORDER BY completion_id"))]
    assert kinds == ["accepted"]
    engine.dispose()
