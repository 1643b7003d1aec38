"""Conversation management: settings, rename, delete, regenerate, models."""

from __future__ import annotations

import time

import pytest

from tests.helpers import new_conversation, read_events, send, start, text, wait_status
from tests.stack import free_port
from tidechat import model_catalog


def test_rename_and_settings(client, model_server):
    cid = client.post("/api/conversations").get_json()["id"]
    m1 = model_server.script()  # a model the backend lists
    body = {"title": "Tides", "system_prompt": "Be brief.", "model": m1, "temperature": 0.3}
    response = client.patch(f"/api/conversations/{cid}", json=body)
    assert response.status_code == 200
    conv = client.get(f"/api/conversations/{cid}").get_json()
    assert (conv["title"], conv["system_prompt"], conv["model"], conv["temperature"]) == (
        "Tides", "Be brief.", m1, 0.3,
    )  # fmt: skip
    response = client.patch(f"/api/conversations/{cid}", json={"system_prompt": None})
    assert response.get_json()["system_prompt"] is None


@pytest.mark.parametrize(
    "body",
    [{"title": ""}, {"title": 5}, {"temperature": 3}, {"temperature": True}, {"colour": "red"},
     {"system_prompt": 7}],
)  # fmt: skip
def test_bad_settings_are_400(client, body):
    cid = client.post("/api/conversations").get_json()["id"]
    response = client.patch(f"/api/conversations/{cid}", json=body)
    assert response.status_code == 400
    assert client.get(f"/api/conversations/{cid}").get_json()["title"] == "New chat"


def test_models_lists_the_default_first_and_never_the_backend_address(
    client, app, model_server, make_app
):
    catalog = client.get("/api/models").get_json()
    assert catalog["default"] == app.config["DEFAULT_MODEL"]
    assert catalog["models"][0] == catalog["default"]
    host = model_server.base_url.split("//")[1].split("/")[0]
    assert "backend" not in catalog and host not in str(catalog)
    assert "sk-" not in str(catalog)
    labelled = make_app(TIDECHAT_BACKEND_LABEL="Our GPU box").test_client()
    assert labelled.get("/api/models").get_json()["backend"] == "Our GPU box"


def test_a_failed_model_listing_is_retried_soon(make_app, model_server, monkeypatch):
    # A backend busy with a long answer (llama.cpp's server) fails the listing; the picker
    # must not be stuck with the default alone for the whole cache period.
    app = make_app(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    client = app.test_client()
    assert client.get("/api/models").get_json()["models"] == [app.config["DEFAULT_MODEL"]]
    model = model_server.script(chunks=["listed"])
    app.config["OPENAI_BASE_URL"] = model_server.base_url
    later = time.monotonic() + model_catalog.RETRY_SECONDS + 1
    monkeypatch.setattr(model_catalog.time, "monotonic", lambda: later)
    assert model in client.get("/api/models").get_json()["models"]


@pytest.mark.e2e
def test_system_prompt_and_temperature_reach_the_model(http, model_server):
    model = model_server.script(chunks=["ok"])
    cid = new_conversation(http)
    http.patch(f"/api/conversations/{cid}", json={"system_prompt": "Be terse.", "temperature": 0.2})
    read_events(http, send(http, cid, "hello", model)["events_url"])
    body = model_server.requests_for(model)[-1].body
    assert body["messages"][0] == {"role": "system", "content": "Be terse."}
    assert body["temperature"] == 0.2


@pytest.mark.e2e
def test_conversation_model_is_used_when_the_message_names_none(http, model_server):
    model = model_server.script(chunks=["from the conversation's model"])
    cid = new_conversation(http)
    http.patch(f"/api/conversations/{cid}", json={"model": model})
    response = http.post(f"/api/conversations/{cid}/messages", json={"content": "hi"})
    events = read_events(http, response.json()["generation"]["events_url"])
    assert text(events) == "from the conversation's model"


@pytest.mark.e2e
def test_regenerate_replaces_the_last_answer(http, model_server):
    first = model_server.script(chunks=["first try"])
    second = model_server.script(chunks=["second try"])
    cid, gen = start(http, first, "question")
    read_events(http, gen["events_url"])
    response = http.post(f"/api/conversations/{cid}/regenerate", json={"model": second})
    assert response.status_code == 202
    regen = response.json()["generation"]
    assert regen["id"] != gen["id"]
    assert text(read_events(http, regen["events_url"])) == "second try"
    messages = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "question"),
        ("assistant", "second try"),
    ]
    assert model_server.requests_for(second)[-1].body["messages"] == [
        {"role": "user", "content": "question"}
    ]


@pytest.mark.e2e
def test_delete_stops_a_streaming_answer(http, model_server):
    model = model_server.script(chunks=[f"d{i} " for i in range(200)], delay=0.05)
    cid, gen = start(http, model)
    read_events(http, gen["events_url"], limit=3)
    assert http.delete(f"/api/conversations/{cid}").status_code == 204
    assert model_server.wait_for_hangup(model, timeout=5) is not None
    assert http.get(f"/api/conversations/{cid}").status_code == 404
    assert http.get(f"/api/generations/{gen['id']}").status_code == 404
    assert cid not in [c["id"] for c in http.get("/api/conversations").json()["conversations"]]


@pytest.mark.e2e
def test_regenerate_while_streaming_is_409(http, model_server):
    model = model_server.script(chunks=["slow"], first_delay=1.5)
    cid, gen = start(http, model)
    assert http.post(f"/api/conversations/{cid}/regenerate").status_code == 409
    wait_status(http, gen["id"], {"done"})


def test_regenerate_with_nothing_to_answer_is_400(client):
    cid = client.post("/api/conversations").get_json()["id"]
    response = client.post(f"/api/conversations/{cid}/regenerate")
    assert response.status_code == 400
