"""What a request may ask of the model: which models, how much history, how long an answer.

- **Models**: only allowed models are offered (``/api/models``) and accepted (400
  ``unknown_model`` otherwise): those named in ``MODELS``, or by default those the
  backend's ``/v1/models`` lists; the default model always. Nothing about the backend
  itself (its address, its account) is shown.
- **Context budget**: the history sent with each answer is trimmed to ``CONTEXT_TOKENS``,
  oldest turns first; the system prompt and the message being answered are always kept.
- **Output**: every answer is capped at ``MAX_OUTPUT_TOKENS``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from tidechat.errors import ApiError
from tidechat.model_catalog import available_models

# MODELS=* accepts any name the client sends: for a trusted setup only (a benchmark).
ANY_MODEL = "*"
# Per message, for the chat template's role markers.
_MESSAGE_OVERHEAD = 4


def configured_models(config: dict[str, Any]) -> list[str]:
    value = config.get("MODELS") or []
    if isinstance(value, str):
        value = value.split(",")
    return [m.strip() for m in value if isinstance(m, str) and m.strip()]


def allowed_models(app: Flask) -> list[str]:
    """The models this deployment offers, the default first."""
    default = app.config["DEFAULT_MODEL"]
    models = [m for m in configured_models(app.config) if m != ANY_MODEL] or available_models(app)
    return [default, *(m for m in models if m != default)]


def check_model(app: Flask, model: str) -> str:
    """``model`` if it is allowed, else 400. A name missing from the cached listing is
    looked up once more, so a model just added to the backend works at once (the rate
    limits on answers bound how often that asks the backend)."""
    if ANY_MODEL in configured_models(app.config) or model in allowed_models(app):
        return model
    if not configured_models(app.config):
        available_models(app, fresh=True)
    if model not in allowed_models(app):
        raise ApiError(
            400, "unknown_model",
            f"The model {model[:100]!r} is not offered here; choose one from /api/models.",
        )  # fmt: skip
    return model


def catalog(app: Flask) -> dict[str, Any]:
    """What ``/api/models`` shows: the allowed models and, if the operator named it, the
    backend's label."""
    out: dict[str, Any] = {"default": app.config["DEFAULT_MODEL"], "models": allowed_models(app)}
    if app.config.get("BACKEND_LABEL"):
        out["backend"] = str(app.config["BACKEND_LABEL"])
    return out


def estimate_tokens(text: str) -> int:
    """A conservative token count without the model's tokenizer: ~4 ASCII characters per
    token, and each other character a token of its own (about right for CJK text)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (ascii_chars + 3) // 4 + (len(text) - ascii_chars)


def message_tokens(message: dict[str, str]) -> int:
    return estimate_tokens(message["content"]) + _MESSAGE_OVERHEAD


def fit_context(messages: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """The newest turns that fit in ``budget`` tokens, with the system prompt (first, if
    any) and the last message always kept; oldest turns are dropped first."""
    if budget <= 0 or not messages:
        return messages
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    used = sum(message_tokens(m) for m in system) + message_tokens(turns[-1])
    kept = [turns[-1]]
    for message in reversed(turns[:-1]):
        used += message_tokens(message)
        if used > budget:
            break
        kept.append(message)
    kept.reverse()
    # A reply with no question before it confuses models: start the history at a user turn.
    while len(kept) > 1 and kept[0]["role"] != "user":
        kept.pop(0)
    return system + kept


def max_output_tokens(config: dict[str, Any], requested: int | None = None) -> int:
    """An answer's max_tokens: what the client asked, within ``MAX_OUTPUT_TOKENS``."""
    cap = int(config["MAX_OUTPUT_TOKENS"])
    if requested:
        return min(requested, cap) if cap else requested
    return cap
