"""OpenAI's wire formats, in one place: errors, models, Chat Completions (objects and
chunks) and the Responses API (objects and numbered stream events).

Pure translation: an answer here is a stored :class:`Message` plus, while it streams, its
stream's entries. views/openai_api.py owns the HTTP side.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tidechat import models
from tidechat.models import Message
from tidechat.sse import ServerSentEvent
from tidechat.stream_bus import DELTA, DONE, Entry, dumps

CHAT_DONE = b"data: [DONE]\n\n"
KEEPALIVE = ServerSentEvent(comment="keepalive").encode()
RESPONSE_PREFIX, ITEM_PREFIX, CHAT_PREFIX = "resp_", "msg_", "chatcmpl-"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def model_list(names: list[str]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tidechat"} for n in names],
    }


def _epoch(msg: Message) -> int:
    return int(msg.created_at.timestamp())


def chat_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    prompt, completion = (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
    )
    total = int(usage.get("total_tokens") or prompt + completion)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def chat_finish_reason(finish_reason: str | None) -> str:
    """Chat Completions knows stop/length (and tool calls); a stopped answer is "stop"."""
    return "length" if finish_reason == "length" else "stop"


# --- Chat Completions -----------------------------------------------------------------


def chat_completion(msg: Message) -> dict[str, Any]:
    """A finished answer as a ``chat.completion`` (the caller turns errors into errors)."""
    return {
        "id": CHAT_PREFIX + msg.generation_id,
        "object": "chat.completion",
        "created": _epoch(msg),
        "model": msg.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": msg.content, "refusal": None},
                "logprobs": None,
                "finish_reason": chat_finish_reason(msg.finish_reason),
            }
        ],
        "usage": chat_usage(msg.usage),
    }


class ChatChunks:
    """One answer's ``chat.completion.chunk`` stream, from its stream entries."""

    def __init__(self, msg: Message, include_usage: bool) -> None:
        self.base = {
            "id": CHAT_PREFIX + msg.generation_id,
            "object": "chat.completion.chunk",
            "created": _epoch(msg),
            "model": msg.model,
        }
        self.include_usage = include_usage

    def _chunk(self, delta: dict, finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {**self.base, "choices": [choice], **extra}
        if self.include_usage:
            body.setdefault("usage", None)
        return ServerSentEvent(data=dumps(body)).encode()

    def first(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def entry(self, entry: Entry) -> bytes:
        payload = entry.payload()
        if entry.event == DELTA:
            return self._chunk({"content": payload["text"]})
        if entry.event != DONE:  # the SDK raises APIError on a data: {"error": ...} event
            body = error(500, payload.get("code", "upstream_error"), payload.get("message", ""))
            return ServerSentEvent(data=dumps(body)).encode()
        out = self._chunk({}, chat_finish_reason(payload.get("finish_reason")))
        if self.include_usage:
            usage = {**self.base, "choices": [], "usage": chat_usage(payload.get("usage"))}
            out += ServerSentEvent(data=dumps(usage)).encode()
        return out + CHAT_DONE


# --- Responses ------------------------------------------------------------------------


def response_status(msg: Message) -> str:
    if msg.status == models.QUEUED:
        return "queued"
    if msg.status == models.STREAMING:
        return "in_progress"
    if msg.status == models.ERROR:
        return "failed"
    if msg.status == models.CANCELLED:
        return "cancelled"
    if msg.status == models.INTERRUPTED or msg.finish_reason == "length":
        return "incomplete"
    return "completed"


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    counts = chat_usage(usage)
    return {
        "input_tokens": counts["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"],
    }


def _incomplete_details(status: str, finish_reason: str | None) -> dict | None:
    if status != "incomplete":
        return None
    return {"reason": "max_output_tokens" if finish_reason == "length" else "interrupted"}


def _output_item(msg: Message, text: str, status: str, done: bool) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {
        "id": ITEM_PREFIX + msg.id,
        "type": "message",
        "role": "assistant",
        "status": "completed"
        if status == "completed"
        else ("incomplete" if done else "in_progress"),
        "content": content if (text or done) else [],
    }


def response_object(
    msg: Message,
    *,
    status: str | None = None,
    text: str | None = None,
    usage: dict | None = None,
    error_payload: dict | None = None,
) -> dict[str, Any]:
    """A ``response`` object for an answer: as stored, or as of a point in its stream."""
    status = status or response_status(msg)
    text = msg.content if text is None else text
    asked = msg.request or {}
    over = status not in ("queued", "in_progress")
    failure = error_payload if error_payload is not None else msg.error
    return {
        "id": RESPONSE_PREFIX + msg.generation_id,
        "object": "response",
        "created_at": _epoch(msg),
        "status": status,
        "background": bool(asked.get("background")),
        "error": (
            {"code": failure.get("code", "server_error"), "message": failure.get("message", "")}
            if status == "failed" and failure
            else None
        ),
        "incomplete_details": _incomplete_details(status, msg.finish_reason),
        "instructions": asked.get("instructions"),
        "max_output_tokens": asked.get("max_tokens"),
        "model": msg.model,
        "output": [_output_item(msg, text, status, over)]
        if (text or over) and status != "failed"
        else [],
        "parallel_tool_calls": False,
        "previous_response_id": asked.get("previous_response_id"),
        "store": asked.get("store", True),
        "temperature": asked.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": "none",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "usage": response_usage(usage if usage is not None else msg.usage) if over else None,
        "metadata": {},
    }


# How a done event's finish_reason ends a response.
_END_STATUS = {"cancelled": "cancelled", models.INTERRUPTED: "incomplete", "length": "incomplete"}


class ResponseEvents:
    """One response's stream events, numbered from 0 the same way on every replay, so a
    client can resume after any ``sequence_number`` from any web process.

    0 ``response.created``, 1 ``response.in_progress``, 2 ``response.output_item.added``,
    3 ``response.content_part.added``; one ``response.output_text.delta`` per stream
    entry; then the end: ``output_text.done``, ``content_part.done``,
    ``output_item.done`` and ``response.completed`` (or ``response.incomplete``, whose
    response says ``cancelled`` for a cancelled one), or ``response.failed`` alone.
    """

    def __init__(self, msg: Message, starting_after: int = -1) -> None:
        self.msg, self.after = msg, starting_after
        self.seq = -1
        self.text: list[str] = []
        self.item_id = ITEM_PREFIX + msg.id

    def _event(self, kind: str, **body: Any) -> bytes:
        self.seq += 1
        if self.seq <= self.after:
            return b""
        payload = {"type": kind, "sequence_number": self.seq, **body}
        return ServerSentEvent(event=kind, data=dumps(payload)).encode()

    def _part(self, **extra: Any) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0, **extra}

    def preamble(self) -> bytes:
        start = response_object(self.msg, status="queued", text="")
        item = _output_item(self.msg, "", "in_progress", False)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return b"".join(
            [
                self._event("response.created", response={**start, "status": "queued"}),
                self._event("response.in_progress", response={**start, "status": "in_progress"}),
                self._event("response.output_item.added", output_index=0, item=item),
                self._event("response.content_part.added", **self._part(part=part)),
            ]
        )

    def entries(self, entries: list[Entry]) -> Iterator[bytes]:
        for entry in entries:
            payload = entry.payload()
            if entry.event == DELTA:
                self.text.append(payload["text"])
                yield self._event(
                    "response.output_text.delta", **self._part(delta=payload["text"], logprobs=[])
                )
            elif entry.event == DONE:
                yield self._finished(payload)
            else:
                text = payload.pop("text", None)
                if text is not None:
                    self.text = [text]
                failed = response_object(
                    self.msg, status="failed", text="".join(self.text), error_payload=payload
                )
                yield self._event("response.failed", response=failed)

    def _finished(self, payload: dict[str, Any]) -> bytes:
        text = payload.pop("text", None)
        if text is not None:  # Redis lost the stream: its end carries the whole text
            self.text = [text]
        text = "".join(self.text)
        finish = payload.get("finish_reason")
        status = _END_STATUS.get(finish, "completed")
        final = response_object(
            self.msg, status=status, text=text, usage=payload.get("usage") or {}
        )
        final["incomplete_details"] = _incomplete_details(status, finish)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return b"".join(
            [
                self._event("response.output_text.done", **self._part(text=text, logprobs=[])),
                self._event("response.content_part.done", **self._part(part=part)),
                self._event("response.output_item.done", output_index=0, item=final["output"][0]),
                self._event(kind, response=final),
            ]
        )
