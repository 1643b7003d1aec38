"""The OpenAI-compatible API (/v1), driven by the official ``openai`` Python SDK as shipped:
models, Chat Completions, and Responses in background mode with exact resume."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.stack import ROOT, start_web

pytestmark = pytest.mark.e2e

ANSWER = ["The ", "tide ", "comes ", "in, ", "the ", "tide ", "goes ", "out."]
TEXT = "".join(ANSWER)


def new_key(http: httpx.Client, name: str = "tests") -> str:
    response = http.post("/api/keys", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["key"]


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def client(web, http) -> openai.OpenAI:
    return sdk(web.url, new_key(http))


def deltas(events) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_models_lists_the_allowed_models(client, model_server, web):
    model = model_server.script(chunks=["ok"])
    # The backend's list is cached for a minute; a model it has just gained is listed
    # again at its first use, so the order of the tests does not matter.
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    names = [m.id for m in client.models.list()]
    assert model in names and names[0] == "gpt-4o-mini"


def test_chat_completion_without_and_with_streaming(client, model_server):
    model = model_server.script(chunks=ANSWER)
    messages = [{"role": "user", "content": "Say it."}]
    done = client.chat.completions.create(model=model, messages=messages)
    assert done.choices[0].message.content == TEXT
    assert done.choices[0].finish_reason == "stop"
    assert done.usage.total_tokens == 10  # the model server's own count

    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 10
    sent = model_server.requests_for(model)[-1].body
    assert sent["messages"] == [{"role": "user", "content": "Say it."}]


def test_chat_history_system_and_settings_reach_the_model(client, model_server):
    model = model_server.script(chunks=["ok"])
    client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        ],
        temperature=0.25,
        max_tokens=7,
    )
    sent = model_server.requests_for(model)[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again"},
    ]
    assert sent["temperature"] == 0.25 and sent["max_tokens"] == 7


def test_a_chat_client_that_hangs_up_stops_the_answer(client, model_server):
    model = model_server.script(chunks=["a"] * 60, delay=0.1)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "long"}], stream=True
    )
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            break
    stream.close()
    assert model_server.wait_for_hangup(model, 15) is not None, "the model kept generating"


def test_a_background_stream_cut_mid_answer_resumes_exactly_on_another_process(
    client, model_server, process_env, workdir, http
):
    model = model_server.script(chunks=ANSWER, delay=0.15)
    stream = client.responses.create(model=model, input="Say it.", background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(deltas(seen)) >= 8:
            break
    stream.close()  # the connection drops: a background answer goes on
    response_id = seen[0].response.id
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert seen[0].type == "response.created" and seen[0].response.background is True

    other = start_web(process_env, workdir, "web-openai-resume")
    try:
        again = sdk(other.url, client.api_key)
        rest = list(
            again.responses.retrieve(
                response_id, stream=True, starting_after=seen[-1].sequence_number
            )
        )
    finally:
        other.stop()
    numbers = [e.sequence_number for e in rest]
    assert numbers == list(range(seen[-1].sequence_number + 1, numbers[-1] + 1))
    assert deltas(seen) + deltas(rest) == TEXT  # nothing lost, nothing doubled
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.output_text == TEXT
    assert model_server.requests_for(model)[-1].hung_up is None  # never stopped

    final = client.responses.retrieve(response_id)
    assert final.status == "completed" and final.output_text == TEXT
    # an ordinary conversation: it is in its owner's sidebar, with the answer
    convs = http.get("/api/conversations").json()["conversations"]
    cid = next(c["id"] for c in convs if c["title"] == "Say it.")
    messages = http.get(f"/api/conversations/{cid}").json()["messages"]
    assert [m["content"] for m in messages] == ["Say it.", TEXT]


def test_polling_a_background_response_to_completed(client, model_server):
    model = model_server.script(chunks=ANSWER, delay=0.05)
    started = client.responses.create(model=model, input="Say it.", background=True)
    assert started.status in ("queued", "in_progress")
    deadline = time.monotonic() + 30
    response = started
    while response.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        response = client.responses.retrieve(started.id)
    assert response.status == "completed"
    assert response.output_text == TEXT
    assert response.usage.total_tokens == 10


def test_a_foreground_response_and_its_stream(client, model_server):
    model = model_server.script(chunks=ANSWER)
    done = client.responses.create(model=model, input="Say it.", instructions="Be terse.")
    assert done.status == "completed" and done.output_text == TEXT
    assert model_server.requests_for(model)[-1].body["messages"][0] == {
        "role": "system", "content": "Be terse.",
    }  # fmt: skip
    events = list(client.responses.create(model=model, input="Say it.", stream=True))
    assert [e.type for e in events[:4]] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    assert [e.type for e in events[-4:]] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert deltas(events) == TEXT and events[-4].text == TEXT


def test_cancel_stops_a_background_response_and_is_idempotent(client, model_server):
    model = model_server.script(chunks=["a"] * 100, delay=0.1)
    started = client.responses.create(model=model, input="long", background=True)
    model_server.wait_for_request(model, 15, chunks=2)
    cancelled = client.responses.cancel(started.id)
    assert model_server.wait_for_hangup(model, 15) is not None
    deadline = time.monotonic() + 15
    while cancelled.status != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.1)
        cancelled = client.responses.retrieve(started.id)
    assert client.responses.cancel(started.id).status == "cancelled"


def test_previous_response_id_carries_the_conversation(client, model_server):
    first_model = model_server.script(chunks=["Nice to meet you, Tide."])
    second_model = model_server.script(chunks=["You are Tide."])
    first = client.responses.create(model=first_model, input="My name is Tide.")
    second = client.responses.create(
        model=second_model, input="What is my name?", previous_response_id=first.id
    )
    assert second.output_text == "You are Tide."
    assert second.previous_response_id == first.id
    assert model_server.requests_for(second_model)[-1].body["messages"] == [
        {"role": "user", "content": "My name is Tide."},
        {"role": "assistant", "content": "Nice to meet you, Tide."},
        {"role": "user", "content": "What is my name?"},
    ]
    # going on from the first answer again branches: the second turn is not in it
    third = client.responses.create(
        model=second_model, input="And again?", previous_response_id=first.id
    )
    assert third.status == "completed"
    assert [m["content"] for m in model_server.requests_for(second_model)[-1].body["messages"]] == [
        "My name is Tide.", "Nice to meet you, Tide.", "And again?",
    ]  # fmt: skip


def test_a_bad_key_is_401_and_another_users_response_is_404(web, http, other_http, model_server):
    with pytest.raises(openai.AuthenticationError) as bad:
        sdk(web.url, "tc-not-a-key").models.list()
    assert bad.value.body["code"] == "invalid_api_key"
    bare = httpx.get(web.url + "/v1/models")  # no key at all
    assert bare.status_code == 401
    assert set(bare.json()["error"]) == {"message", "type", "code", "param"}

    mine, theirs = sdk(web.url, new_key(http)), sdk(web.url, new_key(other_http))
    model = model_server.script(chunks=["private"])
    response = mine.responses.create(model=model, input="secret")
    for call in (
        lambda: theirs.responses.retrieve(response.id),
        lambda: theirs.responses.cancel(response.id),
        lambda: list(theirs.responses.retrieve(response.id, stream=True)),
        lambda: theirs.responses.create(
            model=model, input="x", previous_response_id=response.id
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()


def test_bad_requests_are_400_in_openais_shape(client, model_server):
    model = model_server.script(chunks=["ok"])
    for kwargs, param in [
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, None),
        ({"model": model, "messages": []}, "messages"),
        ({"model": model, "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ({"model": model, "messages": [{"role": "user", "content": "x"}], "temperature": 9},
         "temperature"),
    ]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**kwargs)
        assert caught.value.body["param"] == param
        assert caught.value.body["type"] == "invalid_request_error"


def test_a_failing_model_server_fails_the_response(client, model_server):
    model = model_server.script(status=500)
    events = list(client.responses.create(model=model, input="x", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.error.code == "upstream_error"
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502


def test_cli_service_keys_never_see_each_others_responses(settings, web, model_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDECHAT_")}
    env.update(settings)

    def cli_key() -> str:
        out = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", "api-key", "create"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return out.stdout.strip().splitlines()[-1]

    one, two = sdk(web.url, cli_key()), sdk(web.url, cli_key())
    model = model_server.script(chunks=["ok"])
    response = one.responses.create(model=model, input="mine")
    assert one.responses.retrieve(response.id).output_text == "ok"
    with pytest.raises(openai.NotFoundError):
        two.responses.retrieve(response.id)


def test_a_revoked_key_stops_working(web, http):
    key = new_key(http)
    listed = http.get("/api/keys").json()["keys"]
    assert listed[-1]["hint"] == "…" + key[-4:] and "key" not in listed[-1]
    assert sdk(web.url, key).models.list()
    assert http.delete(f"/api/keys/{listed[-1]['id']}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        sdk(web.url, key).models.list()
