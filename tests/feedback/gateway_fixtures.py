"""Helpers for the feedback tests: a real uvicorn server on 127.0.0.1, fresh PostgreSQL databases, a gateway."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import text

from feedback import store
from feedback.app import BackendPool, create_app
from feedback.config import ServeConfig
from feedback.db import make_engine, session_factory, upgrade

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app, port: int | None = None):
    """Run ``app`` under a real uvicorn server in a thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        service = getattr(app.state, "service", None)
        if service is not None:  # the gateway's rows completed after their replies are in the store
            service.inflight.drain()


def require_pg() -> str:
    """The test PostgreSQL server's URL (``OWNLLM_TEST_PG_URL``). Without one the test is skipped on a
    developer's machine but fails under CI (``CI`` set, as `.ci/run` and CI services set it): there a missing
    server is a broken setup, not a reason to pass."""
    url = os.environ.get("OWNLLM_TEST_PG_URL")
    if url:
        return url
    reason = "OWNLLM_TEST_PG_URL is not set (.ci/run starts PostgreSQL and sets it)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run", pytrace=False)
    pytest.skip(reason)


CREATED_PG_DATABASES: list[str] = []


def fresh_pg_url() -> str:
    """A new, empty database on the test PostgreSQL server (so tests never see each other's rows); dropped at the
    end of the session by `drop_fresh_pg_databases` (tests/feedback/conftest.py)."""
    from sqlalchemy.engine import make_url

    server = require_pg()
    base = make_url(server)
    name = f"ownllm_t_{uuid.uuid4().hex[:10]}"
    eng = make_engine(server, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    CREATED_PG_DATABASES.append(name)
    return base.set(database=name).render_as_string(hide_password=False)


def drop_fresh_pg_databases() -> list[str]:
    """Drop every database `fresh_pg_url` made in this process (a developer's long-lived server would otherwise
    collect one per test). FORCE ends connections a test's engine still holds. Returns the names dropped."""
    if not CREATED_PG_DATABASES:
        return []
    eng = make_engine(os.environ["OWNLLM_TEST_PG_URL"], isolation_level="AUTOCOMMIT")
    dropped = []
    try:
        with eng.connect() as c:
            while CREATED_PG_DATABASES:
                name = CREATED_PG_DATABASES.pop()
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                dropped.append(name)
    finally:
        eng.dispose()
    return dropped


class PreloadedPool(BackendPool):
    """The session's loaded tiny model for every version (loading it per test would cost seconds each)."""

    def __init__(self, cfg, backend):
        super().__init__(cfg)
        self.backend = backend

    def create(self, version):
        return self.backend


@dataclass
class Gateway:
    url: str
    db_url: str
    keys: dict[str, str]
    app: object
    factory: object = field(repr=False, default=None)

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}

    def counts(self) -> dict[str, int]:
        with self.factory() as s:
            return store.counts(s)


def start_gateway(db_url: str, backend, model_dir: Path, feedback_cfg=None, **cfg_overrides):
    upgrade(db_url)
    factory = session_factory(db_url)
    keys = {}
    with factory.begin() as s:
        store.register_model_version(s, "tiny", str(model_dir), state="all")
        for name, staff in (("alice", False), ("bob", False), ("staff", True)):
            keys[name] = store.create_key(s, name, staff=staff)
    cfg = ServeConfig(db_url=db_url, **cfg_overrides)
    app = create_app(cfg, backends=PreloadedPool(cfg, backend))
    if feedback_cfg is not None:
        app.state.feedback_cfg = feedback_cfg  # the editor APIs' settings (params.yaml's feedback section)
    return app, keys, factory




def staff_front(tmp_path: Path, versions: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A fresh SQLite store for a gateway in front of upstream servers: ``versions`` (name → rollout state)
    registered with placeholder model directories (their upstream serves them), and a staff key's header."""
    from feedback import store
    from feedback.db import session_factory, upgrade

    url = f"sqlite:///{tmp_path / 'front.db'}"
    upgrade(url)
    with session_factory(url).begin() as s:
        for name, state in versions.items():
            store.register_model_version(s, name, f"/nowhere/{name}", state=state)
        key = store.create_key(s, "staffer", staff=True)
    return url, {"Authorization": f"Bearer {key}"}
