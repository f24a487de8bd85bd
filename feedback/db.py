"""Engines, sessions and migrations for the feedback store.

One URL selects the database: ``sqlite:///var/feedback.db`` (default) or
``postgresql+psycopg://user@host:port/db`` (production, CI). Alembic is configured programmatically, with
the script directory found next to this package (``<repo>/migrations``), so the app, the CLI and the tests
need no ``alembic.ini`` and no particular working directory.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
SQLITE_BUSY_TIMEOUT_S = 10.0


class StoreNotAtHead(RuntimeError):
    """The database schema is not the one this code expects (never migrated, or behind/ahead)."""


def make_engine(url: str, sqlite_busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S, **kwargs) -> Engine:
    """An engine for ``url``; creates the parent directory of a SQLite file.

    SQLite gets WAL (readers never block the writer), enforced foreign keys, and a busy timeout so
    concurrent writers wait instead of failing. Connections are pooled: closing the last connection
    to a WAL database checkpoints and deletes the WAL, which cost ~20 ms per request when measured
    with a connection per session. A checkout first checks that the file is still there, so a database
    that disappears is noticed at once (→ 503) instead of being written through a stale open handle.
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        path = Path(u.database) if u.database and u.database != ":memory:" else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        connect_args = kwargs.pop("connect_args", {})
        if "poolclass" not in kwargs:  # room for every request thread uvicorn runs at once (40 by default)
            kwargs.setdefault("pool_size", 8)
            kwargs.setdefault("max_overflow", 40)
        connect_args.setdefault("timeout", sqlite_busy_timeout_s)
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(u, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        if path is not None:
            @event.listens_for(engine, "checkout")
            def _file_still_there(_dbapi_conn, _record, _proxy):
                if not path.exists():  # the pool then reconnects, and connecting fails: OperationalError
                    raise DisconnectionError(f"SQLite database {path} has disappeared")

        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("pool_size", 16)
        kwargs.setdefault("max_overflow", 32)
    if u.get_backend_name() == "postgresql":
        # Fail fast (→ 503) when the server is gone instead of hanging the request.
        kwargs.setdefault("connect_args", {"connect_timeout": 3})
    return create_engine(u, **kwargs)


def session_factory(url_or_engine: str | Engine) -> sessionmaker[Session]:
    """``sessionmaker`` bound to an engine for the URL; use as ``with factory.begin() as s: ...``."""
    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    return sessionmaker(engine, expire_on_commit=False)


# ---------------------------------------------------------------------------------------- migrations
def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a URL (escaped passwords) must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_at_head(engine: Engine) -> None:
    """Raise :class:`StoreNotAtHead` with the fix, unless the database is exactly at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        url = engine.url.render_as_string(hide_password=True)
        state = "has never been migrated" if current is None else f"is at revision {current}"
        raise StoreNotAtHead(
            f"feedback store {url} {state}, but this code needs revision {head}; "
            f"run `ownllm feedback migrate --db-url {url}` (alembic upgrade head) first"
        )
