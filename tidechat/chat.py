"""Conversations, turns and generations: the rules the API views apply."""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import (
    Select,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, contains_eager, joinedload, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from tidechat import hygiene, models
from tidechat.errors import ApiError, not_found
from tidechat.models import Conversation, Message, new_id, utcnow
from tidechat.stream_bus import DELTA, DONE, ERROR, Entry, StreamBus

TITLE_WORDS, TITLE_CHARS = 8, 80

# Redis generation state -> message status.
_STATUS = {"queued": models.QUEUED, "running": models.STREAMING}


def title_from(content: str) -> str:
    words = content.split()
    title = " ".join(words[:TITLE_WORDS])
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rstrip() + "…"
    elif len(words) > TITLE_WORDS:
        title += "…"
    return title or "New chat"


def serialize_conversation(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "created_at": conv.created_at.isoformat(),
        "updated_at": conv.updated_at.isoformat(),
        "system_prompt": conv.system_prompt,
        "model": conv.model,
        "temperature": conv.temperature,
    }


def serialize_message(msg: Message) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": msg.id,
        "role": msg.role,
        "content": msg.content,
        "status": msg.status,
        "created_at": msg.created_at.isoformat(),
    }
    if msg.role == "assistant":
        data.update(
            generation_id=msg.generation_id,
            model=msg.model,
            finish_reason=msg.finish_reason,
            usage=msg.usage,
            error=msg.error,
        )
    return data


def owned_conversation(s: Session, owner: str, cid: str) -> Conversation:
    if not hygiene.is_id(cid):  # e.g. NUL, which PostgreSQL refuses even in a lookup
        raise not_found("conversation")
    conv = s.get(Conversation, cid)
    if conv is None or conv.owner != owner:
        raise not_found("conversation")
    return conv


# Built once, like the other statements of an answer's start and end below: building an
# ORM statement (and its cache key) on each call cost more than running it.
_OWNED_GENERATION = (
    select(Message)
    .join(Conversation)
    .options(contains_eager(Message.conversation))
    .where(Message.generation_id == bindparam("gid"), Conversation.owner == bindparam("owner"))
)


def owned_generation(s: Session, owner: str, gid: str) -> Message:
    """The message of generation ``gid`` of ``owner``, with its conversation (one query)."""
    if not hygiene.is_id(gid):
        raise not_found("generation")
    msg = s.scalar(_OWNED_GENERATION, {"gid": gid, "owner": owner})
    if msg is None:
        raise not_found("generation")
    return msg


_GENERATION_MESSAGE = (
    select(Message)
    .options(joinedload(Message.conversation, innerjoin=True))
    .where(Message.generation_id == bindparam("gid"))
)


def generation_message(s: Session, gid: str) -> Message | None:
    """The message of generation ``gid``, with its conversation (one query)."""
    return s.scalar(_GENERATION_MESSAGE, {"gid": gid})


def unfinished(s: Session, limit: int) -> list[Message]:
    """Answers not yet final, oldest first (for the sweeper)."""
    query = (
        select(Message)
        .where(Message.status.in_(models.UNFINISHED_STATUSES), Message.generation_id.is_not(None))
        .order_by(Message.seq)
        .limit(limit)
    )
    return list(s.scalars(query))


def _end_statements() -> dict[bool, Update]:
    """The UPDATE of an answer's end: by whether it is an error (its error payload) or not
    (its finish reason and usage). Core statements on the table, with every value bound."""
    m, table = Message.__table__.c, Message.__table__
    common = {"content": bindparam("new_content"), "status": bindparam("new_status")}
    by_id = m.id == bindparam("mid")
    outcome = {"finish_reason": bindparam("new_finish_reason"), "usage": bindparam("new_usage")}
    return {
        True: update(table).where(by_id).values(**common, error=bindparam("new_error")),
        False: update(table).where(by_id).values(**common, **outcome),
    }


_END = _end_statements()
_STREAMING = (
    update(Message.__table__)
    .where(Message.__table__.c.id == bindparam("mid"))
    .values(status=models.STREAMING)
)


def record_end(s: Session, msg: Message, text: str, status: str, payload: dict) -> None:
    """Store how a generation ended, as one UPDATE and commit (safe to retry: it does not
    depend on what the session has loaded, which a failed commit throws away)."""
    values: dict[str, Any] = {"content": text, "status": status}
    if status == models.ERROR:
        values["error"] = payload
    else:
        values.update(finish_reason=payload.get("finish_reason"), usage=payload.get("usage"))
    s.rollback()
    params = {"new_" + name: value for name, value in values.items()}
    s.connection().execute(_END[status == models.ERROR], {"mid": msg.id, **params})
    s.commit()
    for name, value in values.items():
        set_committed_value(msg, name, value)


