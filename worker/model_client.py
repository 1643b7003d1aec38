"""The model client: an OpenAI-compatible chat-completions stream, as plain events.

Any server that speaks the OpenAI API works (``OPENAI_BASE_URL``). Upstream failures
become ``UpstreamError`` with a stable code the page can show and tests can assert.
"""

from __future__ import annotations

import contextlib
import logging
import select
import ssl
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import httpx2
import openai

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str


@dataclass(frozen=True, slots=True)
class Usage:
    usage: dict[str, Any]


ModelEvent = TextDelta | Finish | Usage


class UpstreamError(Exception):
    def __init__(self, code: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.message = code, message
        # The model server's own words: for the operator's log only. Users get a fixed
        # message per code (a gateway's error body may hold internal detail).
        self.detail = detail

    def payload(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def make_client(config: dict[str, Any], verify: ssl.SSLContext | None = None) -> openai.OpenAI:
    """The SDK client for the configured model server (``verify``: a TLS context to share
    between clients, see :class:`ClientShards`)."""
    return openai.OpenAI(
        api_key=config["OPENAI_API_KEY"] or "not-needed",  # local servers accept any key
        base_url=config["OPENAI_BASE_URL"] or None,
        timeout=float(config["OPENAI_TIMEOUT"]),
        max_retries=int(config["OPENAI_MAX_RETRIES"]),
        http_client=openai.DefaultHttpxClient(
            verify=True if verify is None else verify,
            limits=connection_limits(float(config["OPENAI_KEEPALIVE"])),
        ),
    )


def connection_limits(keepalive: float, connections: int = 1000, kept: int = 100) -> httpx2.Limits:
    """The SDK's own pool limits (``connections`` at most, ``kept`` of them idle), with idle
    connections kept ``keepalive`` seconds."""
    return httpx2.Limits(
        max_connections=connections, max_keepalive_connections=kept, keepalive_expiry=keepalive
    )


POOLS = 16  # connection pools per process (ClientShards)


def check_idle_connections_in_place() -> None:
    """Let the HTTP pool check its idle connections without leaving the greenlet.

    Each time a request starts, the pool asks every idle connection it holds whether the
    server closed it, by ``select.poll`` with a timeout of 0. Under gevent's patched
    ``select`` that poll is a trip through the hub, once per idle connection: with
    connections kept between answers, a burst of answers spent its starts queued behind
    everything else ready to run. The check never blocks, so the original poll serves."""
    from gevent import monkey

    if monkey.is_module_patched("select"):
        import httpcore2._utils as pool_utils  # (the connection pool under this SDK's httpx2)

        pool_utils.select = types.SimpleNamespace(
            poll=monkey.get_original("select", "poll"),
            select=monkey.get_original("select", "select"),
            POLLIN=select.POLLIN,
        )


class ClientShards:
    """Several SDK clients, each with its own connection pool; each stream borrows the
    least busy (the first of them on a tie).

    The SDK's HTTP pool scans every connection it holds each time a request starts and
    each time a response closes, so one pool carrying 1000 streams pays 1000 steps twice
    per answer: 6.7 % of a worker's CPU at 1000 concurrent answers (py-spy), the largest
    single cost of opening a model stream. Sixteen pools keep each scan a sixteenth as
    long; any client serves any request. Taking the least busy, not each in turn, keeps a
    quiet process on its first pools, whose idle connections then serve the next answers
    (in turn, sixteen pools each saw an answer too seldom to keep one open). They share one
    TLS context: loading the CA bundle is most of a client's cost (30 ms of CPU each).
    """

    def __init__(
        self, make: Callable[[ssl.SSLContext], openai.OpenAI], pools: int = POOLS
    ) -> None:
        check_idle_connections_in_place()
        verify = httpx2.create_ssl_context()  # (the HTTP library of this openai SDK)
        self.clients = [make(verify) for _ in range(max(1, pools))]
        self.busy = [0] * len(self.clients)  # streams each client carries now

    @contextlib.contextmanager
    def lend(self) -> Iterator[openai.OpenAI]:
        """The least busy client, for the duration of one stream."""
        i = self.busy.index(min(self.busy))
        self.busy[i] += 1
        try:
            yield self.clients[i]
        finally:
            self.busy[i] -= 1


# How a partial answer is continued, where a backend can (a deploy handed the answer on):
# "completion": a raw completion over the chat-templated prompt plus the partial answer
#               (llama.cpp's server, and any server with /v1/completions and a ChatML model);
# "continue_final_message": vLLM's chat extension that continues the last assistant message;
# "none": the backend has no way; a handed-on answer ends "interrupted" (the page offers
#         Continue, which asks the model in plain words to go on).
CONTINUATIONS = ("completion", "continue_final_message", "none")
CONTINUE_PROMPT = (
    "Continue your previous answer exactly where it stopped, without repeating anything."
)


@dataclass(frozen=True, slots=True)
class Request:
    model: str
    messages: list[dict[str, str]]
    temperature: float | None = None
    max_tokens: int = 0
    prefix: str = ""  # the answer so far, to be continued
    continuation: str = "none"


# This SDK's (sync) stream closes its response on reading "[DONE]", before the chunked
# body's end has been read: the connection is then dropped instead of pooled, so every
# answer opened a new one (a TCP, and to a remote server a TLS, handshake; with gevent, a
# getaddrinfo in a thread too). Its async stream first reads what is left, for 0.1 s at
# most (openai-python#3440); this stream does the same.
DRAIN_SECONDS = 0.1


class PooledStream(openai.Stream[object]):
    """The SDK's stream, which leaves its connection to the pool at the end."""

    def _iter_events(self) -> Iterator[Any]:
        for sse in super()._iter_events():
            if sse.data.startswith("[DONE]"):
                drain(self.response)
            yield sse


def drain(response: httpx2.Response) -> None:
    """Read the rest of an HTTP/1.1 response (the end of its body), for ``DRAIN_SECONDS``
    at most: then its connection can serve another request. Never raises: the answer is
    complete, and a failure here costs only a pooled connection."""
    if response.is_closed or response.http_version != "HTTP/1.1":
        return  # (HTTP/2 can close one stream and keep its connection)
    timer = gevent.Timeout(DRAIN_SECONDS)
    try:
        with timer:
            for _ in response.stream:  # type: ignore[union-attr]
                pass
    except gevent.Timeout as exc:
        if exc is not timer:  # someone else's (a task's time limit): not ours to stop
            raise
    except Exception:  # noqa: BLE001
        log.debug("the model response's end could not be read", exc_info=True)


def open_stream(
    client: openai.OpenAI, req: Request, backend: str = ""
) -> openai.Stream[object]:
    """Start a streamed completion; use it as a context manager so it is always closed.

    The request is ``chat.completions.create(stream=True)``'s, sent through the SDK's own
    ``post`` (same retries, auth, timeouts and errors, an ``{"error": ...}`` event still
    raises), but each chunk arrives as the parsed JSON instead of a ``ChatCompletionChunk``:
    building that model costs about 100 µs per chunk, 13 times the rest of the read, and
    capped how many streams one worker process could carry (docs/benchmarks.md).
    """
    path, body = request_body(req)
    try:
        return client.post(
            path, body=body, cast_to=object, stream=True, stream_cls=PooledStream
        )
    except Exception as exc:
        raise classify(exc, backend=backend) from exc


def request_body(req: Request) -> tuple[str, dict[str, Any]]:
    """The endpoint and JSON body for a request, continuing ``req.prefix`` if there is one."""
    body: dict[str, Any] = {"model": req.model, "stream": True}
    messages = req.messages
    if req.prefix and req.continuation == "completion":
        body["prompt"] = chatml(messages) + req.prefix
        body["stop"] = [CHATML_END]
        path = "/completions"
    else:
        path = "/chat/completions"
        body["stream_options"] = {"include_usage": True}
        if req.prefix:
            messages = [*messages, {"role": "assistant", "content": req.prefix}]
            if req.continuation == "continue_final_message":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            else:
                messages.append({"role": "user", "content": CONTINUE_PROMPT})
        body["messages"] = messages
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.max_tokens:
        body["max_tokens"] = req.max_tokens
    return path, body


CHATML_END = "<|im_end|>"


def chatml(messages: list[dict[str, str]]) -> str:
    """The ChatML prompt (SmolLM2, Qwen, and many more) up to the assistant's turn."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def events(stream: Iterable[object]) -> Iterator[ModelEvent]:
    """Plain events from the stream's chunks; raises UpstreamError on any failure."""
    try:
        for chunk in stream:
            yield from _chunk_events(chunk)
    except UpstreamError:
        raise
    except Exception as exc:
        raise classify(exc, mid_stream=True) from exc


def _chunk_events(chunk: object) -> Iterator[ModelEvent]:
    """One ``chat.completion.chunk``'s events; what is not a chunk is skipped."""
    if not isinstance(chunk, dict):
        return
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        yield Usage({k: v for k, v in usage.items() if v is not None})
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        # a chat chunk's delta, or a raw completion chunk's text (a continuation)
        content = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if isinstance(content, str) and content:
            content = clean_text(content)
            if content:
                yield TextDelta(content)
        if choice.get("finish_reason"):
            yield Finish(str(choice["finish_reason"]))


def clean_text(text: str) -> str:
    """The model's text as it can be stored and sent anywhere: a lone surrogate (JSON
    allows ``"\\ud83c"``; UTF-8, orjson and PostgreSQL do not) becomes U+FFFD, and NUL,
    which PostgreSQL text refuses, is dropped. Clean text comes back as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text.replace("\x00", "") if "\x00" in text else text


def classify(exc: BaseException, mid_stream: bool = False, backend: str = "") -> UpstreamError:
    """Map SDK and transport exceptions to a code and a message fit for the user;
    ``backend`` names the model server where the user knows it (``llama.cpp (local)``)."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamError("upstream_timeout", "The model server did not answer in time.")
    if isinstance(exc, openai.APIConnectionError) and not mid_stream:
        server = f"The model server ({backend})" if backend else "The model server"
        return UpstreamError(
            "upstream_unreachable",
            f"{server} is down: could not connect to it. If it is restarting, try again "
            "in a moment.",
        )
    if isinstance(exc, openai.RateLimitError):
        return UpstreamError(
            "upstream_rate_limited", "The model server is rate limiting requests; try again soon."
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamError("upstream_auth", "The model server refused the API credentials.")
    if isinstance(exc, openai.NotFoundError):
        return UpstreamError("model_not_found", "The model server does not know this model.")
    if isinstance(exc, openai.APIStatusError):
        return UpstreamError(
            "upstream_error",
            f"The model server failed to answer (HTTP {exc.status_code}); try again in a moment.",
            f"HTTP {exc.status_code}: {_detail(exc)}",
        )
    if isinstance(exc, openai.APIError) and not isinstance(exc, openai.APIConnectionError):
        # an {"error": ...} event in the middle of the stream
        return UpstreamError(
            "upstream_error",
            "The model server failed in the middle of the answer; try again.",
            f"error event: {_detail(exc)}",
        )
    return UpstreamError(
        "upstream_disconnected",
        f"The connection to the model server broke mid-answer ({type(exc).__name__}).",
    )


def _detail(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:500]
    return str(exc.message)[:500]
