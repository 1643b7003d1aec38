"""The operator's view (``/api/admin/answers``): answers running and queued, with their
age and worker; recent errors by code; the queue depth; the workers. And the operator may
stop any answer. For admins (accounts), or a request with the operator's token: never by
address alone (behind a proxy on the same host, every visitor comes from loopback)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from typing import Any

from flask import Blueprint, current_app, jsonify
from sqlalchemy import select

from tidechat import accounts, answers, chat, db, health, limits, models
from tidechat.errors import not_found
from tidechat.models import Message, User, utcnow

bp = Blueprint("operations", __name__, url_prefix="/api/admin")

RECENT = timedelta(hours=24)
_LIST_LIMIT = 500


@bp.before_request
def _operators_only():
    if not health.operator(by_address=False):
        accounts.require_admin()  # 404 for anyone else


@bp.get("/answers")
def overview():
    s = db.session()
    pending = chat.unfinished(s, _LIST_LIMIT)
    states = answers.bus().states([m.generation_id for m in pending]) if pending else []
    emails = _emails(s, {m.conversation.owner for m in pending})
    now = time.time()
    running, queued = [], []
    for msg, (meta, leased) in zip(pending, states, strict=True):
        if meta.get("state") not in ("queued", "running"):
            continue  # ending (the database has not caught up), or its state is gone
        row = _row(msg, meta, leased, emails, now)
        (running if row["status"] == "running" else queued).append(row)
    from worker import heartbeat

    return jsonify(
        {
            "queue_depth": limits.queue_depth(current_app),
            "running": running,
            "queued": queued,
            "errors": _recent_errors(s),
            "workers": heartbeat.alive(current_app, answers.bus().redis),
        }
    )


@bp.post("/generations/<gid>/cancel")
def cancel(gid: str):
    s = db.session()
    msg = chat.generation_message(s, gid) if len(gid) <= 32 else None
    if msg is None:
        raise not_found("generation")
    over = answers.cancel(s, msg)
    return jsonify(chat.generation_view(answers.bus(), msg)), 200 if over else 202


def _row(msg: Message, meta: dict, leased: bool, emails: dict, now: float) -> dict[str, Any]:
    state = meta.get("state") or msg.status
    started = meta.get("started_at") if state == "running" else None
    since = int(started) / 1000 if started else msg.created_at.timestamp()
    return {
        "generation_id": msg.generation_id,
        "conversation_id": msg.conversation_id,
        "owner": emails.get(msg.conversation.owner),  # None: a guest or a service key
        "model": msg.model,
        "status": "running" if state == "running" else "queued",
        "age_s": round(max(0.0, now - since), 1),
        "worker": meta.get("worker") if state == "running" else None,
        "leased": leased,
    }


def _emails(s, owners: set[str]) -> dict[str, str | None]:
    if not owners:
        return {}
    rows = s.execute(select(User.owner, User.email).where(User.owner.in_(owners)))
    return dict(rows.all())


def _recent_errors(s) -> list[dict[str, Any]]:
    """Answers that ended in an error in the last day, by code, most frequent first."""
    rows = s.scalars(
        select(Message.error)
        .where(Message.status == models.ERROR, Message.created_at > utcnow() - RECENT)
        .order_by(Message.seq.desc())
        .limit(2000)
    )
    counts = Counter((e or {}).get("code", "unknown") for e in rows)
    return [{"code": code, "count": n} for code, n in counts.most_common()]
