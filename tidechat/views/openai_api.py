"""The OpenAI-compatible API (``/v1``): Chat Completions and Responses, background mode
and resumable streams, for any backend.

A thin door over the same core as the page: conversations and messages in SQL
(:mod:`tidechat.chat`), answers started, followed and stopped by :mod:`tidechat.answers`,
limits by :mod:`tidechat.limits`, models by :mod:`tidechat.policy`. Conversations made
here are ordinary ones: they show in their owner's sidebar. The wire formats are
:mod:`tidechat.openai_wire`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import ClosingIterator

from tidechat import accounts, answers, chat, db, limits, metrics, models, policy
from tidechat import openai_wire as wire
from tidechat.errors import (
    DATABASE_DOWN,
    REDIS_DOWN,
    ApiError,
    database_unavailable,
    unavailable,
)
from tidechat.models import Conversation, Message
from tidechat.stream_bus import Entry, dumps
from tidechat.stream_hub import Frame, Subscription
from tidechat.views.api import check_length, json_body
from tidechat.views.events import SSE_HEADERS
from tidechat.views.hub import get_hub

bp = Blueprint("openai", __name__, url_prefix="/v1")

_ROLES = {"user", "assistant", "system", "developer"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "rate_limited"}


# --- errors in OpenAI's shape ----------------------------------------------------------


def _error(
    status: int, code: str, message: str, param: str | None = None, retry: int | None = None
):
    response = jsonify(wire.error(status, code, message, param))
    response.status_code = status
    if retry is not None:
        response.headers["Retry-After"] = str(retry)
    return response


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError):
    retry = exc.retry_after if exc.retry_after is not None else (5 if exc.status == 503 else None)
    response = _error(exc.status, exc.code, exc.message, exc.param, retry)
    response.headers.update(exc.headers)
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):
    # (Flask-Limiter adds its Retry-After to a 429 afterwards)
    status = exc.code or 500
    return _error(status, _HTTP_CODES.get(status, "http_error"), exc.description or exc.name)


def _redis_down(_exc: Exception):
    return _api_error(unavailable("Redis"))


def _database_down(exc: Exception):
    return _api_error(database_unavailable(exc))


for _exc in REDIS_DOWN:
    bp.register_error_handler(_exc, _redis_down)
for _exc in DATABASE_DOWN:
    bp.register_error_handler(_exc, _database_down)


@bp.before_request
def _authenticate():
    accounts.current_owner()  # 401 without a live API key


# --- models ---------------------------------------------------------------------------


@bp.get("/models")
def list_models():
    return jsonify(wire.model_list(policy.allowed_models(current_app)))


# --- Chat Completions -----------------------------------------------------------------


@bp.post("/chat/completions")
def chat_completions():
    body = json_body()
    model = _model(body)
    history, question, system = _messages(body.get("messages"), "messages")
    asked = {"api": "chat.completions", **_sampling(body, ("max_completion_tokens", "max_tokens"))}
    stream = _flag(body, "stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object.", "stream_options")
    include_usage = options.get("include_usage") is True

    s = db.session()
    conv = Conversation(owner=accounts.current_owner(), system_prompt=system)
    s.add(conv)
    chat.add_history(conv, history)
    with _stream_slot(stream) as release:
        assistant, sub = answers.start(
            lambda gid: chat.start_turn(s, conv, question, model, gid, asked)[1], follow=True
        )
    if not stream:
        done = answers.wait_end(sub, assistant)
        if done.status == models.ERROR:
            error = done.error or {}
            raise ApiError(502, error.get("code", "upstream_error"), error.get("message", ""))
        return jsonify(wire.chat_completion(done))
    chunks = wire.ChatChunks(assistant, include_usage)
    return _sse(
        sub, assistant, lambda frames: b"".join(chunks.entry(f.entry) for f in frames),
        chunks.first(), True, release,
    )  # fmt: skip


# --- Responses ------------------------------------------------------------------------


@bp.post("/responses")
def create_response():
    body = json_body()
    model = _model(body)
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    history, question, system = _messages(items, "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string.", "instructions")
    if instructions:
        check_length("system_prompt", instructions)
    background = _flag(body, "background", False)
    stream = _flag(body, "stream", False)
    if not _flag(body, "store", True):
        raise _bad(
            "store=false is not supported: Tidechat keeps every response so that it can be "
            "resumed and retrieved.",
            "store",
        )
    asked = {
        "api": "responses",
        "background": background,
        "instructions": instructions,
        "previous_response_id": body.get("previous_response_id"),
        **_sampling(body, ("max_output_tokens",)),
    }
    s = db.session()
    conversation = _conversation_for(s, body.get("previous_response_id"))

    def store(gid: str) -> Message:  # once admitted: a refused response changes nothing
        conv, facts = conversation()
        conv.system_prompt = "\n\n".join(p for p in (instructions, system) if p) or None
        chat.add_history(conv, history)
        if history:
            facts = None  # (it has user messages now, maybe)
        return chat.start_turn(s, conv, question, model, gid, asked, facts)[1]

    with _stream_slot(stream) as release:
        assistant, sub = answers.start(store, follow=stream or not background)
    if stream:
        events = wire.ResponseEvents(assistant)
        return _sse(sub, assistant, _relay(events), events.preamble(), not background, release)
    if not background:
        assistant = answers.wait_end(sub, assistant)
    return jsonify(wire.response_object(assistant))


@bp.get("/responses/<rid>")
def get_response(rid: str):
    s = db.session()
    msg = _owned_response(s, rid)
    chat.reconcile(s, answers.bus(), msg)
    if request.args.get("stream", "").lower() != "true":
        view = chat.generation_view(answers.bus(), msg)
        return jsonify(wire.response_object(msg, text=view["text"]))
    try:
        after = int(request.args.get("starting_after", "-1"))
    except ValueError:
        raise _bad("'starting_after' must be a sequence number.", "starting_after") from None
    s.commit()  # give the connection back: the stream may be held open for long
    if after >= 0:
        metrics.RESUMES.labels("starting_after").inc()
    events = wire.ResponseEvents(msg, after)
    with _stream_slot(True) as release:
        sub = get_hub().subscribe(
            msg.generation_id, "0", await_stream=msg.status not in models.FINAL_STATUSES
        )
        if not sub.wait_ready(30):
            sub.close()
            raise ApiError(503, "unavailable", "The event stream is unavailable; retry shortly.")
    if sub.status == "missing":  # its stream expired from Redis: the stored answer
        sub.close()
        release()
        return _stored_events(events, msg)
    return _sse(sub, msg, _relay(events), events.preamble(), False, release)


@bp.post("/responses/<rid>/cancel")
@limits.writes
def cancel_response(rid: str):
    s = db.session()
    msg = _owned_response(s, rid)
    answers.cancel(s, msg)
    return jsonify(wire.response_object(msg))


# --- helpers --------------------------------------------------------------------------


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param=param)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise _bad("'model' must be a model name.", "model")
    return policy.check_model(current_app, model)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false.", name)
    return value


def _sampling(body: dict[str, Any], token_fields: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not 0 <= temperature <= 2
        ):
            raise _bad("'temperature' must be from 0 to 2.", "temperature")
        out["temperature"] = float(temperature)
    for name in token_fields:
        tokens = body.get(name)
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise _bad(f"'{name}' must be a whole number above 0.", name)
            out["max_tokens"] = tokens
            break
    return out


def _text_of(content: Any, field: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                "text",
                "input_text",
                "output_text",
            ):
                raise _bad("Only text content is supported.", field)
            if not isinstance(part.get("text"), str):
                raise _bad("A text part needs 'text'.", field)
            texts.append(part["text"])
        return "".join(texts)
    raise _bad("A message's 'content' must be a string or a list of text parts.", field)


def _messages(items: Any, field: str) -> tuple[list[tuple[str, str]], str, str | None]:
    """(earlier turns as (role, text), the question to answer, system text) of a message
    list whose last item is the user's."""
    if not isinstance(items, list) or not items:
        raise _bad(f"'{field}' must be a non-empty list of messages.", field)
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or item.get("role") not in _ROLES:
            raise _bad(
                f"Each of '{field}' must have a role: user, assistant, system or developer.", field
            )
        if item.get("type", "message") != "message":
            raise _bad("Only message items are supported.", field)
        text = _text_of(item.get("content"), field)
        check_length("content", text)
        if item["role"] in ("system", "developer"):
            system.append(text)
        else:
            turns.append((item["role"], text))
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise _bad(f"The last of '{field}' must be a non-empty user message.", field)
    return turns[:-1], turns[-1][1], "\n\n".join(system) or None


