"""The baseline: a direct proxy from the model to the client, no queue, no Redis.

One Flask route, served like Tidechat's web (gunicorn+gevent, ``gunicorn.conf.py``):
``POST /stream`` ``{"model"}`` calls the model server with the openai SDK (``stream=True``, through
``worker.model_client``, the worker's own model client)
and writes each delta straight to the client as an SSE ``delta`` event ``{"text"}``, then
``done``, in Tidechat's own wire format. Whatever Tidechat's relay (Celery, Redis Streams,
the per-process hub) costs is measured against this floor.

Run: ``gunicorn -c gunicorn.conf.py 'bench.proxy:create_app()'`` with ``OPENAI_BASE_URL``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator

import openai
from flask import Flask, Response, request

from tidechat.config import DEFAULTS
from tidechat.sse import ServerSentEvent
from tidechat.stream_bus import dumps
from worker import model_client

RETRY = ServerSentEvent(retry=1000).encode()


def create_app() -> Flask:
    """The proxy app; its openai clients (and connection pools) are the worker's kind
    (``model_client.ClientShards``), one set per process."""
    clients = model_clients()
    return stream_app(__name__, lambda model: relay(clients, model))


def model_clients() -> model_client.ClientShards:
    """The model clients of a baseline process (the proxy's, the bare relay's worker)."""
    keepalive = float(os.environ.get("TIDECHAT_OPENAI_KEEPALIVE", DEFAULTS["OPENAI_KEEPALIVE"]))

    def make(verify: ssl.SSLContext) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=os.environ.get("OPENAI_API_KEY") or "not-needed",
            base_url=os.environ["OPENAI_BASE_URL"],
            timeout=float(os.environ.get("TIDECHAT_OPENAI_TIMEOUT", "60")),
            max_retries=0,
            # The SDK's default pool stops at 1000 connections; the idle sweep holds 10,000.
            # Idle connections are kept as long as Tidechat's worker keeps them.
            http_client=openai.DefaultHttpxClient(
                verify=verify,
                limits=model_client.connection_limits(keepalive, connections=20_000, kept=1000),
            ),
        )

    return model_client.ClientShards(make)


def stream_app(name: str, answer: Callable[[str], Iterator[bytes]]) -> Flask:
    """A baseline's web app: ``POST /stream`` ``{"model"}`` answers with the SSE bytes of
    ``answer(model)``; ``GET /health``."""
    app = Flask(name)

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/stream")
    def stream() -> Response:
        model = str((request.get_json(silent=True) or {}).get("model", ""))
        return Response(answer(model), mimetype="text/event-stream", direct_passthrough=True)

    return app


def relay(clients: model_client.ClientShards, model: str) -> Iterator[bytes]:
    """SSE bytes: the headers go out at once, then one event per model delta.

    The model is read exactly as Tidechat's worker reads it (``worker.model_client``), so
    the two differ only in the relay."""
    yield RETRY
    messages = [{"role": "user", "content": "Hi"}]
    finish = None
    request = model_client.Request(model, messages)
    with clients.lend() as client, model_client.open_stream(client, request) as upstream:
        for event in model_client.events(upstream):
            if isinstance(event, model_client.TextDelta):
                data = dumps({"text": event.text})
                yield ServerSentEvent(event="delta", data=data).encode()
            elif isinstance(event, model_client.Finish):
                finish = event.reason
    done = dumps({"finish_reason": finish, "usage": None})
    yield ServerSentEvent(event="done", data=done).encode()
