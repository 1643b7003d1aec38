"""Starting an answer costs the same in a long conversation as in a short one (issue 14).

Not a timing test: it counts what a POST does to the database (SQL statements, and message
rows the ORM loads), for conversations of 2 and of 200 messages, and asserts they match.
The timings are ``python -m bench.post_cost``'s. No worker listens on this app's queue,
so every answer started here stays queued: the in-progress check must still refuse a
second one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event, select

from tidechat import chat, db, limits, models
from tidechat.models import Message

LONG = 200


@pytest.fixture
def app(make_app, key_prefix):
    # A queue no worker reads: the answers stay queued (no model, no race with a worker).
    return make_app(TIDECHAT_CELERY_QUEUE=key_prefix + "post-cost-nobody")


@contextmanager
def counting(app) -> Iterator[dict[str, int]]:
    """SQL statements run, and Message rows loaded, inside the block."""
    counts = {"statements": 0, "messages_loaded": 0}
    engine = app.extensions["db"].kw["bind"]

    def statement(*_args) -> None:
        counts["statements"] += 1

    def loaded(*_args) -> None:
        counts["messages_loaded"] += 1

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(Message, "load", loaded)
    try:
        yield counts
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(Message, "load", loaded)


def conversation(app, client, length: int) -> tuple[str, str | None]:
    """A conversation of ``length`` finished messages, user and assistant in turn; its
    id and its last answer's generation id."""
    cid = client.post("/api/conversations").get_json()["id"]
    last_gid = None
    with db.session_scope(app) as s:
        conv = s.get(models.Conversation, cid)
        conv.title = "long enough"
        for i in range(length):
            role = "user" if i % 2 == 0 else "assistant"
            last_gid = models.new_id() if role == "assistant" else None
            s.add(
                Message(
                    conversation_id=cid, role=role, content=f"message {i}", status=models.DONE,
                    generation_id=last_gid, model="gpt-4o-mini" if last_gid else None,
                )
            )  # fmt: skip
        s.commit()
    return cid, last_gid


def send(client, cid: str, content: str = "And then?"):
    return client.post(f"/api/conversations/{cid}/messages", json={"content": content})


def test_a_send_costs_the_same_in_a_long_conversation(app, client):
    short, _ = conversation(app, client, 2)
    long, _ = conversation(app, client, LONG)
    warm, _ = conversation(app, client, 2)
    assert send(client, warm).status_code == 202  # imports, pools, statement caches

    costs = {}
    for cid in (short, long):
        with counting(app) as counts:
            response = send(client, cid)
        assert response.status_code == 202, response.get_json()
        assert response.get_json()["message"]["content"] == "And then?"
        costs[cid] = counts
    assert costs[short] == costs[long]
    assert costs[long]["messages_loaded"] == 0  # no message row is loaded to start a turn
    # the conversation with what the turn needs to know of it, the two messages, its time
    assert costs[long]["statements"] == 4

    # both stored, in order, after the earlier messages
    with db.session_scope(app) as s:
        rows = s.scalars(select(Message).where(Message.conversation_id == long)).all()
        assert len(rows) == LONG + 2
        assert [(m.role, m.status) for m in rows[-2:]] == [
            ("user", models.DONE),
            ("assistant", models.QUEUED),
        ]
        assert [m.seq for m in rows] == sorted(m.seq for m in rows)
        assert rows[-1].usage is None and rows[-1].error is None and rows[-1].request is None
        conv = s.get(models.Conversation, long)
        assert conv.title == "long enough"  # a conversation with user messages keeps its title
        assert conv.updated_at >= rows[-1].created_at


def test_a_second_send_is_refused_while_the_answer_is_queued(app, client):
    for length in (2, LONG):
        cid, _ = conversation(app, client, length)
        first = send(client, cid)
        assert first.status_code == 202
        again = send(client, cid, "Me again")
        assert again.status_code == 409
        assert again.get_json()["error"]["code"] == "generation_in_progress"
        regenerate = client.post(f"/api/conversations/{cid}/regenerate")
        assert regenerate.status_code == 409
        # once it is stopped, the next one goes
        gid = first.get_json()["generation"]["id"]
        assert client.post(f"/api/generations/{gid}/cancel").status_code == 200
        assert send(client, cid, "Me again").status_code == 202


