"""Measurements taken from outside the processes: Redis, RSS, sockets, CPU, percentiles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import psutil
import redis


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def redis_commands(client: redis.Redis) -> int:
    """Commands Redis has run since its stats were reset (INFO commandstats)."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def delete_keys(client: redis.Redis, prefix: str) -> None:
    """Delete a run's keys (every key under its ``prefix``) from a shared Redis."""
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)


def redis_port(url: str) -> int:
    return urlparse(url).port or 6379


def redis_connections(pid: int, port: int) -> int:
    """TCP connections process ``pid`` holds to the Redis server on ``port``."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return -1
    return sum(1 for c in conns if c.raddr and c.raddr.port == port)


def established(pid: int, local_port: int) -> int:
    """Established TCP connections ``pid`` accepted on ``local_port`` (connected clients)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return -1
    return sum(1 for c in conns if c.laddr.port == local_port and c.status == "ESTABLISHED")


def redis_client_names(client: redis.Redis, prefix: str) -> int:
    """Connections Redis itself lists (CLIENT LIST) whose name starts with ``prefix``."""
    return sum(1 for c in client.client_list() if c.get("name", "").startswith(prefix))


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def cpu_seconds_exact(pid: int) -> float:
    """:func:`cpu_seconds` from the scheduler's nanosecond counters (every thread's
    ``/proc/<pid>/task/*/schedstat``): the per-process figures tick in 10 ms steps, too
    coarse for one request or a burst of a few tasks."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:  # a thread that ended since the listing
            continue
    return total / 1e9


def ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 2)
