"""Metrics for Prometheus, served on ``/metrics`` to the operator only.

Two kinds, so that the numbers are right however the app is spread over processes:

- **App-wide, in Redis** (one hash, ``<p>metrics``), added to by whichever process sees
  the fact and read by any web process: answers queued, started and finished (by final
  status and error code, counted where the one terminal entry is written, so exactly
  once), time to first token and answer duration (histograms, from the stream's own
  timestamps), tokens relayed (characters / 4), ``worker_lost`` reaps, rate-limit
  refusals. Read at scrape time: the queue's depth and its oldest answer's age, and the
  workers' heartbeats. A platform that cannot scrape each process still gets these right.
- **Per web process** (prometheus_client; gunicorn's workers share them in multiprocess
  mode, see gunicorn.conf.py): open event streams, resumes by how the cursor arrived,
  Redis and database errors.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, NamedTuple

import redis
from flask import Flask
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from tidechat.redis_keys import RedisKeys

# --- per process ------------------------------------------------------------------------
OPEN_STREAMS = Gauge(
    "tidechat_open_streams", "Event streams open now, by door.", ["door"],
    multiprocess_mode="livesum",
)  # fmt: skip
RESUMES = Counter(
    "tidechat_resumes", "Streams opened past the start, by where the cursor came from.",
    ["cursor"],
)  # fmt: skip
REDIS_ERRORS = Counter("tidechat_redis_errors", "Requests that failed because Redis did.")
DATABASE_ERRORS = Counter(
    "tidechat_database_errors", "Requests that failed because the database did."
)

# --- app-wide, in Redis -------------------------------------------------------------------
BUCKETS = {
    "ttft_seconds": (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0),
    "duration_seconds": (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
}
_SEP = "\t"
CHARS_PER_TOKEN = 4  # tokens relayed are estimated from the characters, summed first


def field(name: str, *labels: str) -> str:
    """A counter's field in the app-wide metrics hash (for scripts that count in it)."""
    return _SEP.join((name, *labels))


def count(pipe: Any, keys: RedisKeys, name: str, *labels: str, amount: int = 1) -> None:
    """Add to an app-wide counter, in ``pipe`` (a pipeline or a client)."""
    pipe.hincrby(keys.metrics(), field(name, *labels), amount)


def observe(pipe: Any, keys: RedisKeys, name: str, value: float) -> None:
    """Add a value to an app-wide histogram: one count in the one bin it falls in, and
    the sum (the scrape makes the buckets cumulative and the count; two commands per
    value instead of one per bucket)."""
    key = keys.metrics()
    upper = next((repr(b) for b in BUCKETS[name] if value <= b), "+Inf")
    pipe.hincrby(key, field(name, "bin", upper), 1)
    pipe.hincrbyfloat(key, field(name, "sum"), value)


class EndTiming(NamedTuple):
    """What the script that ended a generation read of its stream, for the metrics."""

    end_id: str  # its terminal entry
    first_id: str  # its first entry (the terminal one, if no text came)
    started_at: str | None  # ms, from its state; None if no worker started it
    queued_at: str | None


def record_end(
    pipe: Any, keys: RedisKeys, timing: EndTiming, state: str, payload: dict, mode: str
) -> None:
    """Count one generation's end (its terminal entry was just written), with its time to
    first token and duration from the stream's own timestamps, in ``pipe`` (a pipeline the
    caller executes). ValueError if ``timing`` holds no stream ids."""
    code = str(payload.get("code") or "") if state == "error" else ""
    count(pipe, keys, "generations_finished", state, code)
    if mode == "reap":
        count(pipe, keys, "worker_lost")
    start_ms = int(timing.started_at or timing.queued_at or 0)
    end_ms = _ms_of(timing.end_id)
    if start_ms and end_ms >= start_ms:
        observe(pipe, keys, "duration_seconds", (end_ms - start_ms) / 1000)
        first_ms = _ms_of(timing.first_id)
        if timing.started_at and timing.first_id != timing.end_id and first_ms >= start_ms:
            observe(pipe, keys, "ttft_seconds", (first_ms - start_ms) / 1000)


