"""The generation task: stream the model's answer into the generation's Redis Stream."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import shared_task
from flask import Flask, current_app

from tidechat import chat, db, lifecycle, limits, models, policy
from tidechat.errors import DATABASE_DOWN, REDIS_DOWN
from tidechat.stream_bus import DONE, ERROR, GONE, STATE_LOST, Claim, StreamBus, lost_end
from worker import GENERATE_TASK, enqueue_generation, model_client
from worker.lease_keeper import Deadlines, Lease, LeaseKeeper
from worker.model_client import Finish, TextDelta, UpstreamError, Usage
from worker.retrying import retrying
from worker.stream_writer import Outbox, StreamWriter

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker process keeps for one app: the model clients and their connection
    pools, the lease keeper, the stream writer."""

    clients: model_client.ClientShards
    keeper: LeaseKeeper
    writer: StreamWriter


_runtimes: dict[int, Runtime] = {}


def runtime_for(app: Flask) -> Runtime:
    runtime = _runtimes.get(id(app))
    if runtime is None:
        cfg, bus = app.config, app.extensions["stream_bus"]
        runtime = _runtimes[id(app)] = Runtime(
            clients=model_client.ClientShards(lambda verify: model_client.make_client(cfg, verify)),
            keeper=LeaseKeeper(
                cfg["REDIS_URL"], bus, float(cfg["LEASE_TTL"]), float(cfg["LEASE_RENEW"]),
                Deadlines(float(cfg["ANSWER_DEADLINE"]), float(cfg["TOKEN_DEADLINE"])),
            ),  # fmt: skip
            writer=StreamWriter(
                bus, float(cfg["STREAM_COALESCE_MS"]), float(cfg["REDIS_RETRY_SECONDS"])
            ),
        )
    return runtime


class NotStarted(Exception):
    """Redis or the database failed before the answer started streaming: retry the task."""


@shared_task(bind=True, name=GENERATE_TASK, ignore_result=True)
def generate(task: Any, gid: str) -> None:
    app = current_app._get_current_object()
    try:
        Generation(app, gid).run()
    except NotStarted as exc:
        tries = task.request.retries
        if tries >= int(app.config["START_RETRIES"]):
            log.error("generation %s could not start after %d tries: %s", gid, tries + 1, exc)
            give_up(app, gid)
            return
        log.warning("generation %s could not start (%s); retry %d", gid, exc, tries + 1)
        raise task.retry(countdown=min(2**tries, 30), max_retries=None) from exc


def give_up(app: Flask, gid: str) -> None:
    """End an answer that could not be started, so its clients see an error (the sweeper
    records it in the database if it is still out of reach here)."""
    error = UpstreamError("unavailable", "The answer could not be started; please retry.")
    try:
        app.extensions["stream_bus"].fail_queued(gid, error.payload())
        s = db.session()
        msg = chat.generation_message(s, gid)
        if msg is not None and msg.status not in models.FINAL_STATUSES:
            chat.record_end(s, msg, msg.content, models.ERROR, error.payload())
    except Exception:
        log.warning("generation %s: could not record that it failed to start", gid, exc_info=True)
    lifecycle.finished(gid, status=models.ERROR, error_code=error.code)


@dataclass
class Outcome:
    event: str
    payload: dict
    status: str


