"""Alembic: empty database → head → base on SQLite and PostgreSQL; the models match the head schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from feedback.app import create_app
from feedback.db import StoreNotAtHead, current_revision, downgrade, head_revision, make_engine, upgrade
from feedback.models import Base
from pipeline.config import ServeConfig

TABLES = {"users", "api_keys", "model_versions", "completions", "feedback_events", "bounties", "experiments",
          "experiment_arms"}


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
