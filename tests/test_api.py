"""The HTTP contract: status codes, JSON errors, ownership, and safe event framing."""

from __future__ import annotations

import pytest

from tests.helpers import kinds, new_conversation, read_events, send, start, text


def error_of(response) -> dict:
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


def test_create_and_list_conversations_newest_first(client):
    first = client.post("/api/conversations")
    second = client.post("/api/conversations")
    assert first.status_code == second.status_code == 201
    assert set(first.get_json()) >= {"id", "title", "created_at"}
    listed = client.get("/api/conversations").get_json()["conversations"]
    assert [c["id"] for c in listed] == [second.get_json()["id"], first.get_json()["id"]]


def test_identity_cookie_is_httponly_and_lax(client):
    response = client.post("/api/conversations")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_non_json_post_is_415(client):
    cid = client.post("/api/conversations").get_json()["id"]
    response = client.post(f"/api/conversations/{cid}/messages", data="content=hi")
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "invalid_json"),
        ({}, "invalid_content"),
        ({"content": "   "}, "invalid_content"),
        ({"content": 5}, "invalid_content"),
        ({"content": "hi", "model": 3}, "invalid_model"),
        ({"content": "hi", "stream": "yes"}, "invalid_stream"),
    ],
)
def test_bad_message_is_400_and_stores_nothing(client, body, code):
    cid = client.post("/api/conversations").get_json()["id"]
    response = client.post(f"/api/conversations/{cid}/messages", json=body)
    assert response.status_code == 400
    assert error_of(response)["code"] == code
    assert client.get(f"/api/conversations/{cid}").get_json()["messages"] == []


def test_malformed_json_is_400(client):
    cid = client.post("/api/conversations").get_json()["id"]
    response = client.post(
        f"/api/conversations/{cid}/messages", data="{oops", content_type="application/json"
    )
    assert response.status_code == 400


def test_oversized_message_is_413_and_stores_nothing(client, app):
    cid = client.post("/api/conversations").get_json()["id"]
    too_long = "x" * (int(app.config["MAX_MESSAGE_CHARS"]) + 1)
    response = client.post(f"/api/conversations/{cid}/messages", json={"content": too_long})
    assert response.status_code == 413
    assert error_of(response)["code"] == "message_too_long"
    assert client.get(f"/api/conversations/{cid}").get_json()["messages"] == []


def test_oversized_body_is_413_json(client, app):
    cid = client.post("/api/conversations").get_json()["id"]
    huge = "x" * (int(app.config["MAX_CONTENT_LENGTH"]) + 10)
    response = client.post(f"/api/conversations/{cid}/messages", json={"content": huge})
    assert response.status_code == 413
    error_of(response)


def test_wrong_method_is_405_json(client):
    response = client.delete("/api/conversations")
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


def test_unknown_ids_are_404(client):
    assert client.get("/api/conversations/nope").status_code == 404
    assert client.get("/api/generations/nope").status_code == 404
    assert client.get("/api/generations/nope/events").status_code == 404
    assert client.post("/api/generations/nope/cancel").status_code == 404
    response = client.post("/api/conversations/nope/messages", json={"content": "hi"})
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.e2e
def test_other_identity_sees_404_everywhere(http, other_http, model_server):
    model = model_server.script(chunks=["private"])
    cid, gen = start(http, model)
    read_events(http, gen["events_url"])
    for method, url in [
        ("GET", f"/api/conversations/{cid}"),
        ("GET", f"/api/generations/{gen['id']}"),
        ("GET", gen["events_url"]),
        ("POST", gen["cancel_url"]),
    ]:
        response = other_http.request(method, url)
        assert response.status_code == 404, url
        assert "private" not in response.text
    response = other_http.post(f"/api/conversations/{cid}/messages", json={"content": "x"})
    assert response.status_code == 404
    assert other_http.get("/api/conversations").json()["conversations"] == []
    assert http.get(f"/api/conversations/{cid}").status_code == 200


@pytest.mark.e2e
def test_bad_cursor_is_400(http, model_server):
    _, gen = start(http, model_server.script())
    for cursor in ("abc", "1-2-3", "-1", "1-x", "1 2"):
        response = http.get(gen["events_url"], headers={"Last-Event-ID": cursor})
        assert response.status_code == 400, cursor
        assert response.json()["error"]["code"] == "invalid_cursor"


@pytest.mark.e2e
def test_cursor_beyond_redis_ids_is_400_under_every_name(http, model_server):
    # It passed the old pattern and made the process's shared XREAD fail for every stream.
    model = model_server.script(chunks=["a", "b"])
    _, gen = start(http, model)
    url = gen["events_url"]
    for cursor in ("0-18446744073709551616", "18446744073709551616-0", "99999999999999999999"):
        for response in (
            http.get(url, headers={"Last-Event-ID": cursor}),
            http.get(url, params={"after": cursor}),
            http.get(url, params={"lastEventId": cursor}),
        ):
            assert response.status_code == 400, (cursor, response.request.url)
            assert response.json()["error"]["code"] == "invalid_cursor"
    events = read_events(http, url)
    assert text(events) == "ab"
    largest = "18446744073709551615-18446744073709551615"
    assert http.get(url, headers={"Last-Event-ID": largest}).status_code == 204


@pytest.mark.e2e
def test_text_cannot_forge_sse_events(http, model_server):
    nasty = "a\r\n\r\ndata: x\n\nevent: done\r\nid: 9-9\rdata: {}\n"
    model = model_server.script(chunks=[nasty, "tail"])
    cid = new_conversation(http)
    gen = send(http, cid, "user says \r\n\r\ndata: x", model)
    events = read_events(http, gen["events_url"])
    assert kinds(events) == ["delta", "done"]
    assert text(events) == nasty + "tail"
    user = http.get(f"/api/conversations/{cid}").json()["messages"][0]
    assert user["content"] == "user says \r\n\r\ndata: x"


@pytest.mark.e2e
def test_second_message_while_answering_is_409(http, model_server):
    model = model_server.script(chunks=["slow"], first_delay=2)
    cid, gen = start(http, model)
    response = http.post(f"/api/conversations/{cid}/messages", json={"content": "again"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "generation_in_progress"
    read_events(http, gen["events_url"])
    assert send(http, cid, "now it is fine", model)


@pytest.mark.e2e
def test_page_carries_no_secret(http, settings):
    page = http.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    for secret in (settings["OPENAI_API_KEY"], settings["SECRET_KEY"]):
        assert secret not in page.text


def test_too_many_messages_is_429_and_stores_nothing(make_app, model_server, worker):
    app = make_app(TIDECHAT_RATE_LIMIT_MESSAGES='"2/minute"')
    client = app.test_client()
    cid = client.post("/api/conversations").get_json()["id"]
    model = model_server.script(chunks=["ok"])
    for _ in range(2):
        response = client.post(
            f"/api/conversations/{cid}/messages",
            json={"content": "hi", "model": model, "stream": False},
        )
        assert response.status_code == 200
    response = client.post(
        f"/api/conversations/{cid}/messages", json={"content": "more", "model": model}
    )
    assert response.status_code == 429
    assert error_of(response)["code"] == "rate_limited"
    assert len(client.get(f"/api/conversations/{cid}").get_json()["messages"]) == 4
    other = app.test_client()  # another identity has its own allowance
    other_cid = other.post("/api/conversations").get_json()["id"]
    response = other.post(
        f"/api/conversations/{other_cid}/messages", json={"content": "hi", "model": model}
    )
    assert response.status_code == 202
