"""The SQL engine and sessions: one engine per process, one session per request or task."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

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
        # timeout 0: SQLite's own wait for a lock would freeze a gevent process (below).
        connect = {"check_same_thread": False, "timeout": 0, "factory": WaitingConnection}
        engine = create_engine(url, connect_args=connect, **pool)
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
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# -- waiting for SQLite's lock --------------------------------------------------------------
# SQLite has one writer at a time. Its own wait for the lock (busy_timeout) sleeps in C,
# where gevent cannot switch: a web or worker process waiting for a lock that another
# process held (the other of the two, the release step, a backup) ran nothing else, and
# every stream it served stopped for as long as the lock was held (up to the 30 s timeout).
# Here a statement that finds the database locked fails at once, and is tried again after a
# ``time.sleep``, which gevent makes cooperative; outside gevent it is the same wait.
LOCK_WAIT_SECONDS = 30.0
_BUSY = (sqlite3.SQLITE_BUSY, 261)  # 261: SQLITE_BUSY_RECOVERY
# Not SQLITE_BUSY_SNAPSHOT (517): a transaction that read an older state cannot write, and
# waiting does not help it (SQLite's busy handler does not retry it either).
T = TypeVar("T")


def _waiting(attempt: Callable[[], T], conn: sqlite3.Connection) -> T:
    """``attempt()``, tried again while the database is locked and the attempt changed
    nothing (a statement that finds it locked fails before its first change)."""
    deadline, delay = time.monotonic() + LOCK_WAIT_SECONDS, 0.0005
    while True:
        changes = conn.total_changes
        try:
            return attempt()
        except sqlite3.OperationalError as exc:
            retry = exc.sqlite_errorcode in _BUSY and conn.total_changes == changes
            if not retry or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.025)


class WaitingCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: Any = (), /) -> WaitingCursor:
        return _waiting(
            lambda: super(WaitingCursor, self).execute(sql, parameters), self.connection
        )

    def executemany(self, sql: str, seq: Any, /) -> WaitingCursor:
        rows = list(seq)
        return _waiting(lambda: super(WaitingCursor, self).executemany(sql, rows), self.connection)


class WaitingConnection(sqlite3.Connection):
    """A connection whose statements and commits wait for a lock without blocking gevent."""

    def cursor(self, factory: type[sqlite3.Cursor] = WaitingCursor) -> sqlite3.Cursor:
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.cursor().execute(sql, parameters)

    def commit(self) -> None:
        _waiting(super().commit, self)


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
