"""Real processes for end-to-end tests: a Celery worker and a gunicorn+gevent web server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procs import BIN, ROOT, Proc, free_port, spawn, wait_for

__all__ = ["ROOT", "Proc", "WebProc", "free_port", "spawn", "start_web", "start_worker"]


def start_worker(
    env: dict[str, str], logdir: Path, name: str = "worker", concurrency: int = 100
) -> Proc:
    argv = [
        str(BIN / "celery"), "-A", "worker.celery_app", "worker",
        "--pool", "gevent", "--concurrency", str(concurrency), "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", f"{name}-{os.getpid()}@%h",
    ]  # fmt: skip
    proc = spawn(name, argv, env, logdir)
    wait_for(lambda: " ready." in proc.output(), proc, "celery worker")
    return proc


def start_web(
    env: dict[str, str],
    logdir: Path,
    name: str = "web",
    workers: int = 1,
    app: str = "app:create_app()",
) -> WebProc:
    port = free_port()
    env = {**env, "PORT": str(port), "HOST": "127.0.0.1", "WEB_CONCURRENCY": str(workers)}
    argv = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", app]
    proc = spawn(name, argv, env, logdir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/api/auth/me", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, proc, "gunicorn")
    return WebProc(proc.name, proc.popen, proc.log, url=url)


@dataclass
class WebProc(Proc):
    url: str = ""
    worker_pids: list[int] = field(default_factory=list)

    def gunicorn_workers(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.popen.pid).children()]
