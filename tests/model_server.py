"""A scripted, loopback OpenAI-compatible server: the one test double Tidechat allows.

It speaks the chat-completions streaming wire format byte for byte (chunked HTTP/1.1,
``data: {...}`` events, ``data: [DONE]``). Each test registers a ``Script`` and gets a
unique model name; requests for that model play the script: chunks with delays, an HTTP
429/500, an ``{"error": ...}`` event mid-stream, a cut connection, or silence. The server
records every request and when the client hung up, so tests can see the upstream side.

It continues a partial answer the way real servers do, deterministically: a raw
``/v1/completions`` request whose prompt ends with a ChatML assistant turn holding a prefix
of the script's text (llama.cpp), or a chat request with ``continue_final_message``
(vLLM) or a trailing "continue" instruction, plays the rest of the script after the prefix.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bench.model_server import ChunkFormat

DEFAULT_USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@dataclass
class Script:
    chunks: list[str] = field(default_factory=lambda: ["Hello", ", ", "world", "!"])
    delay: float = 0.0  # seconds before each chunk after the first
    first_delay: float = 0.0  # seconds before the first chunk (time to first token)
    finish_reason: str | None = "stop"  # None: the stream ends without one
    usage: dict[str, int] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    status: int = 200  # non-200: answer with this HTTP error instead of a stream
    fail_first: int | None = None  # with status: only the first N requests fail
    error_event: dict[str, Any] | None = None  # sent as data: {"error": ...} after the chunks
    cut: bool = False  # after the chunks, drop the connection mid-body
    hang: float = 0.0  # after the chunks, stay silent this long before finishing
    keepalive: float = 0.0  # while hanging, send an SSE ": keep-alive" comment this often
    reuse: bool = False  # keep the connection open for the client's next request
    linger: float = 0.0  # after "data: [DONE]", this long before the body ends


@dataclass
class Record:
    body: dict[str, Any]
    started: float
    hung_up: float | None = None  # when the client closed the connection on us
    chunks_sent: int = 0
    client_port: int = 0  # the client's end of the connection it came on


class _Hangup(Exception):
    pass


class CompletionFormat(ChunkFormat):
    """``text_completion`` chunks: what /v1/completions streams."""

    def encode(self, delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
        return self.event({**self.head, "object": "text_completion", "choices": [choice]})


CHATML_ASSISTANT = "<|im_start|>assistant\n"


def partial_answer(body: dict[str, Any]) -> str:
    """The answer so far that a request asks to continue ("" for a new answer)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) and CHATML_ASSISTANT in prompt:
        return prompt.rsplit(CHATML_ASSISTANT, 1)[1]
    messages = body.get("messages") or []
    if body.get("continue_final_message") and messages[-1:][0].get("role") == "assistant":
        return messages[-1]["content"]
    asked = messages[-1:] and str(messages[-1].get("content")).startswith("Continue your")
    if asked and len(messages) >= 2 and messages[-2].get("role") == "assistant":
        return messages[-2]["content"]
    return ""


def rest_of(chunks: list[str], prefix: str) -> list[str]:
    """The chunks that follow ``prefix`` of their text (all of them if it is not one)."""
    if not prefix or not "".join(chunks).startswith(prefix):
        return chunks
    out, seen = [], 0
    for chunk in chunks:
        if seen + len(chunk) > len(prefix):
            out.append(chunk[max(0, len(prefix) - seen) :])
        seen += len(chunk)
    return out


