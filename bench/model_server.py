"""A loopback OpenAI-compatible model server for the benchmark (aiohttp, one process).

``POST /v1/chat/completions`` with ``stream: true`` answers in the exact chat-completions
chunk format (``data: {chat.completion.chunk}`` ... ``data: [DONE]``). The model name is
the script:

- ``bench-n<N>-r<R>-t<T>[-<tag>]``: wait T ms (the model's own time to first token), then
  N tokens at R tokens/s. Each token's text is ``"<time.time_ns()> "``: the moment it was
  written, so a client downstream of any relay can tell how long the token took to reach it;
- ``bench-n<N>-r<R>-t<T>-say-<word>``: the same timing, but a known text: token ``i`` is
  ``"<word>.<i> "`` (``script_text`` gives the whole answer), for runs that check every
  client received exactly what the model said (``python -m bench soak``);
- ``bench-idle[-<tag>]``: a silent answer that only sends SSE comments (which the SDK
  skips) so no read timeout fires, until ``POST /bench/release``, or the hold limit.

One scheduler task writes every due token of every stream, instead of one timer wake-up
per token per stream: thousands of streams at 50 tokens/s stay cheap.

Control endpoints: ``GET /bench/stats`` (streams running now, peak, tokens, per tag),
``POST /bench/reset`` (zero the peaks and counters), ``POST /bench/release`` (end every
idle stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from bench.limits import raise_nofile

_SCRIPTED = re.compile(r"^bench-n(\d+)-r(\d+(?:\.\d+)?)-t(\d+)(?:-(.+))?$")
_IDLE = re.compile(r"^bench-idle(?:-(.+))?$")
_SAY = re.compile(r"^say-([A-Za-z0-9_]+)$")
IDLE_COMMENT_EVERY = 10.0  # seconds; well under any client's read timeout
IDLE_HOLD_LIMIT = 1800.0  # an idle stream never outlives a run, whatever happens
# A consumer this far behind gets no new token until it catches up (as TCP would do).
BACKLOG_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class Spec:
    tag: str
    tokens: int = 0
    rate: float = 0.0
    ttft: float = 0.0
    idle: bool = False
    say: str = ""  # the word of a known-text script ("" for time stamps)


def parse_model(name: str) -> Spec | None:
    if m := _SCRIPTED.match(name):
        tokens, rate, ttft_ms, tag = m.groups()
        say = _SAY.match(tag or "")
        return Spec(
            tag or "", int(tokens), float(rate), int(ttft_ms) / 1000, say=say[1] if say else ""
        )
    if m := _IDLE.match(name):
        return Spec(m.group(1) or "", idle=True)
    return None


def script_text(model: str) -> str:
    """The whole answer of a ``...-say-<word>`` script."""
    spec = parse_model(model)
    if spec is None or not spec.say:
        raise ValueError(f"{model!r} is not a known-text script")
    return "".join(f"{spec.say}.{i} " for i in range(spec.tokens))


class ChunkFormat:
    """chat.completion.chunk SSE events for one stream (also the test double's, in
    tests/model_server.py); token chunks are pre-encoded: only the stamp varies."""

    def __init__(self, model: str, chunk_id: str) -> None:
        self.head = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        token = self.encode({"content": "\x00"})
        self.token_prefix, self.token_suffix = token.split(b"\\u0000")

    def encode(self, delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.event({**self.head, "choices": [choice]})

    def token(self, stamp_ns: int) -> bytes:
        return b"%s%d %s" % (self.token_prefix, stamp_ns, self.token_suffix)

    def word(self, word: bytes, index: int) -> bytes:
        """Token ``index`` of a known-text script (``word`` is JSON-safe: [A-Za-z0-9_])."""
        return b"%s%s.%d %s" % (self.token_prefix, word, index, self.token_suffix)

    def usage(self, completion_tokens: int) -> bytes:
        return self.usage_chunk(
            {
                "prompt_tokens": 10,
                "completion_tokens": completion_tokens,
                "total_tokens": 10 + completion_tokens,
            }
        )

    def usage_chunk(self, usage: dict) -> bytes:
        """The final chunk ``stream_options.include_usage`` asks for: no choices."""
        return self.event({**self.head, "choices": [], "usage": usage})

    @staticmethod
    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(eq=False)
class Stream:
    resp: web.StreamResponse
    transport: asyncio.Transport
    fmt: ChunkFormat
    left: int
    interval: float
    say: bytes = b""  # a known-text script's word (else: time stamps)
    sent: int = 0
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()


class Scheduler:
    """Writes each stream's next token when it is due; one task for all streams."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._heap: list[tuple[float, int, Stream]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()

    def add(self, stream: Stream, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), stream))
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            if not self._heap:
                await self._wake.wait()
                continue
            delay = self._heap[0][0] - time.monotonic()
            if delay > 0:
                # A new stream (due now) wakes this early: no first token waits a tick.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            await self._write_due(time.monotonic())

    async def _write_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            due, _, stream = heapq.heappop(self._heap)
            if stream.gone():
                _settle(stream.done, "hung up")
                continue
            if stream.transport.get_write_buffer_size() < BACKLOG_LIMIT:
                if stream.say:
                    chunk = stream.fmt.word(stream.say, stream.sent)
                else:
                    chunk = stream.fmt.token(time.time_ns())
                try:
                    await stream.resp.write(chunk)
                except (ConnectionError, RuntimeError):
                    _settle(stream.done, "hung up")
                    continue
                stream.left -= 1
                stream.sent += 1
                self.stats.tokens[stream.fmt.head["model"]] += 1
            if stream.left <= 0:
                _settle(stream.done, None)
            else:
                # A fixed schedule keeps the rate exact, but a late server never bursts.
                self.add(stream, max(due + stream.interval, now))


