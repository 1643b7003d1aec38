"""Celery's own floor in a burst: how soon the mission's queue starts a task, before any of
Tidechat's work (issue 14's burst target).

    .venv/bin/python -m bench.celery_floor                 # bursts of 10 and 100, 5 of each
    .venv/bin/python -m bench.celery_floor --sizes 100 --bursts 10

One Celery worker process runs Tidechat's own Celery app (``worker.celery_app``: its broker
transport and settings, its Flask task class, the real ``generate`` task, the gevent pool
at the bench's concurrency), except that each generation's ``Generation.run`` only records
when it began. This process queues each burst as POSTs queue answers
(``enqueue_generation``: the same message on the same list), all of it in one pipeline: the
soonest any web process could. Per burst size it reports the delay from that push to each
task's start (p50 and max, the median over the bursts) and the worker's CPU per task.
Everything Tidechat does to start an answer (its POST, the database, the claim, the model
request, the SSE request) comes on top of these.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import worker_app  # noqa: F401  (in the worker: it prints the ready line)
from bench.metrics import cpu_seconds_exact, delete_keys
from bench.procs import start_worker

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
OUTPUT = Path(__file__).resolve().parent / "output"


def _started_key() -> str:
    return os.environ["TIDECHAT_KEY_PREFIX"] + "floor:started"


def __getattr__(name: str) -> Any:
    """The worker's app (``celery -A bench.celery_floor``): Tidechat's, recording starts."""
    if name in ("celery_app", "app", "celery"):
        from worker import celery_app, tasks

        tasks.Generation.run = _record_start  # type: ignore[method-assign]
        return celery_app.celery_app
    raise AttributeError(name)


def _record_start(generation: Any) -> None:
    generation.bus.redis.rpush(_started_key(), f"{generation.gid} {time.time()}")


def settings(prefix: str, rundir: Path) -> dict[str, str]:
    return {
        "REDIS_URL": REDIS_URL,
        "DATABASE_URL": f"sqlite:///{rundir / 'tidechat.db'}",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",  # never asked: no task reaches the model
        "SECRET_KEY": "bench-" + prefix,
        "TIDECHAT_KEY_PREFIX": prefix,
        "TIDECHAT_CELERY_QUEUE": prefix + "generate",
        "LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    }


def burst(app: Any, size: int, worker_pid: int, timeout: float = 60) -> dict[str, float]:
    """Queue ``size`` tasks at once; each one's delay until it started (ms), and the
    worker's CPU per task (ms)."""
    from worker import enqueue_generation

    r = app.extensions["stream_bus"].redis
    r.delete(_started_key())
    cpu0 = cpu_seconds_exact(worker_pid)
    sent = time.time()
    with app.app_context(), r.pipeline(transaction=False) as pipe:
        for _ in range(size):
            enqueue_generation(app, uuid.uuid4().hex, 0, pipe)
        pipe.execute()
    deadline = time.monotonic() + timeout
    while r.llen(_started_key()) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{r.llen(_started_key())} of {size} tasks started")
        time.sleep(0.005)
    cpu = cpu_seconds_exact(worker_pid) - cpu0
    delays = sorted((float(v.split()[1]) - sent) * 1000 for v in r.lrange(_started_key(), 0, -1))
    return {
        "p50_ms": round(statistics.median(delays), 1),
        "max_ms": round(delays[-1], 1),
        "cpu_ms_per_task": round(cpu * 1000 / size, 2),
    }


def run(sizes: list[int], bursts: int, concurrency: int) -> dict[str, Any]:
    prefix = f"tcfloor:{uuid.uuid4().hex[:8]}:"
    rundir = Path(tempfile.mkdtemp(prefix="celery-floor-"))
    env = settings(prefix, rundir)
    for name in [n for n in os.environ if n.startswith(("TIDECHAT_", "OPENAI_"))]:
        del os.environ[name]  # only this run's settings, in both processes
    os.environ.update(env)
    from app import create_app
    from tidechat import db

    db.upgrade(env["DATABASE_URL"])
    app = create_app()
    proc = start_worker(
        dict(os.environ), rundir, concurrency, "floor_worker", app="bench.celery_floor"
    )
    rows = []
    try:
        pid = proc.work_pid()
        for size in sizes:
            burst(app, size, pid)  # warm-up: imports, the pool's greenlets, connections
            runs = [burst(app, size, pid) for _ in range(bursts)]
            row = {"size": size, "bursts": runs}
            for key in runs[0]:
                row[key] = round(statistics.median(r[key] for r in runs), 2)
            rows.append(row)
            print(
                f"burst of {size:>4}: start p50 {row['p50_ms']} ms, max {row['max_ms']} ms, "
                f"worker CPU {row['cpu_ms_per_task']} ms per task (median of {bursts})",
                flush=True,
            )
    finally:
        proc.stop()
        delete_keys(app.extensions["stream_bus"].redis, prefix)
    return {"concurrency": concurrency, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100", help="burst sizes, comma-separated")
    parser.add_argument("--bursts", type=int, default=5, help="bursts of each size")
    parser.add_argument("--concurrency", type=int, default=1000, help="the gevent pool's")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    result = run(sizes, args.bursts, args.concurrency)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / time.strftime("celery-floor-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
