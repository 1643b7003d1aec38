"""Health for operators and load balancers.

- ``GET /healthz``: 200 while the process is alive; no I/O at all.
- ``GET /readyz``: Redis and the database, each within ``READY_TIMEOUT`` seconds: 200, or
  503 naming the failing part. Also the workers whose heartbeat is recent
  (worker/heartbeat.py): which are alive, how many answers each runs, and whether their
  stream writer and lease keeper work. Workers do not make the web process unready: it can
  still serve history and streams. The worker list (hosts, pids) is shown to the operator
  only (:func:`operator`); everyone else sees the counts.
- ``flask --app app health``: the same report, for a shell; exit status 1 when not ready.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import click
import redis
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from tidechat import db, metrics, redis_conn

bp = Blueprint("health", __name__)
_CLIENT = "tidechat.health_redis"


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    report, ready = readiness(current_app._get_current_object())
    if not operator():  # the public URL: counts, not hosts and pids
        report.pop("workers", None)
    return jsonify(report), 200 if ready else 503


@bp.get("/metrics")
def metrics_endpoint():
    if not operator():  # the public URL must not expose them (nor say they exist)
        return jsonify({"error": {"code": "not_found", "message": "Not found."}}), 404
    app = current_app._get_current_object()
    body = metrics.exposition(app, _redis(app, float(app.config["READY_TIMEOUT"])))
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


def operator(by_address: bool = True) -> bool:
    """Whether this request is the operator's: ``Authorization: Bearer <OPS_TOKEN>``, or
    (``by_address``) from an address in ``OPS_ALLOW`` (after ProxyFix: the client's real
    address; behind a proxy on the same host set TRUSTED_PROXIES, or every visitor is
    loopback)."""
    token = str(current_app.config.get("OPS_TOKEN") or "")
    sent = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    if not by_address:
        return False
    allowed = str(current_app.config.get("OPS_ALLOW") or "").split(",")
    return (request.remote_addr or "") in {a.strip() for a in allowed if a.strip()}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)

    @app.cli.command("health")
    def health() -> None:
        """Print Redis, database and worker health as JSON; exit 1 if not ready."""
        report, ready = readiness(app)
        click.echo(json.dumps(report, indent=2))
        if not ready:
            raise SystemExit(1)


def readiness(app: Flask) -> tuple[dict[str, Any], bool]:
    timeout = float(app.config["READY_TIMEOUT"])
    r = _redis(app, timeout)
    checks = _run_all({"redis": r.ping, "database": lambda: _select_one(app)}, timeout)
    failing = sorted(name for name, check in checks.items() if not check["ok"])
    report: dict[str, Any] = {"status": "unavailable" if failing else "ok", "checks": checks}
    if failing:
        report["failing"] = failing
    if checks["redis"]["ok"]:
        from worker import heartbeat

        try:
            workers = heartbeat.alive(app, r)
        except redis.RedisError as exc:
            report["workers_error"] = type(exc).__name__
        else:
            report["workers"] = workers
            report["worker_count"] = {
                "alive": len(workers),
                "healthy": sum(w["healthy"] for w in workers),
                "running": sum(w["running"] for w in workers),
            }
    return report, not failing


def _redis(app: Flask, timeout: float) -> redis.Redis:
    client = app.extensions.get(_CLIENT)
    if client is None:
        client = app.extensions[_CLIENT] = redis_conn.client(
            app.config["REDIS_URL"], socket_timeout=timeout, socket_connect_timeout=timeout
        )
    return client


def _select_one(app: Flask) -> None:
    with db.session_scope(app) as s:
        s.execute(text("SELECT 1"))


def _run_all(checks: dict[str, Callable[[], Any]], timeout: float) -> dict[str, dict]:
    """Run the checks at once, each within ``timeout``: {name: {"ok", "ms", "error"?}}."""
    results: dict[str, dict] = {}

    def run(name: str, check: Callable[[], Any]) -> None:
        started = time.monotonic()
        try:
            check()
            results[name] = {"ok": True}
        except Exception as exc:  # any failure of the part is the finding
            results[name] = {"ok": False, "error": type(exc).__name__}
        results[name]["ms"] = round((time.monotonic() - started) * 1000, 1)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in checks.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for name in checks:
        results.setdefault(name, {"ok": False, "error": "timed out", "ms": timeout * 1000})
    return dict(results)