def mark_streaming(s: Session, msg: Message) -> None:
    """The answer is being written (in the session's transaction: the caller commits)."""
    if msg.status != models.STREAMING:
        s.connection().execute(_STREAMING, {"mid": msg.id})
        set_committed_value(msg, "status", models.STREAMING)


def list_conversations(s: Session, owner: str) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.owner == owner)
        .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc())
    )
    return list(s.scalars(query))


def in_progress(conv: Conversation) -> Message | None:
    """The first answer of a loaded conversation not yet final (see :func:`pending_answer`
    for one that is not loaded)."""
    for msg in conv.messages:
        if msg.role == "assistant" and msg.status not in models.FINAL_STATUSES:
            return msg
    return None


# Starting a turn costs the same in a conversation of 2 messages or of 2,000: these ask the
# database about the few rows they need (indexed queries) and add the new messages by their
# conversation id, never loading ``Conversation.messages`` (tests/test_post_cost.py).


def _loaded(conv: Conversation) -> bool:
    """Whether ``conv.messages`` is in memory (or needs no query: a conversation not yet
    stored has none but those added here)."""
    state = inspect(conv)
    return state.transient or state.pending or "messages" in state.dict


class TurnFacts(NamedTuple):
    """What starting a turn needs to know of a stored conversation's messages."""

    pending: Message | None  # its first answer not yet final (see in_progress)
    has_user: bool  # whether it has a user message (else the turn titles it)
    later: bool  # whether it has messages after ``after`` (see turn_facts)


def _turn_facts_columns() -> tuple[Any, Any, Any]:
    """TurnFacts' three indexed subqueries, for the conversation ``:cid`` (and ``:after``)."""
    m, cid = Message.__table__.c, bindparam("cid")
    unfinished = or_(*(m.status == status for status in models.UNFINISHED_STATUSES))
    pending = (
        select(m.seq)
        .where(m.conversation_id == cid, m.role == "assistant", unfinished)
        .order_by(m.seq)
        .limit(1)
        .scalar_subquery()
    )
    has_user = exists().where(m.conversation_id == cid, m.role == "user")
    later = exists().where(m.conversation_id == cid, m.seq > bindparam("after"))
    return pending, has_user, later


# Built once: building (and caching) a statement costs more than running it.
_TURN_FACTS = select(*_turn_facts_columns())
# The conversation and its facts in one statement (see owned_turn).
_OWNED_TURN = select(Conversation, *_turn_facts_columns()[:2]).where(
    Conversation.id == bindparam("cid"), Conversation.owner == bindparam("owner")
)


def _flush_pending(s: Session) -> None:
    """Write what the session holds: a prebuilt statement run on its connection does not
    autoflush, and must see it."""
    if s.new or s.dirty:
        s.flush()


def turn_facts(s: Session, conv: Conversation, after: int | None = None) -> TurnFacts:
    """The conversation's :class:`TurnFacts`, by one statement of indexed subqueries (a
    second, to load the pending answer, only if there is one), whatever its length."""
    if _loaded(conv):
        pending = in_progress(conv)
        has_user = any(m.role == "user" for m in conv.messages)
        later = after is not None and bool(conv.messages) and conv.messages[-1].seq > after
        return TurnFacts(pending, has_user, later)
    _flush_pending(s)
    params = {"cid": conv.id, "after": -1 if after is None else after}
    return _facts(s, *s.connection().execute(_TURN_FACTS, params).one())


def _facts(s: Session, seq: int | None, user: Any, later: Any) -> TurnFacts:
    """TurnFacts from its subqueries' values (the pending answer loaded only if there is one)."""
    return TurnFacts(None if seq is None else s.get(Message, seq), bool(user), bool(later))


def owned_turn(s: Session, owner: str, cid: str) -> tuple[Conversation, TurnFacts]:
    """:func:`owned_conversation` with its :class:`TurnFacts` (but ``later``), in one
    query where starting a turn asked two."""
    if not hygiene.is_id(cid):
        raise not_found("conversation")
    row = s.execute(_OWNED_TURN, {"cid": cid, "owner": owner}).one_or_none()  # (autoflushes)
    if row is None:
        raise not_found("conversation")
    conv, seq, user = row
    return conv, _facts(s, seq, user, False)


def pending_answer(s: Session, conv: Conversation) -> Message | None:
    """What :func:`in_progress` finds, without loading the conversation's messages."""
    return turn_facts(s, conv).pending


def is_last(s: Session, msg: Message) -> bool:
    """Whether ``msg`` is its conversation's last message."""
    return not turn_facts(s, msg.conversation, after=msg.seq).later


def _add(s: Session | None, conv: Conversation, msg: Message) -> Message:
    """Add ``msg`` to ``conv`` without loading its messages (the backref appends to the
    collection only where it is loaded)."""
    msg.conversation = conv
    if s is not None:
        s.add(msg)
    return msg


