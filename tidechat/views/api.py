"""The JSON API: conversations, messages and generations (all under /api)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for

from tidechat import chat, db, models
from tidechat.errors import ApiError
from tidechat.identity import current_owner
from tidechat.models import Conversation
from tidechat.stream_bus import StreamBus
from tidechat.views.hub import get_hub
from worker import enqueue_generation

bp = Blueprint("api", __name__, url_prefix="/api")


def bus() -> StreamBus:
    return current_app.extensions["stream_bus"]


def json_body() -> dict[str, Any]:
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send JSON (Content-Type: application/json).")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The body must be a JSON object.")
    return body


@bp.post("/conversations")
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


@bp.post("/conversations/<cid>/messages")
def post_message(cid: str):
    body = json_body()
    content, model, stream = parse_message(body)
    s = db.session()
    conv = chat.owned_conversation(s, current_owner(), cid)
    pending = chat.in_progress(conv)
    if pending is not None:
        chat.reconcile(s, bus(), pending)
        if pending.status not in models.FINAL_STATUSES:
            raise ApiError(409, "generation_in_progress", "Wait for the answer, or stop it first.")
    user, assistant = chat.start_turn(s, conv, content, model)
    gid = assistant.generation_id
    bus().create(gid)
    sub = None if stream else get_hub().subscribe(gid)  # before enqueue: miss nothing
    enqueue_generation(current_app, gid)
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


def parse_message(body: dict[str, Any]) -> tuple[str, str, bool]:
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ApiError(400, "invalid_content", "'content' must be a non-empty string.")
    limit = int(current_app.config["MAX_MESSAGE_CHARS"])
    if len(content) > limit:
        raise ApiError(413, "message_too_long", f"A message may be at most {limit} characters.")
    model = body.get("model", current_app.config["DEFAULT_MODEL"])
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise ApiError(400, "invalid_model", "'model' must be a model name.")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_stream", "'stream' must be true or false.")
    return content, model, stream


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
def cancel_generation(gid: str):
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    chat.reconcile(s, bus(), msg)
    if msg.status in models.FINAL_STATUSES:
        return jsonify(chat.generation_view(bus(), msg)), 200
    bus().request_cancel(gid)
    # Not started yet: end it here; the worker will find it finished and skip it.
    if msg.status == models.QUEUED and bus().cancel_queued(gid):
        msg.status, msg.finish_reason = models.CANCELLED, "cancelled"
        s.commit()
        return jsonify(chat.generation_view(bus(), msg)), 200
    return jsonify(chat.generation_view(bus(), msg)), 202
