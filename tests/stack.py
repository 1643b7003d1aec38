"""Real processes for end-to-end tests: a Celery worker and a gunicorn+gevent web server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM the child if pytest itself dies (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def spawn(name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Proc:
    log = logdir / f"{name}.log"
    handle = log.open("ab")
    popen = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() reaches every child
        preexec_fn=_die_with_parent,
    )
    handle.close()
    return Proc(name, popen, log)


def start_worker(env: dict[str, str], logdir: Path, name: str = "worker") -> Proc:
    argv = [
        str(BIN / "celery"), "-A", "worker.celery_app", "worker",
        "--pool", "gevent", "--concurrency", "100", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", f"{name}-{os.getpid()}@%h",
    ]  # fmt: skip
    proc = spawn(name, argv, env, logdir)
    _wait_for(lambda: " ready." in proc.output(), proc, "celery worker")
    return proc


def start_web(env: dict[str, str], logdir: Path, name: str = "web", workers: int = 1) -> WebProc:
    port = free_port()
    env = {**env, "PORT": str(port), "HOST": "127.0.0.1", "WEB_CONCURRENCY": str(workers)}
    argv = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"]
    proc = spawn(name, argv, env, logdir)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/api/conversations", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(up, proc, "gunicorn")
    return WebProc(proc.name, proc.popen, proc.log, url=url)


@dataclass
class WebProc(Proc):
    url: str = ""
    worker_pids: list[int] = field(default_factory=list)

    def gunicorn_workers(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.popen.pid).children()]


def _wait_for(check, proc: Proc, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{proc.output()[-4000:]}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {timeout}s:\n{proc.output()[-4000:]}")
