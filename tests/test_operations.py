"""The operator's view: answers running and queued (age, worker, owner), errors by code,
queue depth, and stopping any answer."""

from __future__ import annotations

import time
import uuid

import pytest

PASSWORD = "correct horse battery"


def signed_up(app, email: str):
    client = app.test_client()
    response = client.post("/api/auth/signup", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201
    return client


@pytest.mark.e2e
def test_admins_see_running_and_queued_answers_and_can_stop_any(make_app, model_server, worker):
    admin_email = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    app = make_app(TIDECHAT_ADMIN_EMAILS=admin_email, TIDECHAT_OPS_ALLOW="")
    admin = signed_up(app, admin_email)
    user_email = f"user-{uuid.uuid4().hex[:8]}@example.com"
    user = signed_up(app, user_email)
    assert user.get("/api/admin/answers").status_code == 404  # not advertised to users

    slow = model_server.script(chunks=["a"] * 100, delay=0.1)
    cid = user.post("/api/conversations").get_json()["id"]
    gid = user.post(
        f"/api/conversations/{cid}/messages", json={"content": "long", "model": slow}
    ).get_json()["generation"]["id"]
    model_server.wait_for_request(slow, 15, chunks=2)
    broken = model_server.script(status=500)
    other = user.post("/api/conversations").get_json()["id"]
    user.post(f"/api/conversations/{other}/messages", json={"content": "x", "model": broken})

    deadline = time.monotonic() + 15
    while True:
        view = admin.get("/api/admin/answers").get_json()
        mine = [a for a in view["running"] if a["generation_id"] == gid]
        errors = {e["code"]: e["count"] for e in view["errors"]}
        if mine and errors.get("upstream_error"):
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    row = mine[0]
    assert row["owner"] == user_email and row["model"] == slow and row["age_s"] >= 0
    assert row["worker"] and row["worker"].endswith(f":{worker.popen.pid}")
    assert isinstance(view["queue_depth"], int)

    stopped = admin.post(f"/api/admin/generations/{gid}/cancel")
    assert stopped.status_code in (200, 202)
    assert model_server.wait_for_hangup(slow, 15) is not None
    deadline = time.monotonic() + 15
    while user.get(f"/api/generations/{gid}").get_json()["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_operator_token_opens_the_view_without_an_account(make_app):
    app = make_app(
        TIDECHAT_OPS_TOKEN="ops-secret", TIDECHAT_OPS_ALLOW="", TIDECHAT_AUTH_MODE="open"
    )
    client = app.test_client()
    assert client.get("/api/admin/answers").status_code == 401
    response = client.get("/api/admin/answers", headers={"Authorization": "Bearer ops-secret"})
    assert response.status_code == 200 and "running" in response.get_json()


def test_a_loopback_address_alone_does_not_open_the_view(make_app):
    # Behind a proxy on the same host every visitor comes from 127.0.0.1: only a token or
    # an admin account opens the operator's view (metrics may go by address).
    client = make_app(TIDECHAT_OPS_ALLOW="127.0.0.1,::1").test_client()
    assert client.get("/api/admin/answers").status_code == 404
    assert client.post(f"/api/admin/generations/{'0' * 32}/cancel").status_code == 404
    assert client.get("/metrics").status_code == 200
