"""The JSON API: conversations, messages and generations (all under /api)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for

from tidechat import chat, db, hygiene, limits, models, policy
from tidechat.accounts import current_owner
from tidechat.errors import REDIS_DOWN, ApiError, unavailable
from tidechat.models import Conversation
from tidechat.stream_bus import DONE, StreamBus
from tidechat.views.hub import get_hub
from worker import enqueue_generation

bp = Blueprint("api", __name__, url_prefix="/api")


def bus() -> StreamBus:
    return current_app.extensions["stream_bus"]


def json_body() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send JSON (Content-Type: application/json).")
    body = hygiene.parse_json(request.get_data(cache=True))
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The body must be a JSON object.")
    hygiene.check_text(body)
    return body


@bp.post("/conversations")
@limits.writes
def create_conversation():
    if request.content_length and not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send JSON (Content-Type: application/json).")
    conv = Conversation(owner=current_owner())
    s = db.session()
    s.add(conv)
    s.commit()
    return jsonify(chat.serialize_conversation(conv)), 201


@bp.get("/conversations")
def list_conversations():
    convs = chat.list_conversations(db.session(), current_owner())
    return jsonify({"conversations": [chat.serialize_conversation(c) for c in convs]})


@bp.get("/conversations/<cid>")
def get_conversation(cid: str):
    s = db.session()
    conv = chat.owned_conversation(s, current_owner(), cid)
    pending = chat.in_progress(conv)
    if pending is not None:
        chat.reconcile(s, bus(), pending)
    data = chat.serialize_conversation(conv)
    data["messages"] = [chat.serialize_message(m) for m in conv.messages]
    return jsonify(data)


@bp.patch("/conversations/<cid>")
@limits.writes
def update_conversation(cid: str):
    body = json_body()
    s = db.session()
    conv = chat.owned_conversation(s, current_owner(), cid)
    for name, value in parse_settings(body).items():
        setattr(conv, name, value)
    s.commit()
    return jsonify(chat.serialize_conversation(conv))


def parse_settings(body: dict[str, Any]) -> dict[str, Any]:
    unknown = set(body) - {"title", "system_prompt", "model", "temperature"}
    if unknown:
        raise ApiError(400, "unknown_field", f"Unknown field(s): {', '.join(sorted(unknown))}.")
    out: dict[str, Any] = {}
    if "title" in body:
        title = body["title"]
        if not isinstance(title, str) or not title.strip() or len(title) > 200:
            raise ApiError(400, "invalid_title", "'title' must be 1 to 200 characters.")
        out["title"] = title.strip()
    if "system_prompt" in body:
        prompt = body["system_prompt"]
        if prompt is not None and not isinstance(prompt, str):
            raise ApiError(400, "invalid_system_prompt", "'system_prompt' must be text or null.")
        if prompt:
            check_length("system_prompt", prompt)
        out["system_prompt"] = prompt or None
    if "model" in body:
        model = parse_model(body)
        out["model"] = model and policy.check_model(current_app, model)
    if "temperature" in body:
        temperature = body["temperature"]
        valid = temperature is None or (
            isinstance(temperature, int | float)
            and not isinstance(temperature, bool)
            and 0 <= temperature <= 2
        )
        if not valid:
            raise ApiError(400, "invalid_temperature", "'temperature' must be from 0 to 2.")
        out["temperature"] = None if temperature is None else float(temperature)
    return out


@bp.delete("/conversations/<cid>")
@limits.writes
def delete_conversation(cid: str):
    s = db.session()
    conv = chat.owned_conversation(s, current_owner(), cid)
    pending = chat.in_progress(conv)
    if pending is not None:  # stop what is streaming before its conversation goes
        bus().request_cancel(pending.generation_id)
        bus().cancel_queued(pending.generation_id)
    s.delete(conv)
    s.commit()
    return "", 204


@bp.get("/models")
def list_models():
    return jsonify(policy.catalog(current_app))


@bp.post("/conversations/<cid>/messages")
@limits.answers
def post_message(cid: str):
    body = json_body()
    content, model, stream = parse_message(body)
    s = db.session()
    conv = chat.owned_conversation(s, current_owner(), cid)
    ensure_idle(s, conv)
    model = resolve_model(conv, model)
    admission = limits.admit(models.new_id())
    try:
        user, assistant = chat.start_turn(s, conv, content, model, admission.gid)
    except BaseException:
        admission.withdraw()
        raise
    return launch(user, assistant, stream, admission)


@bp.post("/conversations/<cid>/regenerate")
@limits.answers
def regenerate(cid: str):
    """Answer the last user message again, replacing the last answer."""
    body = json_body() if request.content_length else {}
    model = parse_model(body)
    s = db.session()
    conv = chat.owned_conversation(s, current_owner(), cid)
    ensure_idle(s, conv)
    user = chat.last_user_message(conv)
    if user is None:
        raise ApiError(400, "nothing_to_regenerate", "There is no message to answer again.")
    model = resolve_model(conv, model)
    admission = limits.admit(models.new_id())
    try:
        for msg in [m for m in conv.messages if m.seq > user.seq]:
            conv.messages.remove(msg)
        assistant = chat.queue_answer(s, conv, model, admission.gid)
    except BaseException:
        admission.withdraw()
        raise
    return launch(user, assistant, True, admission)


def ensure_idle(s, conv: Conversation) -> None:
    pending = chat.in_progress(conv)
    if pending is not None:
        chat.reconcile(s, bus(), pending)
        if pending.status not in models.FINAL_STATUSES:
            raise ApiError(409, "generation_in_progress", "Wait for the answer, or stop it first.")


def resolve_model(conv: Conversation, requested: str | None) -> str:
    model = requested or conv.model or current_app.config["DEFAULT_MODEL"]
    return policy.check_model(current_app, model)


def launch(
    user: models.Message, assistant: models.Message, stream: bool, admission: limits.Admission
):
    """Enqueue the assistant message's generation; answer 202, or 200 once done."""
    gid = assistant.generation_id
    sub = None
    try:
        bus().create(gid)
        sub = None if stream else get_hub().subscribe(gid)  # before enqueue: miss nothing
        enqueue_generation(current_app, gid, admission.priority)
    except REDIS_DOWN:
        # Not queued: end the answer now, so the chat is not left waiting for it forever
        # (the page offers Retry), and tell the client to try again.
        if sub is not None:
            sub.close()
        admission.withdraw()
        chat.fail_unqueued(db.session(), assistant, unavailable("Redis"))
        raise
    if sub is not None:
        return finish_non_streaming(sub, assistant)
    return jsonify(
        {
            "message": chat.serialize_message(user),
            "generation": {
                "id": gid,
                "message_id": assistant.id,
                "events_url": url_for("events.generation_events", gid=gid),
                "cancel_url": url_for("api.cancel_generation", gid=gid),
            },
        }
    ), 202


