"""The JSON API: conversations, messages and generations (all under /api)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for

from tidechat import answers, chat, db, hygiene, limits, models, policy
from tidechat.accounts import current_owner
from tidechat.answers import bus
from tidechat.errors import ApiError
from tidechat.models import Conversation
from tidechat.stream_hub import Subscription

bp = Blueprint("api", __name__, url_prefix="/api")


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
def post_message(cid: str):
    body = json_body()
    content, model, stream = parse_message(body)
    s = db.session()
    conv, facts = chat.owned_turn(s, current_owner(), cid)
    answers.ensure_idle(s, conv, facts)
    model = resolve_model(conv, model)
    turn: list[models.Message] = []

    def store(gid: str) -> models.Message:
        turn[:] = chat.start_turn(s, conv, content, model, gid, facts=facts)
        return turn[1]

    assistant, sub = answers.start(store, follow=not stream)
    return answered(assistant, sub, user=turn[0])


@bp.post("/conversations/<cid>/regenerate")
def regenerate(cid: str):
    """Answer the last user message again, replacing the last answer."""
    body = json_body() if request.content_length else {}
    model = parse_model(body)
    s = db.session()
    conv, facts = chat.owned_turn(s, current_owner(), cid)
    answers.ensure_idle(s, conv, facts)
    user = chat.last_user_message(conv)
    if user is None:
        raise ApiError(400, "nothing_to_regenerate", "There is no message to answer again.")
    model = resolve_model(conv, model)

    def store(gid: str) -> models.Message:
        chat.drop_after(s, conv, user.seq)
        return chat.queue_answer(s, conv, model, gid)

    return answered(*answers.start(store), user=user)


def resolve_model(conv: Conversation, requested: str | None) -> str:
    model = requested or conv.model or current_app.config["DEFAULT_MODEL"]
    return policy.check_model(current_app, model)


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
    over = answers.cancel(s, msg)
    return jsonify(chat.generation_view(bus(), msg)), 200 if over else 202


@bp.post("/generations/<gid>/continue")
def continue_generation(gid: str):
    """Go on with an answer a deploy interrupted, in the same message: a new generation
    whose stream starts with the text so far."""
    s = db.session()
    msg = chat.owned_generation(s, current_owner(), gid)
    if msg.status != models.INTERRUPTED or not chat.is_last(s, msg):
        raise ApiError(409, "not_interrupted", "Only the last, interrupted answer can continue.")
    policy.check_model(current_app, msg.model or current_app.config["DEFAULT_MODEL"])

    def store(gid: str) -> models.Message:
        msg.generation_id, msg.status, msg.finish_reason = gid, models.QUEUED, None
        s.commit()
        return msg

    return answered(*answers.start(store))


def answered(
    assistant: models.Message,
    sub: Subscription | None = None,
    user: models.Message | None = None,
):
    """202 with where to follow the answer (and ``user``, the message it answers: its
    conversation's last user message); or, when following it here (stream=false), 200
    once it is over."""
    if sub is not None:
        return jsonify({"message": chat.serialize_message(answers.wait_end(sub, assistant))}), 200
    gid = assistant.generation_id
    if user is None:
        user = chat.last_user_message(assistant.conversation)
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