def _owned_response(s, rid: str) -> Message:
    if not rid.startswith(wire.RESPONSE_PREFIX):
        raise ApiError(404, "not_found", "No such response.")
    try:
        return chat.owned_generation(s, accounts.current_owner(), rid[len(wire.RESPONSE_PREFIX) :])
    except ApiError as exc:
        raise ApiError(404, "not_found", "No such response.") from exc


def _conversation_for(s, previous: Any) -> Callable[[], tuple[Conversation, chat.TurnFacts | None]]:
    """What makes a response's conversation: a new one, or the one ``previous_response_id``
    ended (a copy of it up to that response, if the conversation has gone on since: a
    branch), with its :class:`~tidechat.chat.TurnFacts` if it is the stored one. Its reads
    (404, 409) happen now; its writes when called, once the response is admitted: until
    then the session holds no change, and gives its connection back while the admission
    waits for Redis (``answers.start``)."""
    owner = accounts.current_owner()
    if previous is None:

        def new() -> tuple[Conversation, None]:
            conv = Conversation(owner=owner)
            s.add(conv)
            return conv, None

        return new
    if not isinstance(previous, str):
        raise _bad("'previous_response_id' must be a response id.", "previous_response_id")
    prior = _owned_response(s, previous)
    conv = prior.conversation
    facts = answers.ensure_idle(s, conv, chat.turn_facts(s, conv, after=prior.seq))
    if not facts.later:
        return lambda: (conv, facts)
    return lambda: (chat.branch(s, conv, prior), None)


