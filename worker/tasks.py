"""The generation task: stream the model's answer into the generation's Redis Stream."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from celery import shared_task
from flask import Flask, current_app

from tidechat import chat, db, models
from tidechat.stream_bus import DONE, ERROR, StreamBus
from worker import GENERATE_TASK, model_client
from worker.lease_keeper import Deadlines, LeaseKeeper
from worker.model_client import Finish, TextDelta, UpstreamError, Usage
from worker.stream_writer import Outbox, StreamWriter

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker process keeps for one app: the model client and its connection
    pool, the lease keeper, the stream writer."""

    client: Any
    keeper: LeaseKeeper
    writer: StreamWriter


_runtimes: dict[int, Runtime] = {}


def runtime_for(app: Flask) -> Runtime:
    runtime = _runtimes.get(id(app))
    if runtime is None:
        cfg, bus = app.config, app.extensions["stream_bus"]
        runtime = _runtimes[id(app)] = Runtime(
            client=model_client.make_client(cfg),
            keeper=LeaseKeeper(
                cfg["REDIS_URL"], bus, float(cfg["LEASE_TTL"]), float(cfg["LEASE_RENEW"]),
                Deadlines(float(cfg["ANSWER_DEADLINE"]), float(cfg["TOKEN_DEADLINE"])),
            ),  # fmt: skip
            writer=StreamWriter(bus, float(cfg["STREAM_COALESCE_MS"])),
        )
    return runtime


@shared_task(name=GENERATE_TASK, ignore_result=True)
def generate(gid: str) -> None:
    Generation(current_app._get_current_object(), gid).run()


class Generation:
    """One run of the model for one assistant message."""

    def __init__(self, app: Flask, gid: str) -> None:
        self.app, self.gid = app, gid
        self.bus: StreamBus = app.extensions["stream_bus"]
        self.holder = f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> None:
        s = db.session()
        msg = chat.generation_message(s, self.gid)
        if msg is None:
            log.warning("generation %s has no message; skipped", self.gid)
            return
        lease_ms = int(float(self.app.config["LEASE_TTL"]) * 1000)
        if not self.bus.claim(self.gid, self.holder, lease_ms):
            log.info("generation %s was cancelled or taken before it started", self.gid)
            return
        msg.status = models.STREAMING
        s.commit()
        try:
            self._stream_and_record(s, msg)
        except Exception:
            log.exception("generation %s failed", self.gid)
            s.rollback()
            error = UpstreamError("internal_error", "Something went wrong generating this answer.")
            self.bus.finish(self.gid, ERROR, error.payload(), models.ERROR)

    def _stream_and_record(self, s: Any, msg: models.Message) -> None:
        runtime = runtime_for(self.app)
        lease = runtime.keeper.hold(self.gid)
        outbox = Outbox(self.gid)
        parts: list[str] = []
        finish: str | None = None
        usage: dict | None = None
        error: UpstreamError | None = None
        try:
            conv = msg.conversation
            messages = chat.history(conv, msg)
            # End the read transaction: a generation must not hold one of the pool's few
            # database connections for its whole stream (it capped concurrent generations
            # at the pool size).
            s.commit()
            client = runtime.client
            max_tokens = int(self.app.config["MAX_OUTPUT_TOKENS"])
            backend = self.app.config["BACKEND_LABEL"]
            with model_client.open_stream(
                client, msg.model, messages, conv.temperature, max_tokens, backend
            ) as stream:
                lease.attach(stream)
                for event in model_client.events(stream):
                    if lease.interrupted:
                        break
                    if isinstance(event, TextDelta):
                        lease.token()
                        if not runtime.writer.put(outbox, event.text):
                            break
                        parts.append(event.text)
                    elif isinstance(event, Finish):
                        finish = event.reason
                    elif isinstance(event, Usage):
                        usage = event.usage
        except UpstreamError as exc:
            error = exc
        finally:
            overdue = lease.overdue(time.monotonic()) if lease.timed_out.is_set() else None
            runtime.keeper.release(lease)
        if not runtime.writer.drain(outbox):
            lease.lost.set()  # ended by someone else (the reaper): they record it

        text = "".join(parts)
        if outbox.failed:
            error = UpstreamError("internal_error", "This answer could not be stored.")
            self._record(s, msg, text, ERROR, error.payload(), models.ERROR)
        elif lease.lost.is_set():
            chat.reconcile(s, self.bus, msg)
        elif overdue is not None and finish is None:
            error = UpstreamError("upstream_timeout", overdue)
            self._record(s, msg, text, ERROR, error.payload(), models.ERROR)
        elif lease.cancelled.is_set() and finish is None:
            payload = {"finish_reason": "cancelled", "usage": usage}
            self._record(s, msg, text, DONE, payload, models.CANCELLED)
        elif error is not None or finish is None:
            error = error or UpstreamError(
                "upstream_incomplete", "The model's answer ended before it was complete."
            )
            self._record(s, msg, text, ERROR, error.payload(), models.ERROR)
        else:
            self._record(s, msg, text, DONE, {"finish_reason": finish, "usage": usage}, models.DONE)

    def _record(
        self, s: Any, msg: models.Message, text: str, event: str, payload: dict, status: str
    ) -> None:
        """Store the answer, then end the stream: a client that sees the end sees it stored."""
        msg.content, msg.status = text, status
        if event == DONE:
            msg.finish_reason, msg.usage = payload["finish_reason"], payload["usage"]
        else:
            msg.error = payload
        try:
            s.commit()
        except Exception:  # e.g. the conversation was deleted meanwhile: still end the stream
            log.warning("could not store the answer of %s", self.gid, exc_info=True)
            s.rollback()
            self.bus.finish(self.gid, event, payload, status)
            return
        if self.bus.finish(self.gid, event, payload, status) is None:
            chat.reconcile(s, self.bus, msg)  # someone else ended it first: theirs stands