class ModelServer:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.records: dict[str, list[Record]] = {}
        self._lock = threading.Lock()
        self._idle: set[socket.socket] = set()  # kept connections waiting for a request
        handler = type("Handler", (_Handler,), {"model_server": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ModelServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def script(self, script: Script | None = None, **kwargs: Any) -> str:
        """Register a script; returns the model name that plays it."""
        name = f"scripted-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.scripts[name] = script or Script(**kwargs)
            self.records[name] = []
        return name

    def close_idle(self) -> int:
        """Close every kept connection that waits for its next request, as a server's idle
        timeout does (uvicorn's and llama.cpp's: 5 s); how many there were."""
        with self._lock:
            idle, self._idle = list(self._idle), set()
        for conn in idle:
            conn.shutdown(socket.SHUT_RDWR)
        return len(idle)

    def requests_for(self, model: str) -> list[Record]:
        with self._lock:
            return list(self.records.get(model, []))

    def wait_for_hangup(self, model: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.requests_for(model)
            if records and records[-1].hung_up is not None:
                return records[-1].hung_up
            time.sleep(0.01)
        return None

    def wait_for_request(self, model: str, timeout: float, chunks: int = 0) -> Record:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.requests_for(model)
            if records and records[-1].chunks_sent >= chunks:
                return records[-1]
            time.sleep(0.01)
        raise TimeoutError(f"no request for {model} with {chunks} chunks sent")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    model_server: ModelServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def handle_one_request(self) -> None:
        with self.model_server._lock:  # idle until its request line has arrived
            self.model_server._idle.add(self.connection)
        try:
            super().handle_one_request()
        finally:
            self._busy()

    def parse_request(self) -> bool:
        self._busy()
        return super().parse_request()

    def _busy(self) -> None:
        with self.model_server._lock:
            self.model_server._idle.discard(self.connection)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            names = list(self.model_server.scripts)
            data = [{"id": n, "object": "model", "owned_by": "tests"} for n in names]
            self._json(200, {"object": "list", "data": data})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        server = self.model_server
        model = body.get("model", "")
        with server._lock:
            script = server.scripts.get(model)
            record = Record(body=body, started=time.monotonic(), client_port=self.client_address[1])
            server.records.setdefault(model, []).append(record)
            attempt = len(server.records[model])
        if script is None:
            self._json(404, {"error": {"message": f"model {model!r} not found", "type": "x"}})
            return
        failing = script.status != 200 and (
            script.fail_first is None or attempt <= script.fail_first
        )
        if failing:
            message = {429: "Rate limit reached", 500: "The server had an error"}.get(
                script.status, "error"
            )
            headers = {"retry-after-ms": "10"} if script.status == 429 else {}
            self._json(script.status, {"error": {"message": message, "type": "x"}}, headers)
            return
        try:
            self._stream(script, record, model, self.path.rstrip("/") == "/v1/completions")
        except (_Hangup, BrokenPipeError, ConnectionResetError):
            record.hung_up = record.hung_up or time.monotonic()
            self.close_connection = True
            return
        self.close_connection = not script.reuse

    # -- streaming ------------------------------------------------------------------
    def _stream(self, script: Script, record: Record, model: str, raw: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        if not script.reuse:
            self.send_header("Connection", "close")
        self.end_headers()
        fmt = (CompletionFormat if raw else ChunkFormat)(model, f"cmpl-{uuid.uuid4().hex[:20]}")
        self._wait(script.first_delay, record)
        self._send_raw(fmt.encode({"role": "assistant", "content": ""}))
        for i, text in enumerate(rest_of(script.chunks, partial_answer(record.body))):
            if i:
                self._wait(script.delay, record)
            self._send_raw(fmt.encode({"content": text}))
            record.chunks_sent += 1
        self._hang(script, record)
        if script.error_event is not None:
            self._send_raw(fmt.event({"error": script.error_event}))
            self._end_body()
            return
        if script.cut:
            # Drop the connection without the chunked terminator: a broken body.
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if script.finish_reason is not None:
            self._send_raw(fmt.encode({}, script.finish_reason))
        if script.usage is not None:
            self._send_raw(fmt.usage_chunk(script.usage))
        if script.finish_reason is not None:
            self._send_raw(b"data: [DONE]\n\n")
        self._wait(script.linger, record)
        self._end_body()

    def _hang(self, script: Script, record: Record) -> None:
        """Silence, or only keep-alive comments (bytes, but never a token)."""
        if not script.keepalive:
            self._wait(script.hang, record)
            return
        deadline = time.monotonic() + script.hang
        while time.monotonic() < deadline:
            self._wait(min(script.keepalive, deadline - time.monotonic()), record)
            self._send_raw(b": keep-alive\n\n")

    def _send_raw(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_body(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _wait(self, seconds: float, record: Record) -> None:
        """Sleep, but notice at once if the client hangs up meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([self.connection], [], [], left)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                record.hung_up = time.monotonic()
                raise _Hangup()

    def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
