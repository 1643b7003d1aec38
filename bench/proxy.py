"""The baseline: a direct proxy from the model to the client, no queue, no Redis.

One Flask route, served like Tidechat's web (gunicorn+gevent, ``gunicorn.conf.py``):
``POST /stream`` ``{"model"}`` calls the model server with the openai SDK (``stream=True``)
and writes each delta straight to the client as an SSE ``delta`` event ``{"text"}``, then
``done``, in Tidechat's own wire format. Whatever Tidechat's relay (Celery, Redis Streams,
the per-process hub) costs is measured against this floor.

Run: ``gunicorn -c gunicorn.conf.py 'bench.proxy:create_app()'`` with ``OPENAI_BASE_URL``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import httpx
import openai
from flask import Flask, Response, request

from tidechat.sse import ServerSentEvent
from tidechat.stream_bus import dumps

RETRY = ServerSentEvent(retry=1000).encode()


def create_app() -> Flask:
    """The proxy app; one openai client (and connection pool) per process."""
    app = Flask(__name__)
    client = openai.OpenAI(
        api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
        base_url=os.environ["OPENAI_BASE_URL"],
        timeout=float(os.environ.get("TIDECHAT_OPENAI_TIMEOUT", "60")),
        max_retries=0,
        # The SDK's default pool stops at 1000 connections; the idle sweep holds 10,000.
        http_client=openai.DefaultHttpxClient(
            limits=httpx.Limits(max_connections=20_000, max_keepalive_connections=1000)
        ),
    )

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/stream")
    def stream() -> Response:
        model = str((request.get_json(silent=True) or {}).get("model", ""))
        no_delay(request.environ.get("gunicorn.socket"))
        return Response(
            relay(client, model), mimetype="text/event-stream", direct_passthrough=True
        )

    return app


def no_delay(sock: socket.socket | None) -> None:
    """Disable Nagle's algorithm: gunicorn does not, and small SSE writes then wait for
    the client's delayed ACK (tens of milliseconds each under load)."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def relay(client: openai.OpenAI, model: str) -> Iterator[bytes]:
    """SSE bytes: the headers go out at once, then one event per model delta."""
    yield RETRY
    messages = [{"role": "user", "content": "Hi"}]
    finish = None
    with client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    ) as upstream:
        for chunk in upstream:
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    data = dumps({"text": choice.delta.content})
                    yield ServerSentEvent(event="delta", data=data).encode()
                finish = choice.finish_reason or finish
    done = dumps({"finish_reason": finish, "usage": None})
    yield ServerSentEvent(event="done", data=done).encode()
