"""The benchmark's server processes: model server, Tidechat worker and web, direct proxy.

Shared with ``tests/stack.py`` (``spawn``, ``Proc``, ``wait_for``): each process gets
its own session (so ``stop`` reaches its children), dies with its parent
(PR_SET_PDEATHSIG), and runs with its open-file soft limit raised to the hard limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.limits import raise_nofile

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A started server process, its log, and (once known) the pid doing the work."""

    name: str
    popen: subprocess.Popen
    log: Path
    url: str = ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout``."""
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

    def work_pid(self) -> int:
        """The pid serving requests: gunicorn's (first) worker, else the process itself."""
        return self.work_pids()[0]

    def work_pids(self) -> list[int]:
        """Every pid serving requests: gunicorn's workers, else the process itself."""
        children = psutil.Process(self.popen.pid).children()
        return [c.pid for c in children] or [self.popen.pid]


@contextlib.contextmanager
def worktree(rev: str, copy: tuple[str, ...] = ()) -> Iterator[Path]:
    """A temporary checkout of ``rev`` (a ``git worktree``) with this checkout's files
    ``copy`` written over its own, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="tcbench-tree-")) / "tree"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    try:
        for name in copy:
            (path / name).write_bytes((ROOT / name).read_bytes())
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path.parent, ignore_errors=True)


def _child_setup() -> None:
    raise_nofile()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Proc:
    """Start ``argv`` in its own session with output in ``logdir/<name>.log``, on this
    checkout's code: first on ``PYTHONPATH``, before the checkout the venv has installed
    (a Celery worker started from a second worktree ran the installed one's)."""
    log = logdir / f"{name}.log"
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
    with log.open("ab") as handle:
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup,
        )
    return Proc(name, popen, log)


def wait_for(check: Callable[[], bool], proc: Proc, what: str, timeout: float = 90) -> None:
    """Poll ``check`` until true; fail early with the log if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{proc.output()[-4000:]}")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {timeout}s:\n{proc.output()[-4000:]}")


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    return check


def start_model_server(env: dict[str, str], logdir: Path) -> Proc:
    """The loopback OpenAI-compatible model server (``bench/model_server.py``)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.model_server", "--port", str(port)]
    proc = spawn("model", argv, env, logdir)
    proc.url = f"http://127.0.0.1:{port}"
    wait_for(_http_ok(proc.url + "/bench/stats"), proc, "model server")
    return proc


def start_worker(
    env: dict[str, str],
    logdir: Path,
    concurrency: int,
    name: str = "worker",
    app: str = "bench.worker_app",
) -> Proc:
    """One Celery worker process with the gevent pool (``name``: its log's and host's;
    ``app``: a module that prints ``bench.worker_app``'s ready line, as that one does)."""
    from bench.worker_app import READY_LINE  # not at import: tests/stack.py imports this

    argv = [
        str(BIN / "celery"), "-A", app, "worker",
        "--pool", "gevent", "--concurrency", str(concurrency), "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", f"bench-{os.getpid()}-{name}@%h",
    ]  # fmt: skip
    proc = spawn(name, argv, env, logdir)
    wait_for(lambda: READY_LINE in proc.output(), proc, "celery worker")
    return proc


def start_bare_worker(env: dict[str, str], logdir: Path) -> Proc:
    """The bare relay's worker process (``bench/bare_relay.py``)."""
    from bench.bare_relay import READY_LINE

    proc = spawn("bare_worker", [sys.executable, "-m", "bench.bare_relay"], env, logdir)
    wait_for(lambda: READY_LINE in proc.output(), proc, "bare relay worker")
    return proc


def start_gunicorn(
    name: str, app: str, env: dict[str, str], logdir: Path, probe: str, workers: int = 1
) -> Proc:
    """gunicorn serving ``app`` with ``workers`` gevent worker processes (Tidechat's
    gunicorn.conf.py), on one port."""
    port = free_port()
    env = {**env, "PORT": str(port), "HOST": "127.0.0.1", "WEB_CONCURRENCY": str(workers)}
    argv = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "--backlog", "4096", app]
    proc = spawn(name, argv, env, logdir)
    proc.url = f"http://127.0.0.1:{port}"
    wait_for(_http_ok(proc.url + probe), proc, name)
    return proc
