"""Starting, following and stopping answers: the one core every door calls (the page's
JSON API in views/api.py, the OpenAI-compatible API in views/openai_api.py).

An answer is an assistant message with a generation id. Starting one admits it against the
limits, stores it queued, creates its stream and enqueues its task; the worker streams the
model's text into the stream; any web process follows it through its StreamHub.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import current_app

from tidechat import chat, db, lifecycle, limits, models
from tidechat.errors import REDIS_DOWN, ApiError, unavailable
from tidechat.models import Conversation, Message
from tidechat.stream_bus import DONE, StreamBus
from tidechat.stream_hub import Subscription
from tidechat.views.hub import get_hub
from worker import enqueue_generation


def bus() -> StreamBus:
    return current_app.extensions["stream_bus"]


def start(
    store: Callable[[str], Message], follow: bool = False
) -> tuple[Message, Subscription | None]:
    """Admit a new answer, store it with ``store(generation id)`` (which commits the
    queued assistant message), and queue it. With ``follow``, also a subscription to its
    stream from the start."""
    _release_connection()
    admission = limits.admit(models.new_id())
    try:
        assistant = store(admission.gid)
    except BaseException:
        admission.withdraw()
        raise
    return assistant, _launch(assistant, admission, follow)


def _release_connection() -> None:
    """Give the request's database connection back to the pool while the admission waits
    for Redis (``store`` takes one again). Holding it across that round trip, under a burst
    of a thousand sends a message POST held one of the pool's 30 for 230 ms (median; 1.2 s
    at most) against 0.5 ms for any other request, and sends past the pool's timeout were
    refused 503 "busy". Not if the session holds changes of its caller's: those are stored
    with the answer, or not at all."""
    s = db.session()
    if not (s.new or s.dirty or s.deleted):
        s.commit()  # ends the read transaction: nothing to write


def _launch(assistant: Message, admission: limits.Admission, follow: bool) -> Subscription | None:
    gid = assistant.generation_id
    sub = None
    try:
        with bus().redis.pipeline(transaction=False) as pipe:
            bus().create(gid, admission.keys, pipe)
            if bus().keys.clustered:
                # A cluster pipeline keeps order per node only: the task must not reach a
                # worker before its generation exists.
                pipe.execute()
            enqueue_generation(current_app, gid, admission.priority, pipe)
            pipe.execute()
        sub = get_hub().subscribe(gid) if follow else None
        lifecycle.queued(gid, model=assistant.model, priority=admission.priority)
    except REDIS_DOWN:
        # Not queued: end the answer now, so the chat is not left waiting for it forever
        # (the page offers Retry), and tell the client to try again.
        if sub is not None:
            sub.close()
        admission.withdraw()
        chat.fail_unqueued(db.session(), assistant, unavailable("Redis"))
        raise
    return sub


def ensure_idle(s, conv: Conversation, facts: chat.TurnFacts | None = None) -> chat.TurnFacts:
    """409 while the conversation's last answer is still being written; else its
    :class:`~tidechat.chat.TurnFacts` (``facts``, or one query: its messages are not
    loaded)."""
    facts = facts or chat.turn_facts(s, conv)
    pending = facts.pending
    if pending is not None:
        chat.reconcile(s, bus(), pending)
        if pending.status not in models.FINAL_STATUSES:
            raise ApiError(409, "generation_in_progress", "Wait for the answer, or stop it first.")
    return facts


def wait_end(sub: Subscription, assistant: Message) -> Message:
    """Wait until the answer is over (``NONSTREAM_TIMEOUT`` at most, then 504); the
    message as stored."""
    timeout = float(current_app.config["NONSTREAM_TIMEOUT"])
    try:
        if not sub.wait_ready(timeout):
            raise ApiError(504, "timeout", "The answer did not finish in time.")
        ended = sub.status != "live"
        while not ended:
            got = sub.get_frames(timeout)
            if got is None:
                raise ApiError(504, "timeout", "The answer did not finish in time.")
            ended = got[1]
    finally:
        sub.close()
    s = db.session()
    s.refresh(assistant)
    chat.reconcile(s, bus(), assistant)
    return assistant


def cancel(s, msg: Message) -> bool:
    """Ask an answer to stop (idempotent); whether it is over now."""
    chat.reconcile(s, bus(), msg)
    if msg.status in models.FINAL_STATUSES:
        return True
    gid = msg.generation_id
    bus().request_cancel(gid)
    # Not started yet: end it here; the worker will find it finished and skip it. And if
    # Redis lost its state, nobody else can end it: end it here too.
    # Its worker gone (no lease), or Redis lost the state of an answer no worker holds
    # (the text of one that streams is the worker's: it ends that itself, state_lost).
    cancelled = {"finish_reason": "cancelled", "usage": None}
    if msg.status == models.QUEUED and bus().end_lost(gid, DONE, cancelled, models.CANCELLED):
        chat.record_end(s, msg, msg.content, models.CANCELLED, cancelled)
        lifecycle.finished(gid, status=models.CANCELLED)
    elif (msg.status == models.QUEUED and bus().cancel_queued(gid)) or bus().reap(
        gid, cancelled, DONE, models.CANCELLED
    ):
        chat.reconcile(s, bus(), msg)
        lifecycle.finished(gid, status=models.CANCELLED)
    return msg.status in models.FINAL_STATUSES
