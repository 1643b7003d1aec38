"""Input hygiene: client input the API can parse, store and echo back without a 5xx.

A request body is parsed with a bound on its nesting (the stdlib parser recurses once per
level), then every string in it, keys included, is checked for what no database column can
hold: NUL (PostgreSQL text refuses it) and unpaired surrogates (not encodable as UTF-8).
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from tidechat.errors import ApiError

MAX_JSON_DEPTH = 32  # the API's bodies are flat objects; this leaves plenty of room

# Ids this app makes: uuid.uuid4().hex.
_ID = re.compile(r"[0-9a-f]{32}")
# A JSON string literal, exactly, when the text is valid JSON. An unterminated one runs to
# the end, and nothing backtracks, so this stays linear on any input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")
_MAX_NAME_CHARS = 60


def is_id(value: str) -> bool:
    """Whether ``value`` can be an id of this app's (so worth looking up at all)."""
    return len(value) == 32 and _ID.fullmatch(value) is not None


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, "invalid_json", message)


def parse_json(data: bytes) -> Any:
    """Parse a request body as JSON text: UTF-8, nested at most MAX_JSON_DEPTH deep, and
    without NaN or Infinity (not JSON). Raises ApiError 400 ``invalid_json`` otherwise."""
    if _too_deep(data):
        raise _invalid_json(f"The body is nested deeper than {MAX_JSON_DEPTH} levels.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _invalid_json("The body is not valid UTF-8 text.") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: only if _too_deep missed a case
        raise _invalid_json("The body is not valid JSON.") from None


def check_text(value: Any, field: str | None = None) -> None:
    """Raise ApiError 400 ``invalid_text``, naming the field, if any string in the parsed
    JSON ``value`` (a key or a value, at any depth) holds NUL or an unpaired surrogate."""
    if isinstance(value, str):
        problem = _text_problem(value)
        if problem:
            raise ApiError(400, "invalid_text", f"'{field or 'body'}' {problem}.")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = key if field is None else f"{field}.{key}"
            problem = _text_problem(key)
            if problem:
                where = f"in '{_shorten(field)}'" if field is not None else "in the body"
                raise ApiError(400, "invalid_text", f"A field name {where} {problem}.")
            check_text(item, _shorten(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text(item, _shorten(f"{field or 'body'}[{index}]"))


def _too_deep(data: bytes) -> bool:
    """Whether the brackets of ``data``, outside strings, nest deeper than MAX_JSON_DEPTH
    (checked before parsing: the parser would recurse once per level)."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > MAX_JSON_DEPTH


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _text_problem(text: str) -> str | None:
    bad = _BAD_CHAR.search(text)
    if bad is None:
        return None
    if bad.group() == "\x00":
        return "must not contain NUL (U+0000)"
    return "is not valid Unicode text (it has an unpaired surrogate)"


def _shorten(name: str | None) -> str | None:
    if name is None or len(name) <= _MAX_NAME_CHARS:
        return name
    return name[: _MAX_NAME_CHARS - 1] + "…"
