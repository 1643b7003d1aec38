"""Conversations, turns and generations: the rules the API views apply."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
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


def owned_generation(s: Session, owner: str, gid: str) -> Message:
    if not hygiene.is_id(gid):
        raise not_found("generation")
    msg = s.scalar(
        select(Message)
        .join(Conversation)
        .where(Message.generation_id == gid, Conversation.owner == owner)
    )
    if msg is None:
        raise not_found("generation")
    return msg


def generation_message(s: Session, gid: str) -> Message | None:
    return s.scalar(select(Message).where(Message.generation_id == gid))


def unfinished(s: Session, limit: int) -> list[Message]:
    """Answers not yet final, oldest first (for the sweeper)."""
    query = (
        select(Message)
        .where(Message.status.in_(models.UNFINISHED_STATUSES), Message.generation_id.is_not(None))
        .order_by(Message.seq)
        .limit(limit)
    )
    return list(s.scalars(query))


def record_end(s: Session, msg: Message, text: str, status: str, payload: dict) -> None:
    """Store how a generation ended, as one UPDATE and commit (safe to retry: it does not
    depend on what the session has loaded, which a failed commit throws away)."""
    values: dict[str, Any] = {"content": text, "status": status}
    if status == models.ERROR:
        values["error"] = payload
    else:
        values.update(finish_reason=payload.get("finish_reason"), usage=payload.get("usage"))
    s.rollback()
    s.execute(update(Message).where(Message.id == msg.id).values(**values))
    s.commit()
    for name, value in values.items():
        set_committed_value(msg, name, value)


def list_conversations(s: Session, owner: str) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.owner == owner)
        .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc())
    )
    return list(s.scalars(query))


def in_progress(conv: Conversation) -> Message | None:
    for msg in conv.messages:
        if msg.role == "assistant" and msg.status not in models.FINAL_STATUSES:
            return msg
    return None


def start_turn(
    s: Session, conv: Conversation, content: str, model: str, gid: str, request: dict | None = None
) -> tuple[Message, Message]:
    """Store the user's message and a queued assistant message for generation ``gid``."""
    if not any(m.role == "user" for m in conv.messages):
        conv.title = title_from(content)
    user = Message(id=new_id(), role="user", content=content, status=models.DONE)
    conv.messages.append(user)
    return user, queue_answer(s, conv, model, gid, request)


def add_history(conv: Conversation, turns: list[tuple[str, str]]) -> None:
    """Earlier turns an API client sent along (``(role, text)``), as finished messages."""
    for role, text in turns:
        if not conv.messages and role == "user":
            conv.title = title_from(text)
        conv.messages.append(Message(id=new_id(), role=role, content=text, status=models.DONE))


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
    s: Session, conv: Conversation, model: str, gid: str, request: dict | None = None
) -> Message:
    """A queued assistant message for generation ``gid``, committed."""
    assistant = Message(
        id=new_id(),
        role="assistant",
        content="",
        status=models.QUEUED,
        model=model,
        generation_id=gid,
        request=request,
    )
    conv.messages.append(assistant)
    conv.updated_at = utcnow()
    s.commit()
    return assistant


def fail_unqueued(s: Session, msg: Message, error: ApiError) -> None:
    """End an answer that could not be queued, with the error the client is given."""
    msg.status = models.ERROR
    msg.error = {"code": error.code, "message": error.message}
    s.commit()


def last_user_message(conv: Conversation) -> Message | None:
    for msg in reversed(conv.messages):
        if msg.role == "user":
            return msg
    return None


def history(conv: Conversation, upto: Message) -> list[dict[str, str]]:
    """The chat-completions messages for the model: every finished turn before ``upto``."""
    out = []
    if conv.system_prompt:
        out.append({"role": "system", "content": conv.system_prompt})
    for msg in conv.messages:
        if msg.seq >= upto.seq:
            break
        if msg.role == "user" or (msg.role == "assistant" and msg.content):
            out.append({"role": msg.role, "content": msg.content})
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