def parse_message(body: dict[str, Any]) -> tuple[str, str | None, bool]:
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, "invalid_content", "'content' must be a non-empty string.")
    check_length("content", content)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_stream", "'stream' must be true or false.")
    return content, parse_model(body), stream


def parse_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > 200):
        raise ApiError(400, "invalid_model", "'model' must be a model name.")
    return model


def check_length(field: str, value: str) -> None:
    limit = int(current_app.config["MAX_MESSAGE_CHARS"])
    if len(value) > limit:
        code = "message_too_long" if field == "content" else "too_long"
        raise ApiError(413, code, f"'{field}' may be at most {limit} characters.")


def finish_non_streaming(sub, assistant: models.Message):
    """stream=false: the worker still generates; this request waits for the end."""
    timeout = float(current_app.config["NONSTREAM_TIMEOUT"])
    try:
        if not sub.wait_ready(timeout):
            raise ApiError(504, "timeout", "The answer did not finish in time.")
        ended = sub.status != "live"
        while not ended:
            got = sub.get(timeout)
            if got is None:
                raise ApiError(504, "timeout", "The answer did not finish in time.")
            ended = got[1]
    finally:
        sub.close()
    s = db.session()
    s.refresh(assistant)
    chat.reconcile(s, bus(), assistant)
    return jsonify({"message": chat.serialize_message(assistant)}), 200


@bp.get("/generations/<gid>")
def get_generation(gid: str):
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    chat.reconcile(s, bus(), msg)
    return jsonify(chat.generation_view(bus(), msg))


@bp.post("/generations/<gid>/cancel")
@limits.writes
def cancel_generation(gid: str):
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    chat.reconcile(s, bus(), msg)
    if msg.status in models.FINAL_STATUSES:
        return jsonify(chat.generation_view(bus(), msg)), 200
    bus().request_cancel(gid)
    # Not started yet: end it here; the worker will find it finished and skip it. And if
    # Redis lost its state, nobody else can end it: end it here too.
    # Its worker gone (no lease), or Redis lost the state of an answer no worker holds
    # (the text of one that streams is the worker's: it ends that itself, state_lost).
    cancelled = {"finish_reason": "cancelled", "usage": None}
    if msg.status == models.QUEUED and bus().end_lost(gid, DONE, cancelled, models.CANCELLED):
        chat.record_end(s, msg, msg.content, models.CANCELLED, cancelled)
    elif (msg.status == models.QUEUED and bus().cancel_queued(gid)) or bus().reap(
        gid, cancelled, DONE, models.CANCELLED
    ):
        chat.reconcile(s, bus(), msg)
    if msg.status in models.FINAL_STATUSES:
        return jsonify(chat.generation_view(bus(), msg)), 200
    return jsonify(chat.generation_view(bus(), msg)), 202


@bp.post("/generations/<gid>/continue")
@limits.answers
def continue_generation(gid: str):
    """Go on with an answer a deploy interrupted, in the same message: a new generation
    whose stream starts with the text so far."""
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    conv = msg.conversation
    if msg.status != models.INTERRUPTED or conv.messages[-1] is not msg:
        raise ApiError(409, "not_interrupted", "Only the last, interrupted answer can continue.")
    policy.check_model(current_app, msg.model or current_app.config["DEFAULT_MODEL"])
    admission = limits.admit(models.new_id())
    try:
        msg.generation_id, msg.status, msg.finish_reason = admission.gid, models.QUEUED, None
        s.commit()
    except BaseException:
        admission.withdraw()
        raise
    return launch(chat.last_user_message(conv), msg, True, admission)
