"""The Server-Sent Events wire format (WHATWG HTML, "Server-sent events"), in one class."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def encode(self) -> bytes:
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(f": {line}" for line in _LINE_BREAK.split(self.comment))
        if self.id is not None:
            _single_line("id", self.id)
            lines.append(f"id: {self.id}")
        if self.event is not None:
            _single_line("event", self.event)
            lines.append(f"event: {self.event}")
        if self.retry is not None:
            lines.append(f"retry: {int(self.retry)}")
        if self.data is not None:
            # Each line of the payload becomes its own "data:" field, so no payload can
            # end the event early or smuggle in fields of its own.
            lines.extend(f"data: {line}" for line in _LINE_BREAK.split(self.data))
        return ("\n".join(lines) + "\n\n").encode("utf-8")


def _single_line(field: str, value: str) -> None:
    if _LINE_BREAK.search(value) or "\0" in value:
        raise ValueError(f"SSE {field} must be a single line without NUL")


def ping(interval: float) -> bytes:
    """The keepalive: a named event, so page code sees it and can tell a stalled connection
    from a quiet one, with no ``id``, so it never moves a client's resume cursor. ``interval``
    says how often it comes."""
    return ServerSentEvent(event="ping", data=f'{{"interval": {interval:g}}}').encode()