def start_turn(
    s: Session,
    conv: Conversation,
    content: str,
    model: str,
    gid: str,
    request: dict | None = None,
    facts: TurnFacts | None = None,
) -> tuple[Message, Message]:
    """Store the user's message and a queued assistant message for generation ``gid``
    (``facts``: the conversation's, if the caller has them already); the first user
    message titles the conversation."""
    title = None if (facts or turn_facts(s, conv)).has_user else title_from(content)
    user = _message("user", content, models.DONE)
    return user, queue_answer(s, conv, model, gid, request, user, title)


def add_history(conv: Conversation, turns: list[tuple[str, str]]) -> None:
    """Earlier turns an API client sent along (``(role, text)``), as finished messages."""
    s = inspect(conv).session
    for role, text in turns:
        # (a stored conversation has messages: only a new one, in memory, may have none)
        if role == "user" and _loaded(conv) and not conv.messages:
            conv.title = title_from(text)
        _add(s, conv, Message(id=new_id(), role=role, content=text, status=models.DONE))


def branch(s: Session, conv: Conversation, upto: Message) -> Conversation:
    """A new conversation of the same owner with copies of ``conv``'s messages up to and
    including ``upto``: going on from an earlier answer leaves the original as it was."""
    copy = Conversation(
        owner=conv.owner, title=conv.title, system_prompt=conv.system_prompt,
        model=conv.model, temperature=conv.temperature,
    )  # fmt: skip
    for msg in conv.messages:
        if msg.seq > upto.seq:
            break
        if msg.status in models.FINAL_STATUSES or msg.role == "user":
            copy.messages.append(
                Message(
                    id=new_id(),
                    role=msg.role,
                    content=msg.content,
                    status=msg.status,
                    model=msg.model,
                    finish_reason=msg.finish_reason,
                    usage=msg.usage,
                    error=msg.error,
                )  # fmt: skip
            )
    s.add(copy)
    return copy


def queue_answer(
    s: Session,
    conv: Conversation,
    model: str,
    gid: str,
    request: dict | None = None,
    user: Message | None = None,
    title: str | None = None,
) -> Message:
    """A queued assistant message for generation ``gid`` (after ``user``, a new user
    message to store first; ``title``: the conversation's new one), committed."""
    assistant = _message("assistant", "", models.QUEUED, model, gid, request)
    _store(s, conv, [m for m in (user, assistant) if m is not None], title)
    return assistant


def _message(
    role: str,
    content: str,
    status: str,
    model: str | None = None,
    gid: str | None = None,
    request: dict | None = None,
) -> Message:
    msg = Message(
        id=new_id(), role=role, content=content, status=status, model=model, generation_id=gid,
        finish_reason=None, created_at=utcnow(),
    )  # fmt: skip
    if request is not None:  # (a JSON column set to None would store JSON null, not NULL)
        msg.request = request
    return msg


_COLUMNS = [c.key for c in Message.__table__.c if c.key != "seq"]
_INSERT = insert(Message.__table__).returning(Message.__table__.c.seq)


def _touch_statements() -> dict[bool, Update]:
    """The UPDATE of a conversation's ``updated_at``: by whether it sets its title too."""
    c, table = Conversation.__table__.c, Conversation.__table__
    touch = update(table).where(c.id == bindparam("cid")).values(updated_at=bindparam("now"))
    return {False: touch, True: touch.values(title=bindparam("new_title"))}


_TOUCH = _touch_statements()


def _store(s: Session, conv: Conversation, msgs: list[Message], title: str | None = None) -> None:
    """Add ``msgs`` (new, every column set) to ``conv``, touch its ``updated_at`` (and set
    its ``title``, if given) and commit. A stored conversation whose messages are not
    loaded gets them by prebuilt statements, attached to the session as stored ones: the
    unit of work would cost more than the statements (a title left to it cost a new
    conversation's first message a flush of its own: 3 % of a web process's CPU in a
    burst of first messages)."""
    now = utcnow()
    if _loaded(conv):
        for msg in msgs:
            _add(s, conv, msg)
        conv.updated_at = now
        if title is not None:
            conv.title = title
        s.commit()
        return
    if s.new:  # (messages added before these come before them)
        s.flush()
    conn = s.connection()
    for msg in msgs:
        msg.conversation_id = conv.id
        values = {name: msg.__dict__[name] for name in _COLUMNS if name in msg.__dict__}
        msg.seq = conn.execute(_INSERT, values).scalar_one()
        make_transient_to_detached(msg)  # (as if loaded: its unset columns are expired)
        for name in _COLUMNS:
            if name not in values:
                set_committed_value(msg, name, None)
        s.add(msg)
    touch = {"cid": conv.id, "now": now}
    if title is not None:
        touch["new_title"] = title
    conn.execute(_TOUCH[title is not None], touch)
    set_committed_value(conv, "updated_at", now)
    if title is not None:
        set_committed_value(conv, "title", title)
    s.commit()


