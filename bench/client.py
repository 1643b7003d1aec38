"""The load generator: a separate asyncio + aiohttp process reading SSE streams.

Two modes (the harness runs one or more of these processes per level):

- ``streams``: N concurrent chats, each one user (its own cookie). For Tidechat
  (``tidechat``, the page's path): create a conversation (before the clock starts), then
  POST a message and read the generation's SSE stream; for ``v1`` (the OpenAI-compatible
  door): make an API key (before the clock starts), then ``POST /v1/responses`` with
  ``stream`` and ``background`` and read the Responses events it answers with; for the
  proxy and the bare relay: POST ``/stream`` and read it. For every token the model stamped
  (its text is the ``time.time_ns()`` it was written at) the client records receive time
  minus stamp.
  Writes a JSON result to ``--out``.
- ``idle``: opens SSE connections to silent generations (``bench-idle``) up to each level,
  printing a JSON line per level and waiting for a line on stdin before going on, so the
  harness can measure the server while they are held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.limits import raise_nofile

OPEN_CONCURRENCY = 200  # connections being set up at once


@dataclass(frozen=True)
class Wire:
    """How a target's SSE events name a text delta and the end of an answer."""

    delta: bytes  # the event of a text delta
    text: str  # the delta's field holding the text
    done: tuple[bytes, ...]  # events that end the answer well
    error: tuple[bytes, ...]  # events that end it otherwise


# The page's events (and the proxy's, which speaks the same): ``event: delta`` /
# ``data: {"text": ...}`` with the entry id as ``id:``, ending ``done`` or ``error``.
PAGE_WIRE = Wire(b"delta", "text", (b"done",), (b"error",))
# /v1/responses: ``response.output_text.delta`` / ``{"delta": ...}``, no ``id:`` (a client
# resumes by ``sequence_number``), ending ``response.completed``.
V1_WIRE = Wire(
    b"response.output_text.delta", "delta", (b"response.completed",),
    (b"response.failed", b"response.incomplete", b"error"),
)  # fmt: skip


@dataclass
class Tally:
    """What one client process saw, across all its streams."""

    overhead_us: array = field(default_factory=lambda: array("q"))
    # Tidechat only, split at Redis: an event id is the XADD's Redis time (ms resolution).
    ingest_us: array = field(default_factory=lambda: array("q"))  # model stamp -> XADD
    fanout_us: array = field(default_factory=lambda: array("q"))  # XADD -> client
    ttft_us: list[int] = field(default_factory=list)
    # TTFT split: POST -> the model server starts the answer (its first token's stamp less
    # its own time to first token), and (Tidechat's page) the POST's own round trip
    model_start_us: list[int] = field(default_factory=list)
    post_us: list[int] = field(default_factory=list)
    tokens: int = 0
    events: int = 0
    completed: int = 0
    errors: list[str] = field(default_factory=list)
    first_post_ns: int = 0
    last_event_ns: int = 0


@dataclass
class User:
    """One chat participant: a cookie and (for Tidechat) a conversation."""

    cookie: dict[str, str]
    cid: str = ""
    events_url: str = ""


