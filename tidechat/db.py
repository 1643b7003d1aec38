"""The SQL engine and sessions: one engine per process, one session per request or task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, pool: dict[str, Any] | None = None) -> Engine:
    """The engine for ``url``; ``pool``: ``pool_size``, ``max_overflow``, ``pool_timeout``
    (the app's come from its config; without, SQLAlchemy's own: migrations, scripts)."""
    pool = pool or {}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:  # one connection per thread, no pool to size
            pool = {}
        # Web and worker greenlets share the pool, so connections move between "threads".
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # connect_timeout: a database that blackholes must fail a request (503), not hang it
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5}, **pool)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker's writes
    # WAL + NORMAL: a commit is not synced to disk at once (the WAL is, at checkpoints), so
    # it never blocks a gevent process for an fsync; a power cut (not a crash) may lose the
    # last commits, never consistency.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def init_app(app: Flask) -> None:
    cfg = app.config
    engine = make_engine(
        cfg["DATABASE_URL"],
        {
            "pool_size": int(cfg["DATABASE_POOL_SIZE"]),
            "max_overflow": int(cfg["DATABASE_MAX_OVERFLOW"]),
            "pool_timeout": float(cfg["DATABASE_POOL_TIMEOUT"]),
        },
    )
    app.extensions["db"] = sessionmaker(engine, expire_on_commit=False)
    app.teardown_appcontext(_close_session)


def session() -> Session:
    """The current app context's session (a request's, or a Celery task's)."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["db"]()
    return g.db_session


@contextmanager
def session_scope(app: Flask) -> Iterator[Session]:
    with app.extensions["db"]() as s:
        yield s


def _close_session(_exc: BaseException | None) -> None:
    s = g.pop("db_session", None)
    if s is not None:
        s.close()


def upgrade(url: str) -> None:
    """Create or migrate the schema to the latest revision (the Procfile's release step)."""
    from alembic import command
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.attributes["database_url"] = url
    command.upgrade(cfg, "head")