@contextmanager
def _stream_slot(stream: bool) -> Iterator[Callable[[], None]]:
    """One of the account's (and address's) open-stream slots for a streamed answer, given
    back if what follows fails; the caller hands the release on to the response."""
    release = limits.open_stream("v1") if stream else (lambda: None)
    try:
        yield release
    except BaseException:
        release()
        raise


def _relay(events: wire.ResponseEvents) -> Callable[[list[Frame]], bytes]:
    return lambda frames: b"".join(events.entries([f.entry for f in frames]))


def _sse(
    sub: Subscription,
    msg: Message,
    translate: Callable[[list[Frame]], bytes],
    first: bytes,
    cancel_on_hangup: bool,
    release: Callable[[], None],
) -> Response:
    """Relay an answer's stream in an OpenAI wire format. A client that hangs up before
    the end stops the answer when ``cancel_on_hangup`` (what non-background clients
    expect: nobody is left to read it); either way its subscription and stream slot are
    freed when the server closes the response, even one it never started to send."""
    bus, gid = answers.bus(), msg.generation_id
    interval = float(current_app.config["PING_INTERVAL"])
    state = {"ended": False}

    def body() -> Iterator[bytes]:
        yield first
        if not sub.wait_ready(30):
            return
        while not state["ended"]:
            got = sub.get_frames(interval)
            if got is None:
                yield wire.KEEPALIVE  # also how a hang-up is noticed
                continue
            frames, state["ended"] = got
            if frames:
                yield translate(frames)
            if sub.status == "drained" and not state["ended"]:
                return  # this process is stopping: the client resumes elsewhere

    def closed() -> None:
        sub.close()
        release()
        if cancel_on_hangup and not state["ended"]:
            bus.request_cancel(gid)
            bus.cancel_queued(gid)

    return Response(
        ClosingIterator(body(), closed),
        mimetype="text/event-stream",
        headers=SSE_HEADERS,
        direct_passthrough=True,
    )


def _stored_events(events: wire.ResponseEvents, msg: Message) -> Response:
    """The events of a finished response whose stream has expired, from the database."""
    event, payload = chat.terminal_of(msg)
    entries = []
    if msg.content:
        entries.append(_entry("0-1", "delta", {"text": msg.content}))
    entries.append(_entry("0-2", event, payload))
    data = events.preamble() + b"".join(events.entries(entries))
    return Response(data, mimetype="text/event-stream", headers=SSE_HEADERS)


def _entry(entry_id: str, event: str, payload: dict) -> Entry:
    return Entry(entry_id, event, dumps(payload))