def fail_unqueued(s: Session, msg: Message, error: ApiError) -> None:
    """End an answer that could not be queued, with the error the client is given."""
    msg.status = models.ERROR
    msg.error = {"code": error.code, "message": error.message}
    s.commit()


def last_user_message(conv: Conversation) -> Message | None:
    s = inspect(conv).session
    if s is not None and not _loaded(conv):
        return s.scalar(
            select(Message)
            .where(Message.conversation_id == conv.id, Message.role == "user")
            .order_by(Message.seq.desc())
            .limit(1)
        )
    for msg in reversed(conv.messages):
        if msg.role == "user":
            return msg
    return None


def drop_after(s: Session, conv: Conversation, seq: int) -> None:
    """Delete the conversation's messages after ``seq`` (one statement; not committed)."""
    if _loaded(conv):
        for msg in [m for m in conv.messages if m.seq > seq]:
            conv.messages.remove(msg)
    else:
        s.execute(delete(Message).where(Message.conversation_id == conv.id, Message.seq > seq))


def _history_statement() -> Select:
    m = Message.__table__.c
    said = or_(m.role == "user", and_(m.role == "assistant", m.content != ""))
    return (
        select(m.role, m.content)
        .where(m.conversation_id == bindparam("cid"), m.seq < bindparam("upto"), said)
        .order_by(m.seq)
    )


_HISTORY = _history_statement()


def history(s: Session, conv: Conversation, upto: Message) -> list[dict[str, str]]:
    """The chat-completions messages for the model: every finished turn before ``upto``.

    Read as plain rows by one prebuilt statement: loading the conversation's messages as
    objects cost a worker 2.1 ms of CPU per answer at 200 messages, 0.3 ms here.
    """
    _flush_pending(s)
    out = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
    rows = s.connection().execute(_HISTORY, {"cid": conv.id, "upto": upto.seq})
    out.extend({"role": role, "content": content} for role, content in rows)
    return out


def text_of(entries: list[Entry]) -> str:
    return "".join(e.payload()["text"] for e in entries if e.event == DELTA)


def apply_terminal(msg: Message, text: str, terminal: Entry) -> None:
    """Record a generation's end on its message, from its terminal stream entry."""
    payload = terminal.payload()
    # After Redis lost a stream, its fresh end carries the whole text (see ``lost_end``).
    msg.content = payload.pop("text", text)
    if terminal.event == DONE:
        msg.finish_reason = payload.get("finish_reason")
        msg.usage = payload.get("usage")
        msg.status = status_for(msg.finish_reason)
    else:
        msg.status, msg.error = models.ERROR, payload


def terminal_of(msg: Message) -> tuple[str, dict[str, Any]]:
    """A finished message's end as its stream's terminal event would say it."""
    if msg.status == models.ERROR:
        return ERROR, msg.error or {}
    return DONE, {"finish_reason": msg.finish_reason, "usage": msg.usage}


def status_for(finish_reason: str | None) -> str:
    """A finished (``done``) generation's message status."""
    if finish_reason in ("cancelled", models.INTERRUPTED):
        return models.CANCELLED if finish_reason == "cancelled" else models.INTERRUPTED
    return models.DONE


def reconcile(s: Session, bus: StreamBus, msg: Message) -> None:
    """Bring a message the worker never finished up to date with its stream.

    The worker records the end of every generation itself. This covers the cases it
    cannot: it died (a reader or the sweeper reaped it), or the database was out of reach
    when it finished. Reading never ends a generation: a worker may only be cut off from
    Redis for a moment (see ``recovery``).
    """
    if msg.status in models.FINAL_STATUSES or msg.generation_id is None:
        return
    state = bus.meta(msg.generation_id).get("state")
    if state in _STATUS or state is None:
        if state is not None and msg.status != _STATUS[state]:
            msg.status = _STATUS[state]
            s.commit()
        return
    entries = bus.entries(msg.generation_id)
    if entries and entries[-1].terminal:
        apply_terminal(msg, text_of(entries), entries[-1])
        s.commit()


def generation_view(bus: StreamBus, msg: Message) -> dict[str, Any]:
    """A generation's state with its text so far (from the stream while it exists)."""
    entries = bus.entries(msg.generation_id) if msg.status not in models.FINAL_STATUSES else []
    text = text_of(entries) if entries else msg.content
    return {
        "id": msg.generation_id,
        "message_id": msg.id,
        "conversation_id": msg.conversation_id,
        "status": msg.status,
        "text": text,
        "finish_reason": msg.finish_reason,
        "usage": msg.usage,
        "error": msg.error,
        # the id of the last event in ``text``: follow the stream from there, exactly
        "cursor": entries[-1].id if entries else None,
    }