def make_session(url: str) -> aiohttp.ClientSession:
    """One pooled session; identities are sent as explicit cookies, not a shared jar."""
    return aiohttp.ClientSession(
        base_url=url,
        # Idle pooled connections close before the server's keep-alive (gunicorn.conf.py:
        # 5 s) would: a request sent on one the server is closing fails with "Server
        # disconnected" (48 of 1000 POSTs at the capacity level with 60 s here).
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=120, sock_read=300),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def limited(coros: list, limit: int = OPEN_CONCURRENCY) -> list:
    """Run ``coros`` with at most ``limit`` at a time; exceptions are returned."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def new_user(http: aiohttp.ClientSession) -> User:
    """A Tidechat identity (the session cookie) with one conversation."""
    async with http.post("/api/conversations") as resp:
        if resp.status != 201:
            raise RuntimeError(f"create conversation: HTTP {resp.status}")
        cid = (await resp.json())["id"]
        cookie = {"session": resp.cookies["session"].value}
    return User(cookie, cid)


async def post_message(http: aiohttp.ClientSession, user: User, model: str) -> str:
    """Start an answer; return its SSE URL."""
    body = {"content": "Hi", "model": model}
    async with http.post(
        f"/api/conversations/{user.cid}/messages", json=body, cookies=user.cookie
    ) as resp:
        if resp.status != 202:
            raise RuntimeError(f"post message: HTTP {resp.status} {await resp.text()}")
        return (await resp.json())["generation"]["events_url"]


async def new_key(http: aiohttp.ClientSession) -> str:
    """A /v1 identity: an API key of a new guest owner (``POST /api/keys``; the guest's
    cookie is not needed afterwards, the key alone authenticates)."""
    async with http.post("/api/keys", json={"name": "bench"}) as resp:
        if resp.status != 201:
            raise RuntimeError(f"create key: HTTP {resp.status} {await resp.text()}")
        return (await resp.json())["key"]


async def read_sse(
    resp: aiohttp.ClientResponse, started_ns: int, tally: Tally, wire: Wire = PAGE_WIRE
) -> None:
    """Read an SSE body to its end, recording every stamped token's delay."""
    if resp.status != 200:
        raise RuntimeError(f"events: HTTP {resp.status} {(await resp.text())[:200]}")
    event, data, eid, first = b"", b"", b"", True
    async for raw in resp.content:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data: "):
            data = line[6:]
        elif line.startswith(b"event: "):
            event = line[7:]
        elif line.startswith(b"id: "):
            eid = line[4:]
        elif not line and data:
            now = time.time_ns()
            tally.last_event_ns = max(tally.last_event_ns, now)
            if event == wire.delta:
                text = orjson.loads(data)[wire.text]
                if first:
                    tally.ttft_us.append((now - started_ns) // 1000)
                    first = False
                    stamps = text.split()
                    if stamps:
                        tally.model_start_us.append((int(stamps[0]) - started_ns) // 1000)
                record_tokens(text, now, tally)
                if eid:
                    record_split(text, eid, now, tally)
            elif event in wire.done:
                tally.completed += 1
                return
            elif event in wire.error:
                tally.errors.append(f"{event.decode()}: {data.decode()[:200]}")
                return
            event, data, eid = b"", b"", b""
    tally.errors.append("stream ended without done")


def record_tokens(text: str, now_ns: int, tally: Tally) -> None:
    tally.events += 1
    for stamp in text.split():
        tally.overhead_us.append((now_ns - int(stamp)) // 1000)
        tally.tokens += 1


def record_split(text: str, eid: bytes, now_ns: int, tally: Tally) -> None:
    """Split each token's delay at the XADD (its entry id's millisecond, taken mid-ms)."""
    xadd_us = int(eid.split(b"-", 1)[0]) * 1000 + 500
    tally.fanout_us.append(now_ns // 1000 - xadd_us)
    for stamp in text.split():
        tally.ingest_us.append(xadd_us - int(stamp) // 1000)


async def tidechat_stream(http: aiohttp.ClientSession, user: User, model: str, t: Tally) -> None:
    started = time.time_ns()
    t.first_post_ns = min(t.first_post_ns or started, started)
    url = await post_message(http, user, model)
    t.post_us.append((time.time_ns() - started) // 1000)
    async with http.get(url, cookies=user.cookie) as resp:
        await read_sse(resp, started, t)


async def v1_stream(http: aiohttp.ClientSession, key: str, model: str, t: Tally) -> None:
    """One background Responses stream: the answer's events in the POST's own response."""
    started = time.time_ns()
    t.first_post_ns = min(t.first_post_ns or started, started)
    body = {"model": model, "input": "Hi", "stream": True, "background": True}
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post("/v1/responses", json=body, headers=headers) as resp:
        await read_sse(resp, started, t, V1_WIRE)


async def proxy_stream(http: aiohttp.ClientSession, model: str, t: Tally) -> None:
    started = time.time_ns()
    t.first_post_ns = min(t.first_post_ns or started, started)
    async with http.post("/stream", json={"model": model}) as resp:
        await read_sse(resp, started, t)


async def run_streams(target: str, url: str, streams: int, model: str) -> dict:
    """Run ``streams`` chats at once against ``target``; the tally as a JSON-able dict."""
    tally = Tally()
    async with make_session(url) as http:
        if target == "tidechat":
            users = await limited([new_user(http) for _ in range(streams)])
            failed = [u for u in users if isinstance(u, BaseException)]
            tally.errors += [f"setup: {e!r}" for e in failed]
            users = [u for u in users if isinstance(u, User)]
            coros = [tidechat_stream(http, u, model, tally) for u in users]
        elif target == "v1":
            keys = await limited([new_key(http) for _ in range(streams)])
            tally.errors += [f"setup: {e!r}" for e in keys if isinstance(e, BaseException)]
            coros = [v1_stream(http, k, model, tally) for k in keys if isinstance(k, str)]
        else:
            coros = [proxy_stream(http, model, tally) for _ in range(streams)]
        outcomes = await asyncio.gather(*coros, return_exceptions=True)
    tally.errors += [repr(o) for o in outcomes if isinstance(o, BaseException)]
    return {
        "streams": streams,
        "completed": tally.completed,
        "tokens": tally.tokens,
        "events": tally.events,
        "errors": tally.errors[:20],
        "error_count": len(tally.errors),
        "first_post_ns": tally.first_post_ns,
        "last_event_ns": tally.last_event_ns,
        "ttft_us": tally.ttft_us,
        "model_start_us": tally.model_start_us,
        "post_us": tally.post_us,
        "overhead_us": tally.overhead_us.tolist(),
        "ingest_us": tally.ingest_us.tolist(),
        "fanout_us": tally.fanout_us.tolist(),
    }


# -- idle mode ---------------------------------------------------------------------------
@dataclass
class IdleConn:
    """One held SSE connection; ``opened`` is set once its headers and retry hint arrived."""

    gate: asyncio.Semaphore
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    ok: bool = False
    ended: bool = False
    task: asyncio.Task | None = None

    def mark_opened(self) -> None:
        if not self.opened.is_set():
            self.opened.set()
            self.gate.release()


async def hold(http: aiohttp.ClientSession, target: str, user: User | None, c: IdleConn) -> None:
    try:
        if target == "tidechat":
            ctx = http.get(user.events_url, cookies=user.cookie)
        else:
            ctx = http.post("/stream", json={"model": "bench-idle"})
        async with ctx as resp:
            c.ok = resp.status == 200
            if c.ok:
                await resp.content.readline()  # the retry hint: the stream is live
            c.mark_opened()
            async for raw in resp.content:
                if raw.startswith((b"event: done", b"event: error")):
                    c.ended = True
    except (TimeoutError, aiohttp.ClientError, OSError):
        c.ok = False
    finally:
        c.mark_opened()


async def idle_users(http: aiohttp.ClientSession, target: str, generations: int) -> list:
    """Tidechat: ``generations`` users, each with one silent answer running."""
    if target != "tidechat":
        return [None]
    users = await limited([new_user(http) for _ in range(generations)])
    users = [u for u in users if isinstance(u, User)]
    urls = await limited([post_message(http, u, "bench-idle") for u in users])
    for user, url in zip(users, urls, strict=True):
        user.events_url = url if isinstance(url, str) else ""
    return [u for u in users if u.events_url]


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def wait_line() -> str:
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


async def open_more(
    http: aiohttp.ClientSession, target: str, users: list, conns: list[IdleConn], upto: int
) -> None:
    """Open connections until ``upto`` are held, ``OPEN_CONCURRENCY`` handshakes at a time."""
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    new: list[IdleConn] = []
    for i in range(len(conns), upto):
        await gate.acquire()
        c = IdleConn(gate)
        c.task = asyncio.create_task(hold(http, target, users[i % len(users)], c))
        new.append(c)
    await asyncio.gather(*(c.opened.wait() for c in new))
    conns.extend(new)


async def run_idle(target: str, url: str, levels: list[int], generations: int) -> None:
    """Open idle SSE clients level by level; the harness measures between levels."""
    async with make_session(url) as http:
        users = await idle_users(http, target, generations)
        say(phase="ready", generations=len(users))
        await wait_line()
        conns: list[IdleConn] = []
        for level in levels:
            t0 = time.monotonic()
            await open_more(http, target, users, conns, level)
            live = sum(1 for c in conns if c.ok and not c.task.done())
            say(phase="level", clients=level, live=live, open_s=round(time.monotonic() - t0, 2))
            await wait_line()
        say(phase="holding")
        await wait_line()  # the harness released the silent answers
        tasks = [c.task for c in conns if c.task]
        _done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        say(phase="done", ended=sum(1 for c in conns if c.ended), still_open=len(pending))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchmark load generator")
    parser.add_argument("mode", choices=["streams", "idle"])
    parser.add_argument("--target", choices=["tidechat", "v1", "proxy", "bare"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--model", default="bench-n100-r50-t50")
    parser.add_argument("--levels", default="100")
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    raise_nofile()
    if args.mode == "streams":
        result = asyncio.run(run_streams(args.target, args.url, args.streams, args.model))
        with open(args.out, "wb") as f:
            f.write(orjson.dumps(result))
    else:
        levels = [int(x) for x in args.levels.split(",")]
        asyncio.run(run_idle(args.target, args.url, levels, args.generations))


if __name__ == "__main__":
    main()