def _ms_of(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


# --- scraping ---------------------------------------------------------------------------


class AppWide:
    """A collector of the app-wide figures, read from Redis at each scrape."""

    def __init__(self, app: Flask, r: redis.Redis) -> None:
        self.app, self.redis = app, r
        self.keys: RedisKeys = app.extensions["redis_keys"]

    def collect(self) -> Iterator[Any]:
        try:
            raw = self.redis.hgetall(self.keys.metrics())
        except redis.RedisError:
            return
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        yield from self._counters(fields)
        yield from self._histograms(fields)
        yield from self._queue()
        yield from self._workers()

    def _counters(self, fields: dict[str, str]) -> Iterator[Any]:
        simple = {
            "generations_queued": "Answers accepted and queued.",
            "generations_started": "Answers a worker started (not counting hand-ons).",
            "worker_lost": "Answers ended worker_lost: their worker died mid-answer.",
        }
        for name, doc in simple.items():
            family = CounterMetricFamily(f"tidechat_{name}", doc)
            family.add_metric([], float(fields.get(name, 0)))
            yield family
        tokens = CounterMetricFamily(
            "tidechat_tokens_relayed", "Tokens relayed from the model (characters / 4)."
        )
        tokens.add_metric([], float(fields.get("chars_relayed", 0)) / CHARS_PER_TOKEN)
        yield tokens
        finished = CounterMetricFamily(
            "tidechat_generations_finished", "Answers ended, by final status and error code.",
            labels=["status", "code"],
        )  # fmt: skip
        refused = CounterMetricFamily(
            "tidechat_rate_limited", "Requests refused by a limit (429), by code.",
            labels=["code"],
        )  # fmt: skip
        for field, value in fields.items():
            name, *labels = field.split(_SEP)
            if name == "generations_finished" and len(labels) == 2:
                finished.add_metric(labels, float(value))
            elif name == "rate_limited" and len(labels) == 1:
                refused.add_metric(labels, float(value))
        yield finished
        yield refused

    def _histograms(self, fields: dict[str, str]) -> Iterator[Any]:
        docs = {
            "ttft_seconds": ("tidechat_time_to_first_token_seconds", "From start to first text."),
            "duration_seconds": ("tidechat_answer_duration_seconds", "From start to the end."),
        }
        for name, (metric, doc) in docs.items():
            buckets, total = [], 0.0
            for upper in [*map(repr, BUCKETS[name]), "+Inf"]:
                total += float(fields.get(field(name, "bin", upper), 0))
                buckets.append((upper, total))
            family = HistogramMetricFamily(metric, doc)
            family.add_metric([], buckets, float(fields.get(field(name, "sum"), 0)))
            yield family

    def _queue(self) -> Iterator[Any]:
        from tidechat.limits import queue_names

        queue = self.keys.celery_queue(self.app.config["CELERY_QUEUE"])
        depth, oldest = 0, None
        try:
            for name in queue_names(queue):
                depth += self.redis.llen(name)
                tail = self.redis.lindex(name, -1)  # kombu pushes left, takes right
                queued_at = self._queued_at(tail) if tail else None
                if queued_at is not None and (oldest is None or queued_at < oldest):
                    oldest = queued_at
        except redis.RedisError:
            return
        family = GaugeMetricFamily("tidechat_queue_depth", "Answers waiting for a worker.")
        family.add_metric([], depth)
        yield family
        age = GaugeMetricFamily(
            "tidechat_queue_oldest_age_seconds", "How long the oldest waiting answer has waited."
        )
        age.add_metric([], max(0.0, time.time() - oldest / 1000) if oldest else 0.0)
        yield age

    def _queued_at(self, message: bytes) -> int | None:
        """When the generation of a queued Celery message was queued (ms), from its meta."""
        try:
            body = json.loads(message)
            args = json.loads(base64.b64decode(body["body"]))[0]
            value = self.redis.hget(self.keys.generation(args[0]).meta, "queued_at")
            return int(value) if value else None
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def _workers(self) -> Iterator[Any]:
        from worker import heartbeat

        try:
            workers = heartbeat.alive(self.app, self.redis)
        except redis.RedisError:
            return
        counts: dict[str, int] = defaultdict(int)
        for w in workers:
            counts["healthy" if w["healthy"] else "unhealthy"] += 1
        family = GaugeMetricFamily(
            "tidechat_workers", "Worker processes with a recent heartbeat.", labels=["health"]
        )
        for health in ("healthy", "unhealthy"):
            family.add_metric([health], counts[health])
        yield family
        running = GaugeMetricFamily("tidechat_answers_running", "Answers workers are running.")
        running.add_metric([], sum(w["running"] for w in workers))
        yield running


class _ThisProcess:
    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def exposition(app: Flask, r: redis.Redis) -> bytes:
    """The text format of every metric: this process's (or, under gunicorn, all of its
    workers'), and the app-wide ones."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_ThisProcess())
    registry.register(AppWide(app, r))
    return generate_latest(registry)
