"""Fixtures for the gateway and store tests: real SQLite/PostgreSQL, a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import pytest

from feedback.db import upgrade
from gateway_fixtures import Gateway, drop_fresh_pg_databases, fresh_pg_url, live_server, start_gateway


@pytest.fixture(scope="session", autouse=True)
def _drop_test_pg_databases():
    yield
    drop_fresh_pg_databases()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_db_url(request, tmp_path) -> str:
    """An empty database on each engine; PostgreSQL where OWNLLM_TEST_PG_URL is set (skipped without it, failed
    without it under CI: `gateway_fixtures.require_pg`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return fresh_pg_url()


@pytest.fixture
def db_url(empty_db_url) -> str:
    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from feedback.backends import LocalBackend

    return LocalBackend(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_ct2_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its CTranslate2 conversion beside it (<dir>/ct2/), as `ownllm export` writes it."""
    import shutil

    from pipeline.train.export import convert_to_ct2

    out = tmp_path_factory.mktemp("tiny_ct2") / "tiny"
    shutil.copytree(tiny_model_dir, out)
    convert_to_ct2(out)
    return out


@pytest.fixture(scope="session")
def tiny_ct2_backend(tiny_ct2_model_dir):
    from feedback.engine import CT2Backend

    backend = CT2Backend(tiny_ct2_model_dir, num_threads=1)
    yield backend
    backend.engine.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_backend, tiny_model_dir):
    """A running gateway on SQLite with the tiny model serving everyone and three users' keys."""
    db = f"sqlite:///{tmp_path_factory.mktemp('gw') / 'feedback.db'}"
    app, keys, factory = start_gateway(db, tiny_backend, tiny_model_dir)
    with live_server(app) as url:
        yield Gateway(url, db, keys, app, factory)