def _settle(future: asyncio.Future, error: str | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(ConnectionResetError(error))


@dataclass
class Stats:
    active: Counter = field(default_factory=Counter)
    peak: Counter = field(default_factory=Counter)
    started: Counter = field(default_factory=Counter)
    completed: Counter = field(default_factory=Counter)
    hung_up: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)  # by model name, tallied per tag on read

    def enter(self, tag: str) -> None:
        self.active[tag] += 1
        self.started[tag] += 1
        self.peak[tag] = max(self.peak[tag], self.active[tag])

    def leave(self, tag: str, completed: bool) -> None:
        self.active[tag] -= 1
        (self.completed if completed else self.hung_up)[tag] += 1

    def reset(self) -> None:
        for counter in (self.peak, self.started, self.completed, self.hung_up, self.tokens):
            counter.clear()
        self.peak.update(self.active)

    def snapshot(self) -> dict:
        tokens: Counter = Counter()
        for model, n in self.tokens.items():
            spec = parse_model(model)
            tokens[spec.tag if spec else ""] += n
        names = ("active", "peak", "started", "completed", "hung_up")
        out = {name: dict(getattr(self, name)) for name in names}
        out["tokens"] = dict(tokens)
        return out


class ModelServer:
    def __init__(self) -> None:
        self.stats = Stats()
        self.scheduler = Scheduler(self.stats)
        self.release = asyncio.Event()
        self._ids = itertools.count()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/bench/stats", self.get_stats)
        app.router.add_post("/bench/reset", self.reset)
        app.router.add_post("/bench/release", self.release_idle)
        app.on_startup.append(self._start_scheduler)
        return app

    async def _start_scheduler(self, app: web.Application) -> None:
        app["scheduler"] = asyncio.create_task(self.scheduler.run())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", ""))
        spec = parse_model(model)
        if spec is None or body.get("stream") is not True:
            error = {"message": f"unknown model {model!r} (or stream is not true)", "type": "x"}
            return web.json_response({"error": error}, status=404)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        request.transport.set_write_buffer_limits(high=4 * BACKLOG_LIMIT)
        fmt = ChunkFormat(model, f"chatcmpl-bench{next(self._ids):012d}")
        self.stats.enter(spec.tag)
        completed = False
        try:
            if spec.idle:
                await self._idle(resp)
                produced = 0
            else:
                await asyncio.sleep(spec.ttft)
                await resp.write(fmt.encode({"role": "assistant", "content": ""}))
                await self._tokens(resp, request.transport, fmt, spec)
                produced = spec.tokens
            await resp.write(fmt.encode({}, "stop"))
            await resp.write(fmt.usage(produced))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            completed = True
        except (ConnectionError, RuntimeError):
            pass  # the client hung up
        finally:
            self.stats.leave(spec.tag, completed)
        return resp

    async def _tokens(
        self, resp: web.StreamResponse, transport: asyncio.Transport, fmt: ChunkFormat, spec: Spec
    ) -> None:
        if spec.tokens <= 0:
            return
        stream = Stream(resp, transport, fmt, spec.tokens, 1 / spec.rate, spec.say.encode())
        self.scheduler.add(stream, time.monotonic())
        await stream.done

    async def _idle(self, resp: web.StreamResponse) -> None:
        deadline = time.monotonic() + IDLE_HOLD_LIMIT
        while not self.release.is_set() and time.monotonic() < deadline:
            await resp.write(b": idle\n\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), IDLE_COMMENT_EVERY)

    async def models(self, _request: web.Request) -> web.Response:
        data = [{"id": "bench-n100-r50-t0", "object": "model", "owned_by": "bench"}]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def reset(self, _request: web.Request) -> web.Response:
        self.stats.reset()
        self.release.clear()
        return web.json_response(self.stats.snapshot())

    async def release_idle(self, _request: web.Request) -> web.Response:
        self.release.set()
        return web.json_response({"released": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(
        ModelServer().app(),
        host=args.host,
        port=args.port,
        backlog=4096,
        access_log=None,
        print=lambda *_: print("model server ready", flush=True),
        handler_cancellation=False,
    )


if __name__ == "__main__":
    main()