class Generation:
    """One run of the model for one assistant message."""

    def __init__(self, app: Flask, gid: str) -> None:
        self.app, self.gid = app, gid
        self.cfg = app.config
        self.bus: StreamBus = app.extensions["stream_bus"]
        self.runtime = runtime_for(app)
        self.owner, self.prompt = "", ""  # whose answer, and what was asked (for the quota)
        self.started_at, self.relayed = time.monotonic(), False  # for lifecycle's timings

    def run(self) -> None:
        if self.runtime.keeper.draining:  # a task that reached a stopping worker: pass it on
            enqueue_generation(self.app, self.gid)
            log.info("generation %s passed on: this worker is stopping", self.gid)
            return
        s = db.session()
        try:
            msg = chat.generation_message(s, self.gid)
            claim = None if msg is None else self.bus.claim(self.gid, self._lease_ms)
        except (*DATABASE_DOWN, *REDIS_DOWN) as exc:
            raise NotStarted(exc) from exc
        if msg is None:
            log.warning("generation %s has no message; skipped", self.gid)
            return
        if claim is None:
            log.info("generation %s was cancelled or taken before it started", self.gid)
            return
        self.started_at = lifecycle.started(self.gid, model=msg.model, handed_on=bool(claim.seq))
        lease = self.runtime.keeper.hold(self.gid, claim.fence)
        try:  # the lease stays held until the end is recorded, however long that takes
            self._run_claimed(s, msg, claim, lease)
        except NotStarted:
            self._release(lease)
            raise
        except Exception:
            log.exception("generation %s failed", self.gid)
            s.rollback()
            error = UpstreamError("internal_error", "Something went wrong generating this answer.")
            self.bus.finish(self.gid, ERROR, error.payload(), models.ERROR, claim.fence)
            lifecycle.finished(self.gid, status=models.ERROR, error_code=error.code,
                               ms=lifecycle.ms_since(self.started_at))  # fmt: skip
        finally:
            self.runtime.keeper.release(lease)

    @property
    def _lease_ms(self) -> int:
        return int(float(self.cfg["LEASE_TTL"]) * 1000)

    def _release(self, lease: Lease) -> bool:
        """Queue the answer again for another worker (or another try of this task)."""
        try:
            return self.bus.release(self.gid, lease.fence)
        except REDIS_DOWN:
            log.warning("generation %s: could not release it", self.gid, exc_info=True)
            return False

    def _run_claimed(self, s: Any, msg: models.Message, claim: Claim, lease: Lease) -> None:
        try:
            prefix = self._prefix(msg, claim)
            request = self._request(s, msg, prefix)
        except (*DATABASE_DOWN, *REDIS_DOWN) as exc:
            raise NotStarted(exc) from exc
        outbox = Outbox(self.gid, claim.fence, claim.seq)
        if claim.seq:
            outbox.written.append(prefix)  # handed on: the answer so far is in the stream
        elif prefix:
            self.runtime.writer.put(outbox, prefix)  # Continue: it opens the new stream
        result = self._stream(request, lease, outbox)
        if result is None:
            return  # handed on to another worker
        self._record(s, msg, outbox.text, result, lease)

    def _prefix(self, msg: models.Message, claim: Claim) -> str:
        if claim.seq:
            log.info("generation %s: continuing a handed-on answer", self.gid)
            return chat.text_of(self.bus.entries(self.gid))
        return msg.content  # empty, or the partial answer of an interrupted one (Continue)

    def _request(self, s: Any, msg: models.Message, prefix: str) -> model_client.Request:
        conv = msg.conversation
        messages = policy.fit_context(chat.history(s, conv, msg), int(self.cfg["CONTEXT_TOKENS"]))
        self.owner, self.prompt = conv.owner, "".join(m["content"] for m in messages)
        chat.mark_streaming(s, msg)
        # End the read transaction: a generation must not hold one of the pool's few
        # database connections for its whole stream (it capped concurrent generations at
        # the pool size).
        s.commit()
        asked = msg.request or {}  # an API client's own settings for this answer
        return model_client.Request(
            model=msg.model,
            messages=messages,
            temperature=asked.get("temperature", conv.temperature),
            max_tokens=policy.max_output_tokens(self.cfg, asked.get("max_tokens")),
            prefix=prefix,
            continuation=self.cfg["CONTINUATION"],
        )

    def _stream(
        self, request: model_client.Request, lease: Lease, outbox: Outbox
    ) -> Outcome | None:
        """Relay the model's answer; how it ended, or None if it was handed on."""
        writer = self.runtime.writer
        finish: str | None = None
        usage: dict | None = None
        error: UpstreamError | None = None
        try:
            with (
                self.runtime.clients.lend() as client,
                model_client.open_stream(client, request, self.cfg["BACKEND_LABEL"]) as stream,
            ):
                lease.attach(stream)
                for event in model_client.events(stream):
                    if lease.interrupted:
                        break
                    if isinstance(event, TextDelta):
                        lease.token()
                        if not self.relayed:
                            self.relayed = True
                            lifecycle.first_token(self.gid, ms=lifecycle.ms_since(self.started_at))
                        if not writer.put(outbox, event.text):
                            break
                    elif isinstance(event, Finish):
                        finish = event.reason
                    elif isinstance(event, Usage):
                        usage = event.usage
        except UpstreamError as exc:
            error = exc
            # %r: the model server's text can hold newlines that would forge log lines
            log.warning("generation %s: %s from the model server: %r", self.gid, exc.code,
                        exc.detail or exc.message)  # fmt: skip
        overdue = lease.overdue(time.monotonic()) if lease.timed_out.is_set() else None
        writer.drain(outbox)

        if finish is not None and not outbox.stopped:
            return Outcome(DONE, {"finish_reason": finish, "usage": usage}, models.DONE)
        if outbox.gone or lease.gone.is_set():
            return Outcome(ERROR, STATE_LOST, models.ERROR)
        if outbox.failed:
            return Outcome(ERROR, outbox.failed, models.ERROR)
        if lease.lost.is_set() or outbox.stopped:
            return Outcome("", {}, "")  # ended by someone else (the reaper): theirs stands
        if lease.cancelled.is_set():
            return Outcome(DONE, {"finish_reason": "cancelled", "usage": usage}, models.CANCELLED)
        if lease.handed_off.is_set():
            return self._hand_off(lease)
        if overdue is not None:
            timeout = UpstreamError("upstream_timeout", overdue)
            return Outcome(ERROR, timeout.payload(), models.ERROR)
        error = error or UpstreamError(
            "upstream_incomplete", "The model's answer ended before it was complete."
        )
        return Outcome(ERROR, error.payload(), models.ERROR)

    def _hand_off(self, lease: Lease) -> Outcome | None:
        """This worker is stopping (a deploy): pass the answer on to one that stays, which
        continues it in the same stream; or, where the backend cannot continue a partial
        answer, end it ``interrupted`` with its text kept."""
        payload = {"finish_reason": models.INTERRUPTED, "usage": None}
        if self.cfg["CONTINUATION"] == "none":
            log.warning("generation %s interrupted by shutdown", self.gid)
            return Outcome(DONE, payload, models.INTERRUPTED)
        if self._release(lease):
            try:
                enqueue_generation(self.app, self.gid)
                log.warning("generation %s handed on (this worker is stopping)", self.gid)
                return None
            except REDIS_DOWN:  # released, but not queued: the sweeper's queue timeout ends it
                log.exception("generation %s: released but could not be queued", self.gid)
                return None
        return Outcome("", {}, "")  # no longer ours: whoever took it ends it

    def _record(
        self, s: Any, msg: models.Message, text: str, end: Outcome, lease: Lease
    ) -> None:
        """Store the answer, then end the stream: a client that sees the end sees it stored.

        Both are retried for a while (the database or Redis may be out of reach for a
        moment); if the database stays out of reach the stream still ends, and the
        sweeper stores the answer from it later.
        """
        if not end.event:
            self._reconcile(s, msg)
            return
        self._count_tokens(end.payload.get("usage"), text)
        try:
            retrying(
                lambda: chat.record_end(s, msg, text, end.status, end.payload),
                DATABASE_DOWN, float(self.cfg["DB_RETRY_SECONDS"]), f"storing {self.gid}",
            )  # fmt: skip
        except Exception:  # e.g. the database stayed down: still end the stream
            log.error("could not store the answer of %s", self.gid, exc_info=True)
            s.rollback()
        if end.payload is STATE_LOST:
            ended = self.bus.end_lost(self.gid, end.event, lost_end(text), end.status)
            self._finished(end.status, end.payload)
        else:
            ended = retrying(
                lambda: self.bus.finish(self.gid, end.event, end.payload, end.status, lease.fence),
                REDIS_DOWN, float(self.cfg["REDIS_RETRY_SECONDS"]), f"ending {self.gid}",
            )  # fmt: skip
            if ended == GONE:  # Redis lost its state as it ended: end the open streams
                self.bus.end_lost(self.gid, ERROR, lost_end(text), models.ERROR)
                chat.record_end(s, msg, text, models.ERROR, STATE_LOST)
                self._finished(models.ERROR, STATE_LOST)
            elif ended is None:
                self._reconcile(s, msg)  # someone else ended it first: theirs stands
            else:
                self._finished(end.status, end.payload)

    def _finished(self, status: str, payload: dict) -> None:
        lifecycle.finished(self.gid, status=status, ms=lifecycle.ms_since(self.started_at),
                           **lifecycle.end_facts(payload))  # fmt: skip

    def _count_tokens(self, usage: dict | None, text: str) -> None:
        """Charge the answer to its account's daily quota (best effort: Redis may be down)."""
        try:
            limits.count_tokens(self.app, self.owner, limits.used_tokens(usage, self.prompt, text))
        except REDIS_DOWN:
            log.warning("generation %s: could not count its tokens", self.gid)

    def _reconcile(self, s: Any, msg: models.Message) -> None:
        try:
            s.rollback()
            s.refresh(msg)
            chat.reconcile(s, self.bus, msg)
        except Exception:
            log.warning("generation %s: could not reconcile", self.gid, exc_info=True)



def hand_off_after(app: Flask, seconds: float) -> None:
    runtime = _runtimes.get(id(app))
    if runtime is not None:
        runtime.keeper.hand_off_after(seconds)
