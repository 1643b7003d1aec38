"""The whole pipeline with DATABASE_URL pointing at PostgreSQL instead of SQLite."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import postgres_database
from tests.helpers import read_events, start
from tests.helpers import text as streamed_text
from tests.stack import WebProc, start_web, start_worker
from tidechat import db

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
