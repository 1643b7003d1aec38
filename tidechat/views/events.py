"""The SSE route: replay then tail a generation's stream to an EventSource."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request
from werkzeug.wsgi import ClosingIterator

from tidechat import chat, db, limits, metrics, models
from tidechat.accounts import current_owner
from tidechat.errors import ApiError
from tidechat.sse import ServerSentEvent, ping
from tidechat.stream_bus import dumps, id_tuple, valid_cursor
from tidechat.stream_hub import StreamHub, Subscription
from tidechat.views.hub import get_hub

bp = Blueprint("events", __name__, url_prefix="/api")

SSE_HEADERS = {
    # no-transform: proxies and CDNs must neither compress nor buffer the stream
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}
# Where real clients put the resume cursor, in order of precedence: EventSource sends the
# header; event-source-polyfill sends ?lastEventId= (and never the header).
CURSOR_PARAMS = ("after", "lastEventId")
# Ids of an answer replayed from the database after its stream expired from Redis.
_DB_TEXT_ID, _DB_END_ID = "0-1", "0-2"
# When this process is shutting down: reconnect soon, to whichever process answers then.
_DRAIN_RETRY_MS = 250


def resume_cursor() -> str:
    cursor, source = request.headers.get("Last-Event-ID"), "Last-Event-ID"
    for name in CURSOR_PARAMS:
        if not cursor:
            cursor, source = request.args.get(name), name
    cursor = cursor or "0"
    if not valid_cursor(cursor):
        raise ApiError(400, "invalid_cursor", "The resume cursor is not an event id.")
    if cursor != "0":
        metrics.RESUMES.labels(source).inc()
    return cursor


@bp.get("/generations/<gid>/events")
def generation_events(gid: str):
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    s.commit()  # give the connection back: the stream may be held open for long
    cursor = resume_cursor()
    hub = get_hub()
    if hub.draining:
        return _stream(iter(()), _DRAIN_RETRY_MS)
    release = limits.open_stream("page")
    try:
        response = _follow(msg, gid, cursor, hub)
    except BaseException:
        release()
        raise
    if response.direct_passthrough:
        # werkzeug hands a passthrough body to the server as is, without calling the
        # response's close callbacks: the body itself must free the slot when closed.
        response.response = ClosingIterator(response.response, release)
    else:
        response.call_on_close(release)
    return response


def _follow(msg: models.Message, gid: str, cursor: str, hub: StreamHub) -> Response:
    # An unfinished answer whose stream Redis lost gets a terminal event soon (its worker
    # or the sweeper writes one): wait for it. A 204 would stop EventSource for good.
    sub = hub.subscribe(gid, cursor, await_stream=msg.status not in models.FINAL_STATUSES)
    if not sub.wait_ready(30):
        sub.close()
        raise ApiError(503, "unavailable", "The event stream is unavailable; retry shortly.")
    if sub.status == "finished":
        sub.close()
        return Response(status=204)  # EventSource stops reconnecting on 204
    if sub.status == "missing":  # a finished answer whose stream expired: the stored one
        sub.close()
        if id_tuple(cursor) >= id_tuple(_DB_END_ID):
            return Response(status=204)
        return _stream(_from_database(msg, cursor))
    interval = float(current_app.config["PING_INTERVAL"])
    return _stream(_tail(sub, interval), first=ping(interval))


def _stream(body: Iterator[bytes], retry_ms: int | None = None, first: bytes = b"") -> Response:
    retry = retry_ms if retry_ms is not None else int(current_app.config["SSE_RETRY_MS"])
    return Response(
        _prepend(ServerSentEvent(retry=retry).encode() + first, body),
        mimetype="text/event-stream",
        headers=SSE_HEADERS,
        direct_passthrough=True,
    )


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _tail(sub: Subscription, ping_interval: float) -> Iterator[bytes]:
    keepalive = ping(ping_interval)
    try:
        while True:
            got = sub.get(ping_interval)
            if got is None:
                yield keepalive
                continue
            wire, ended = got
            if wire:
                yield wire
            if sub.status == "drained":  # this process is stopping: come back elsewhere
                yield ServerSentEvent(retry=_DRAIN_RETRY_MS).encode()
                return
            if ended:
                return
    finally:
        sub.close()


def _from_database(msg: models.Message, cursor: str) -> Iterator[bytes]:
    """Events for a finished answer whose stream has expired, from the stored message,
    after ``cursor`` (the caller answers 204 to a cursor at or past the end)."""
    if msg.content and id_tuple(cursor) < id_tuple(_DB_TEXT_ID):
        data = dumps({"text": msg.content})
        yield ServerSentEvent(id=_DB_TEXT_ID, event="delta", data=data).encode()
    event, payload = chat.terminal_of(msg)
    yield ServerSentEvent(id=_DB_END_ID, event=event, data=dumps(payload)).encode()
