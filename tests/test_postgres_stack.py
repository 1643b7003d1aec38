"""The whole pipeline with DATABASE_URL pointing at PostgreSQL instead of SQLite."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from tests.conftest import postgres_database
from tests.helpers import read_events, start
from tests.helpers import text as streamed_text
from tests.stack import WebProc, start_web, start_worker
from tidechat import config, db

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pg_stack(process_env, workdir) -> Iterator[tuple[WebProc, str]]:
    with postgres_database() as url:
        db.upgrade(url)
        env = {
            **process_env,
            # Heroku hands out postgres:// URLs; the app must accept them as they are.
            "DATABASE_URL": url.replace("postgresql+psycopg://", "postgres://"),
            "TIDECHAT_CELERY_QUEUE": process_env["TIDECHAT_CELERY_QUEUE"] + "-pg",
        }
        worker = start_worker(env, workdir, name="worker-pg")
        web = start_web(env, workdir, name="web-pg")
        try:
            yield web, url
        finally:
            web.stop()
            worker.stop()


def test_chat_and_stop_on_postgres(pg_stack, model_server):
    web, url = pg_stack
    answer = model_server.script(chunks=["stored ", "in ", "Postgres"], delay=0.01)
    long = model_server.script(chunks=[f"p{i} " for i in range(200)], delay=0.05)
    with httpx.Client(base_url=web.url, timeout=30) as http:
        cid, gen = start(http, answer)
        events = read_events(http, gen["events_url"])
        assert streamed_text(events) == "stored in Postgres"

        _, stopped = start(http, long)
        head = read_events(http, stopped["events_url"], limit=3)
        assert http.post(stopped["cancel_url"]).status_code == 202
        tail = read_events(http, stopped["events_url"], cursor=head[-1].id)
        partial = streamed_text(head + tail)

    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT generation_id, content, status FROM messages WHERE role = 'assistant'")
        ).all()
    engine.dispose()
    by_gid = {gid: (content, status) for gid, content, status in rows}
    assert by_gid[gen["id"]] == ("stored in Postgres", "done")
    assert by_gid[stopped["id"]] == (partial, "cancelled")


def _sessions(url: str) -> int:
    """Connections ever opened to the test's database (PostgreSQL counts a session when it
    ends, or at its next report: a connection opened and closed again is always counted)."""
    name = make_url(url).database
    engine = create_engine(url)
    with engine.connect() as conn:
        count = conn.execute(
            text("SELECT sessions FROM pg_stat_database WHERE datname = :name"), {"name": name}
        ).scalar_one()
    engine.dispose()
    return count


def _burst(web: WebProc, model: str, n: int) -> list[str]:
    """``n`` people send at once and read their answers to the end; the texts."""

    def one(_: int) -> str:
        with httpx.Client(base_url=web.url, timeout=30) as http:
            return streamed_text(read_events(http, start(http, model)[1]["events_url"]))

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_burst_of_answers_reuses_its_database_connections(pg_stack, model_server):
    """Bursts of more answers than a process keeps connections for must not open a
    connection per answer: opening one costs the database a new backend process and each
    side a handshake, and in a burst of 100 on two cores it made first tokens 30 % later.
    Each process keeps up to ``DATABASE_POOL_SIZE`` connections and opens none past them,
    so three bursts of 40 open at most that many per process, however their answers
    overlap. (A bound on the third burst alone, after two to open what bursts need, failed
    in CI once: a third burst may overlap more than the first two did.)"""
    web, url = pg_stack
    model = model_server.script(chunks=["kept ", "open"], delay=0.05)
    before = _sessions(url)
    assert _burst(web, model, 1) == ["kept open"]
    for _ in range(3):
        assert _burst(web, model, 40) == ["kept open"] * 40
    time.sleep(1.5)
    opened = _sessions(url) - before - 1  # (less the first count's own connection)
    kept = 2 * int(config.DEFAULTS["DATABASE_POOL_SIZE"])  # the web and the worker process
    print(f"{opened} database connections opened for 121 answers (at most {kept} kept)")
    assert opened <= kept, f"{opened} database connections opened for 121 answers"