def test_the_first_message_titles_a_new_conversation_at_no_extra_cost(app, client):
    warm, _ = conversation(app, client, 2)
    assert send(client, warm).status_code == 202  # imports, pools, statement caches
    cid = client.post("/api/conversations").get_json()["id"]
    question = "What is the tide doing today at the harbour?"
    with counting(app) as counts:
        assert send(client, cid, question).status_code == 202
    # the same four statements as a later turn: the title goes with the conversation's time
    assert counts == {"statements": 4, "messages_loaded": 0}
    title = client.get(f"/api/conversations/{cid}").get_json()["title"]
    assert title == chat.title_from(question) == "What is the tide doing today at the…"
    assert send(client, cid, "And the wind?").status_code == 409  # (the first is queued)
    with db.session_scope(app) as s:
        assert s.get(models.Conversation, cid).title == title


def test_a_send_holds_no_database_connection_while_it_waits_for_redis(app, client, monkeypatch):
    """Under a burst a send's admission waits for Redis behind every other request of its
    process. The send used to hold one of the process's pooled database connections all
    that time (a thousand sends at once: 230 ms at the median, 1.2 s at most, against 0.5 ms
    for any other request), and sends past the pool's timeout were refused 503 "busy".
    Through either door."""
    pool = app.extensions["db"].kw["bind"].pool
    admit, held = limits.admit, []

    def watched(gid: str) -> limits.Admission:
        held.append(pool.checkedout())
        return admit(gid)

    monkeypatch.setattr(limits, "admit", watched)
    cid, _ = conversation(app, client, 2)
    first = send(client, cid)
    assert first.status_code == 202
    gid = first.get_json()["generation"]["id"]
    assert client.post(f"/api/generations/{gid}/cancel").status_code == 200
    assert client.post(f"/api/conversations/{cid}/regenerate").status_code == 202
    # the /v1 door: a response, then one that goes on from it (which changes the stored
    # conversation: only once admitted)
    key = client.post("/api/keys", json={"name": "held"}).get_json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-4o-mini", "input": "Hi", "background": True}
    rid = client.post("/v1/responses", json=body, headers=auth).get_json()["id"]
    assert client.post(f"/v1/responses/{rid}/cancel", headers=auth).status_code == 200
    body |= {"input": "And then?", "instructions": "Be brief.", "previous_response_id": rid}
    follow_up = client.post("/v1/responses", json=body, headers=auth)
    assert follow_up.status_code == 200, follow_up.get_json()
    assert held == [0, 0, 0, 0]
    last = client.get(f"/api/conversations/{cid}").get_json()["messages"][-2:]
    assert [(m["role"], m["content"], m["status"]) for m in last] == [
        ("user", "And then?", models.DONE),
        ("assistant", "", models.QUEUED),  # the regenerated answer, stored and queued
    ]


def test_regenerate_costs_the_same_in_a_long_conversation(app, client):
    short, _ = conversation(app, client, 2)
    long, _ = conversation(app, client, LONG)
    costs = {}
    for cid in (short, long):
        with counting(app) as counts:
            response = client.post(f"/api/conversations/{cid}/regenerate")
        assert response.status_code == 202, response.get_json()
        costs[cid] = counts
    assert costs[short] == costs[long]
    assert costs[long]["messages_loaded"] <= 1  # the user message it answers again
    messages = client.get(f"/api/conversations/{long}").get_json()["messages"]
    assert len(messages) == LONG  # the last answer replaced, not added to
    assert messages[-1]["status"] == models.QUEUED


def test_a_v1_follow_up_costs_the_same_in_a_long_conversation(app, client):
    key = client.post("/api/keys", json={"name": "cost"}).get_json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    costs = {}
    for length in (2, LONG, 2, LONG):  # (the first two warm up)
        cid, gid = conversation(app, client, length)
        body = {
            "model": "gpt-4o-mini", "input": "And then?", "background": True,
            "previous_response_id": f"resp_{gid}",
        }  # fmt: skip
        with counting(app) as counts:
            response = client.post("/v1/responses", json=body, headers=auth)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["status"] == "queued"
        costs[length] = counts
        again = client.post("/v1/responses", json=body, headers=auth)
        assert again.status_code == 409
    assert costs[2] == costs[LONG]
    assert costs[LONG]["messages_loaded"] <= 1  # the previous response itself
