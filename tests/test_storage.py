"""Storage against both backends: SQLite (the default) and PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import event, inspect
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tests.conftest import postgres_database
from tests.helpers import lock_sqlite
from tidechat import chat, db, models
from tidechat.models import Conversation, new_id
from tidechat.stream_bus import Entry


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'storage.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    with Session(engine, expire_on_commit=False) as s:
        yield s
    engine.dispose()


def test_migrations_create_the_schema(database_url):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"conversations", "messages", "alembic_version"} <= tables


def test_turns_round_trip_exactly(session):
    conv = Conversation(owner="alice")
    session.add(conv)
    session.commit()
    content = "Ünïcødé 🌊 \r\n\r\ndata: x ' \" ; DROP TABLE messages; --"
    user, assistant = chat.start_turn(session, conv, content, "m1", new_id())
    terminal = Entry("5-0", "done", '{"finish_reason":"stop","usage":{"total_tokens":4}}')
    chat.apply_terminal(assistant, "answer ✓", terminal)
    session.commit()
    session.expunge_all()

    again = session.get(Conversation, conv.id)
    assert [(m.role, m.content, m.status) for m in again.messages] == [
        ("user", content, models.DONE),
        ("assistant", "answer ✓", models.DONE),
    ]
    stored = again.messages[1]
    assert stored.usage == {"total_tokens": 4}
    assert stored.finish_reason == "stop"
    assert stored.created_at.tzinfo is not None
    assert again.title == chat.title_from(content)


def test_an_answers_start_and_end_are_stored_exactly(session, database_url):
    conv = Conversation(owner="frank")
    session.add(conv)
    session.commit()
    _, done = chat.start_turn(session, conv, "one", "m", new_id())
    _, failed = chat.start_turn(session, conv, "two", "m", new_id())
    session.commit()
    for answer in (done, failed):
        chat.mark_streaming(session, answer)
    session.commit()
    assert (done.status, failed.status) == (models.STREAMING, models.STREAMING)
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    chat.record_end(session, done, "uno ✓", models.DONE, {"finish_reason": "stop", "usage": usage})
    error = {"code": "upstream_error", "message": "The model server failed."}
    chat.record_end(session, failed, "dos", models.ERROR, error)

    engine = db.make_engine(database_url)
    with Session(engine) as fresh:
        stored = {m.id: m for m in fresh.query(models.Message).filter_by(role="assistant")}
        first, second = stored[done.id], stored[failed.id]
        assert (first.content, first.status, first.finish_reason, first.usage, first.error) == (
            "uno ✓", models.DONE, "stop", usage, None
        )
        assert (second.content, second.status, second.error) == ("dos", models.ERROR, error)
    engine.dispose()
    # the session's own objects say the same, without a reload
    assert (done.status, done.usage, failed.error) == (models.DONE, usage, error)


def test_history_follows_message_order_and_skips_empty_answers(session):
    conv = Conversation(owner="bob", system_prompt="Be brief.")
    session.add(conv)
    session.commit()
    first_user, first_answer = chat.start_turn(session, conv, "one", "m", new_id())
    first_answer.content, first_answer.status = "uno", models.DONE
    failed_user, failed = chat.start_turn(session, conv, "two", "m", new_id())
    failed.status = models.ERROR
    _, current = chat.start_turn(session, conv, "three", "m", new_id())
    assert chat.history(session, conv, current) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
    ]


def test_an_answers_history_is_read_without_loading_the_conversations_messages(session):
    """A worker starting an answer in a long chat read every message as an ORM object
    (2 ms of CPU at 200 messages); the history is now plain rows, whatever the length."""
    conv = Conversation(owner="erin")
    session.add(conv)
    session.commit()
    for i in range(100):
        _, answer = chat.start_turn(session, conv, f"q{i}", "m", new_id())
        answer.content, answer.status = f"a{i}", models.DONE
    _, current = chat.start_turn(session, conv, "last", "m", new_id())
    session.commit()
    session.expire_all()
    loaded = []

    def count(target, _context):
        loaded.append(target)

    event.listen(models.Message, "load", count)
    try:
        turns = chat.history(session, conv, current)
    finally:
        event.remove(models.Message, "load", count)
    assert loaded == []
    assert len(turns) == 201
    assert turns[-2:] == [
        {"role": "assistant", "content": "a99"},
        {"role": "user", "content": "last"},
    ]


def test_listing_is_per_owner_and_newest_first(session):
    older, newer, other = (Conversation(owner=o) for o in ("carol", "carol", "dave"))
    session.add_all([older, newer, other])
    session.commit()
    chat.start_turn(session, newer, "bump", "m", new_id())
    assert [c.id for c in chat.list_conversations(session, "carol")] == [newer.id, older.id]
    with pytest.raises(Exception, match="No such conversation"):
        chat.owned_conversation(session, "dave", older.id)
    _, assistant = chat.start_turn(session, older, "hi", "m", new_id())
    assert chat.owned_generation(session, "carol", assistant.generation_id).id == assistant.id
    with pytest.raises(Exception, match="No such generation"):
        chat.owned_generation(session, "dave", assistant.generation_id)


def test_deleting_a_conversation_deletes_its_messages(session):
    conv = Conversation(owner="erin")
    session.add(conv)
    session.commit()
    _, assistant = chat.start_turn(session, conv, "bye", "m", new_id())
    session.delete(conv)
    session.commit()
    assert session.query(models.Message).filter_by(conversation_id=conv.id).count() == 0
    assert chat.generation_message(session, assistant.generation_id) is None


def test_a_burst_past_the_connection_pool_gets_busy_not_unreachable(make_app, database_url):
    """Every pooled connection in use until the pool's timeout: 503 "busy" with
    Retry-After, on the page's API and on /v1 (before: "cannot reach its database", seen
    with PostgreSQL under the bench's 1000 simultaneous POSTs), and served again once one
    is free."""
    db.upgrade(database_url)
    app = make_app(
        DATABASE_URL=database_url,
        TIDECHAT_DATABASE_POOL_SIZE="1",
        TIDECHAT_DATABASE_MAX_OVERFLOW="0",
        TIDECHAT_DATABASE_POOL_TIMEOUT="0.2",
    )
    client = app.test_client()
    assert client.post("/api/conversations").status_code == 201
    key = client.post("/api/keys", json={"name": "busy"}).get_json()["key"]
    engine = app.extensions["db"].kw["bind"]
    held = engine.connect()  # the pool's only connection, as a long request would hold it
    try:
        page = client.get("/api/conversations")
        v1 = client.get("/v1/responses/resp_x", headers={"Authorization": f"Bearer {key}"})
    finally:
        held.close()
    for response in (page, v1):
        assert response.status_code == 503, response.get_data(as_text=True)
        assert response.get_json()["error"]["code"] == "busy"
        assert int(response.headers["Retry-After"]) > 0
    assert client.get("/api/conversations").status_code == 200


def test_an_in_memory_sqlite_database_takes_the_pool_settings_it_has_no_use_for():
    pool = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    engine = db.make_engine("sqlite:///:memory:", pool)  # (its pool is one per thread)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1
    engine.dispose()


def test_a_write_to_a_locked_sqlite_database_waits_for_the_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    holder = lock_sqlite(str(tmp_path / "locked.db"))
    release = threading.Timer(0.5, holder.rollback)
    release.start()
    with Session(engine) as s:
        s.add(Conversation(owner="alice"))
        s.commit()  # waits, then succeeds: nothing lost
    release.join()
    with Session(engine) as s:
        assert [c.owner for c in chat.list_conversations(s, "alice")] == ["alice"]
    engine.dispose()


def test_a_write_to_a_sqlite_database_locked_too_long_fails_as_locked(tmp_path, monkeypatch):
    monkeypatch.setattr(db, "LOCK_WAIT_SECONDS", 0.3)
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    holder = lock_sqlite(str(tmp_path / "locked.db"))
    with Session(engine) as s, pytest.raises(OperationalError, match="database is locked"):
        s.add(Conversation(owner="alice"))
        s.commit()
    holder.rollback()
    engine.dispose()
