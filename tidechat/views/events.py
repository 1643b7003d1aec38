"""The SSE route: replay then tail a generation's stream to an EventSource."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, current_app, request

from tidechat import chat, db, models
from tidechat.errors import ApiError
from tidechat.identity import current_owner
from tidechat.sse import PING, ServerSentEvent
from tidechat.stream_bus import dumps, valid_cursor
from tidechat.stream_hub import Subscription
from tidechat.views.hub import get_hub

bp = Blueprint("events", __name__, url_prefix="/api")

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}


@bp.get("/generations/<gid>/events")
def generation_events(gid: str):
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    cursor = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    if not valid_cursor(cursor):
        raise ApiError(400, "invalid_cursor", "The resume cursor is not an event id.")

    sub = get_hub().subscribe(gid, cursor)
    if not sub.wait_ready(30):
        sub.close()
        raise ApiError(503, "unavailable", "The event stream is unavailable; retry shortly.")
    if sub.status == "finished":
        sub.close()
        return Response(status=204)  # EventSource stops reconnecting on 204
    if sub.status == "missing":
        sub.close()
        if cursor != "0" or msg.status not in models.FINAL_STATUSES:
            return Response(status=204)
        body = _from_database(msg)  # the stream expired: replay the stored answer
    else:
        body = _tail(sub, float(current_app.config["PING_INTERVAL"]))

    retry = ServerSentEvent(retry=int(current_app.config["SSE_RETRY_MS"])).encode()
    return Response(
        _prepend(retry, body),
        mimetype="text/event-stream",
        headers=SSE_HEADERS,
        direct_passthrough=True,
    )


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _tail(sub: Subscription, ping_interval: float) -> Iterator[bytes]:
    try:
        while True:
            got = sub.get(ping_interval)
            if got is None:
                yield PING
                continue
            wire, ended = got
            if wire:
                yield wire
            if ended:
                return
    finally:
        sub.close()


def _from_database(msg: models.Message) -> Iterator[bytes]:
    """Events for a finished answer whose stream has expired, from the stored message."""
    if msg.content:
        yield ServerSentEvent(id="0-1", event="delta", data=dumps({"text": msg.content})).encode()
    if msg.status == models.ERROR:
        yield ServerSentEvent(id="0-2", event="error", data=dumps(msg.error)).encode()
    else:
        payload = {"finish_reason": msg.finish_reason, "usage": msg.usage}
        yield ServerSentEvent(id="0-2", event="done", data=dumps(payload)).encode()
