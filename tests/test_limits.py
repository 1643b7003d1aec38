"""Abuse and cost limits: rates per account and per address, caps, backlog, quota, models,
context budget, open streams and slow bodies. Each is a finding of the security review."""

from __future__ import annotations

import socket
import time
import uuid

import httpx
import pytest

from tests.faults import PrivateRedis
from tests.helpers import read_events, send
from tests.stack import start_web, start_worker
from tidechat import policy

# ProxyFix trusts one proxy: X-Forwarded-For names the client (as Heroku's router does).
BEHIND_ROUTER = {"TIDECHAT_TRUSTED_PROXIES": "1"}


def no_worker_queue() -> dict[str, str]:
    """A queue of its own that no worker takes from: answers stay queued."""
    return {"TIDECHAT_CELERY_QUEUE": f"limits-no-worker-{uuid.uuid4().hex[:8]}"}


def from_ip(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def code_of(response) -> str:
    return response.get_json()["error"]["code"]


def post_answer(client, model: str, ip: str = "198.51.100.1"):
    cid = client.post("/api/conversations", headers=from_ip(ip)).get_json()["id"]
    return client.post(
        f"/api/conversations/{cid}/messages",
        json={"content": "hi", "model": model},
        headers=from_ip(ip),
    )


def test_a_fresh_cookie_per_request_still_hits_the_per_address_limit(make_app, model_server):
    app = make_app(TIDECHAT_RATE_LIMIT_MESSAGES_IP="3/minute", **BEHIND_ROUTER, **no_worker_queue())
    model = model_server.script(chunks=["ok"])
    ip = f"203.0.113.{uuid.uuid4().int % 250}"
    statuses = [post_answer(app.test_client(), model, ip).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    refused = post_answer(app.test_client(), model, ip)
    assert code_of(refused) == "rate_limited"
    # when to come back: the minute's window ends within the minute
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert 0 <= int(refused.headers["X-RateLimit-Reset"]) - time.time() <= 61
    assert post_answer(app.test_client(), model, "192.0.2.200").status_code == 202


def test_send_regenerate_and_continue_share_one_bucket(make_app, model_server):
    app = make_app(TIDECHAT_RATE_LIMIT_MESSAGES="2/minute", **no_worker_queue())
    client = app.test_client()
    model = model_server.script(chunks=["ok"])
    cid = client.post("/api/conversations").get_json()["id"]
    gid = send_and_cancel(client, cid, model)
    regenerated = client.post(f"/api/conversations/{cid}/regenerate")
    assert regenerated.status_code == 202
    assert gid  # one send and one regenerate spent the bucket
    cancel(client, regenerated.get_json()["generation"]["id"])
    response = client.post(f"/api/conversations/{cid}/regenerate")
    assert response.status_code == 429 and code_of(response) == "rate_limited"


def send_and_cancel(client, cid: str, model: str) -> str:
    sent = client.post(f"/api/conversations/{cid}/messages", json={"content": "hi", "model": model})
    assert sent.status_code == 202
    gid = sent.get_json()["generation"]["id"]
    cancel(client, gid)
    return gid


def cancel(client, gid: str) -> None:
    assert client.post(f"/api/generations/{gid}/cancel").status_code == 200


def test_an_answer_refused_for_any_reason_does_not_use_up_the_rate(make_app, model_server):
    """Only answers started count: a refusal (here the cap on answers at once) and a
    client that keeps trying while refused give their count back."""
    app = make_app(
        TIDECHAT_RATE_LIMIT_MESSAGES="2/minute", TIDECHAT_MAX_ACTIVE_ANSWERS="1",
        **no_worker_queue(),
    )  # fmt: skip
    client = app.test_client()
    model = model_server.script(chunks=["ok"])
    first = post_answer(client, model)
    assert first.status_code == 202
    for _ in range(3):
        refused = post_answer(client, model)
        assert refused.status_code == 429 and code_of(refused) == "too_many_answers"
    cancel(client, first.get_json()["generation"]["id"])
    second = post_answer(client, model)
    assert second.status_code == 202  # 2 of 2: the refusals took nothing
    cancel(client, second.get_json()["generation"]["id"])
    for _ in range(2):
        refused = post_answer(client, model)
        assert refused.status_code == 429 and code_of(refused) == "rate_limited"
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert "2 per 1 minute per account" in refused.get_json()["error"]["message"]


def test_the_api_door_draws_on_the_same_rate_and_says_so_in_openais_shape(
    make_app, model_server
):
    app = make_app(TIDECHAT_RATE_LIMIT_MESSAGES="1/minute", **no_worker_queue())
    page = app.test_client()
    key = page.post("/api/keys", json={"name": "rate"}).get_json()["key"]
    model = model_server.script(chunks=["ok"])
    assert post_answer(page, model).status_code == 202
    refused = page.post(
        "/v1/responses",
        json={"model": model, "input": "hi", "background": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert refused.status_code == 429
    error = refused.get_json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["X-RateLimit-Remaining"] == "0"


def test_answer_rates_survive_redis_forgetting_its_scripts(make_app, model_server, tmp_path):
    """The count is one EVALSHA in the admission's pipeline: a restarted Redis (no
    scripts) gets it loaded again, and the answer is counted once."""
    server = PrivateRedis(tmp_path).start()
    try:
        app = make_app(REDIS_URL=server.url, TIDECHAT_RATE_LIMIT_MESSAGES="2/minute")
        client = app.test_client()
        model = model_server.script(chunks=["ok"])
        first = post_answer(client, model)
        assert first.status_code == 202
        cancel(client, first.get_json()["generation"]["id"])
        server.client().script_flush()
        assert post_answer(client, model).status_code == 202
        assert code_of(post_answer(client, model)) == "rate_limited"
    finally:
        server.stop()


def test_every_write_is_limited_creating_and_renaming_included(make_app):
    app = make_app(TIDECHAT_RATE_LIMIT_WRITES="3/minute")
    client = app.test_client()
    cid = client.post("/api/conversations").get_json()["id"]
    assert client.patch(f"/api/conversations/{cid}", json={"title": "a"}).status_code == 200
    assert client.post("/api/conversations").status_code == 201
    response = client.patch(f"/api/conversations/{cid}", json={"title": "b"})
    assert response.status_code == 429 and code_of(response) == "rate_limited"
    assert client.post("/api/conversations").status_code == 429
    assert client.get(f"/api/conversations/{cid}").get_json()["title"] == "a"  # reads still work


def test_answers_do_not_use_up_the_writes_bucket(make_app, model_server):
    """Answers have a rate of their own: sending a message leaves the writes' budget for
    renames and deletes (answers used to count as writes too)."""
    app = make_app(TIDECHAT_RATE_LIMIT_WRITES="2/minute", **no_worker_queue())
    client = app.test_client()
    cid = client.post("/api/conversations").get_json()["id"]  # write 1 of 2
    sent = client.post(
        f"/api/conversations/{cid}/messages",
        json={"content": "hi", "model": model_server.script(chunks=["ok"])},
    )
    assert sent.status_code == 202
    assert client.patch(f"/api/conversations/{cid}", json={"title": "a"}).status_code == 200
    response = client.patch(f"/api/conversations/{cid}", json={"title": "b"})
    assert response.status_code == 429 and code_of(response) == "rate_limited"


def test_sign_in_attempts_are_limited_per_address(make_app):
    app = make_app(TIDECHAT_RATE_LIMIT_AUTH_IP="3/minute", **BEHIND_ROUTER)
    ip = f"192.0.2.{uuid.uuid4().int % 250}"
    body = {"email": "someone@example.com", "password": "wrong-password"}
    codes = [
        app.test_client().post("/api/auth/login", json=body, headers=from_ip(ip)).status_code
        for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]


def test_concurrent_answers_are_capped_per_account_and_freed_when_one_ends(make_app, model_server):
    app = make_app(TIDECHAT_MAX_ACTIVE_ANSWERS="2", **no_worker_queue())
    client = app.test_client()
    model = model_server.script(chunks=["ok"])
    sent = [post_answer(client, model) for _ in range(2)]
    assert [r.status_code for r in sent] == [202, 202]
    refused = post_answer(client, model)
    assert refused.status_code == 429 and code_of(refused) == "too_many_answers"
    assert int(refused.headers["Retry-After"]) > 0
    titles = [c["title"] for c in client.get("/api/conversations").get_json()["conversations"]]
    assert titles.count("hi") == 2  # the refused message was not stored
    gid = sent[0].get_json()["generation"]["id"]
    client.post(f"/api/generations/{gid}/cancel")
    assert post_answer(client, model).status_code == 202
    assert post_answer(app.test_client(), model).status_code == 202  # someone else: not capped


def test_concurrent_answers_are_capped_per_address_across_identities(make_app, model_server):
    app = make_app(TIDECHAT_MAX_ACTIVE_ANSWERS_IP="2", **BEHIND_ROUTER, **no_worker_queue())
    model = model_server.script(chunks=["ok"])
    ip = f"198.51.100.{uuid.uuid4().int % 250}"
    codes = [post_answer(app.test_client(), model, ip).status_code for _ in range(3)]
    assert codes == [202, 202, 429]


@pytest.mark.e2e
def test_an_answer_leaves_its_account_and_address_places_as_it_ends(make_app, model_server, worker):
    # Left there, every later answer's admission would read the states of ended ones
    # (two more round trips per message) until it found them over and dropped them.
    app = make_app(TIDECHAT_MAX_ACTIVE_ANSWERS_IP="5", **BEHIND_ROUTER)
    client = app.test_client()
    ip = f"198.51.100.{uuid.uuid4().int % 250}"
    cid = client.post("/api/conversations", headers=from_ip(ip)).get_json()["id"]
    done = client.post(
        f"/api/conversations/{cid}/messages",
        json={"content": "hi", "model": model_server.script(chunks=["o", "k"]), "stream": False},
        headers=from_ip(ip),
    )
    assert done.status_code == 200 and done.get_json()["message"]["content"] == "ok"
    gid = done.get_json()["message"]["generation_id"]
    r, keys = app.extensions["stream_bus"].redis, app.extensions["redis_keys"]
    places = r.hget(keys.generation(gid).meta, "active").decode().split("\n")
    assert len(places) == 2 and keys.active(f"ip:{ip}") in places  # and its account's
    # the worker leaves them right after it writes the end the client saw
    deadline = time.monotonic() + 5
    while any(r.zscore(p, gid) is not None for p in places) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r.zscore(p, gid) for p in places] == [None, None]


def test_a_deep_backlog_is_429_with_retry_after(make_app, model_server):
    app = make_app(TIDECHAT_MAX_QUEUED="2", **no_worker_queue())
    model = model_server.script(chunks=["ok"])
    assert [post_answer(app.test_client(), model).status_code for _ in range(2)] == [202, 202]
    refused = post_answer(app.test_client(), model)
    assert refused.status_code == 429 and code_of(refused) == "server_busy"
    assert int(refused.headers["Retry-After"]) > 0


@pytest.mark.e2e
def test_the_daily_token_quota_counts_usage_and_estimates_without_it(
    make_app, model_server, worker
):
    app = make_app(TIDECHAT_DAILY_TOKENS="30")
    client = app.test_client()
    with_usage = model_server.script(chunks=["ok"], usage={"total_tokens": 20})
    without = model_server.script(chunks=["x" * 80], usage=None)  # about 20 tokens, estimated
    cid = client.post("/api/conversations").get_json()["id"]
    for model in (with_usage, without):
        done = client.post(
            f"/api/conversations/{cid}/messages",
            json={"content": "hi", "model": model, "stream": False},
        )
        assert done.status_code == 200
    refused = client.post(f"/api/conversations/{cid}/messages", json={"content": "more"})
    assert refused.status_code == 429 and code_of(refused) == "quota_exceeded"
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert app.test_client().post("/api/conversations").status_code == 201  # others are fine


def test_only_allowed_models_are_offered_and_accepted(make_app, model_server):
    listed = model_server.script(chunks=["ok"])
    app = make_app(**no_worker_queue())
    client = app.test_client()
    catalog = client.get("/api/models").get_json()
    assert listed in catalog["models"]
    assert "backend" not in catalog  # no host:port of the model server
    assert model_server.base_url.split("//")[1].split("/")[0] not in str(catalog)
    cid = client.post("/api/conversations").get_json()["id"]
    for bad in ("gpt-made-up", "ft:gpt-4o:someone-elses-org"):
        response = client.post(
            f"/api/conversations/{cid}/messages", json={"content": "hi", "model": bad}
        )
        assert response.status_code == 400 and code_of(response) == "unknown_model"
        response = client.patch(f"/api/conversations/{cid}", json={"model": bad})
        assert response.status_code == 400 and code_of(response) == "unknown_model"
    assert client.get(f"/api/conversations/{cid}").get_json()["messages"] == []
    assert model_server.requests_for("gpt-made-up") == []  # nothing went upstream


def test_configured_models_narrow_the_list(make_app, model_server):
    allowed = model_server.script(chunks=["ok"])
    hidden = model_server.script(chunks=["ok"])
    app = make_app(TIDECHAT_MODELS=f"{allowed}", **no_worker_queue())
    client = app.test_client()
    assert client.get("/api/models").get_json()["models"] == [app.config["DEFAULT_MODEL"], allowed]
    cid = client.post("/api/conversations").get_json()["id"]
    response = client.post(
        f"/api/conversations/{cid}/messages", json={"content": "hi", "model": hidden}
    )
    assert response.status_code == 400


def test_the_context_budget_drops_oldest_turns_and_keeps_the_system_prompt():
    system = {"role": "system", "content": "S" * 400}  # ~100 tokens
    turns = []
    for i in range(10):
        turns += [
            {"role": "user", "content": f"q{i} " + "u" * 200},
            {"role": "assistant", "content": f"a{i} " + "a" * 200},
        ]
    question = {"role": "user", "content": "the question"}
    fitted = policy.fit_context([system, *turns, question], budget=400)
    assert fitted[0] == system and fitted[-1] == question
    assert fitted[1]["role"] == "user"  # history starts at a question
    assert sum(policy.message_tokens(m) for m in fitted) <= 400
    assert fitted[1:-1] == turns[-len(fitted) + 2 :]  # the newest turns, in order


@pytest.fixture(scope="module")
def tight_stack(process_env, workdir):
    """A web process and a worker of their own with small budgets and caps."""
    env = {
        **process_env,
        "TIDECHAT_CELERY_QUEUE": f"limits-{uuid.uuid4().hex[:8]}",
        "TIDECHAT_CONTEXT_TOKENS": "300",
        "TIDECHAT_MAX_OUTPUT_TOKENS": "64",
        "TIDECHAT_MAX_STREAMS": "2",
        "TIDECHAT_BODY_TIMEOUT": "1",
    }
    worker = start_worker(env, workdir, "worker-limits")
    web = start_web(env, workdir, "web-limits")
    yield web
    web.stop()
    worker.stop()


@pytest.mark.e2e
def test_the_upstream_request_stays_within_the_context_budget(tight_stack, model_server):
    model = model_server.script(chunks=["short answer"])
    with httpx.Client(base_url=tight_stack.url, timeout=30) as http:
        cid = http.post("/api/conversations").json()["id"]
        http.patch(f"/api/conversations/{cid}", json={"system_prompt": "Be brief."})
        for turn in range(8):
            gen = send(http, cid, f"turn {turn} " + "words " * 60, model)
            read_events(http, gen["events_url"])
    sent = model_server.requests_for(model)
    assert len(sent) == 8
    last = sent[-1].body
    assert last["max_tokens"] == 64
    messages = last["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[-1]["content"].startswith("turn 7 ")
    assert not any(m["content"].startswith("turn 0 ") for m in messages)
    assert sum(policy.message_tokens(m) for m in messages) <= 300
    # the first request had room for everything
    assert len(sent[0].body["messages"]) == 2


@pytest.mark.e2e
def test_open_streams_are_capped_per_account(tight_stack, model_server):
    model = model_server.script(chunks=["a"] * 40, delay=0.25)
    with httpx.Client(base_url=tight_stack.url, timeout=30) as http:
        cid = http.post("/api/conversations").json()["id"]
        url = send(http, cid, "hi", model)["events_url"]
        with http.stream("GET", url) as one, http.stream("GET", url) as two:
            assert one.status_code == 200 and two.status_code == 200
            third = http.get(url)
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "too_many_streams"
        # closed streams free their slots
        deadline = time.monotonic() + 10
        while (status := http.get(url, params={"after": "0"}, timeout=30).status_code) == 429:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert status == 200


@pytest.mark.e2e
def test_a_body_that_trickles_in_is_cut_off_with_408(tight_stack):
    host, port = tight_stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /api/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        started = time.monotonic()
        reply = conn.recv(4096)
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert waited < 8


@pytest.mark.e2e
def test_one_busy_account_does_not_starve_another(process_env, workdir, web, model_server):
    """On a worker with room for one answer, a second person's answer goes before the
    third and fourth of someone who queued four."""
    queue = {"TIDECHAT_CELERY_QUEUE": f"limits-fair-{uuid.uuid4().hex[:8]}"}
    env = {**process_env, **queue}
    worker = start_worker(env, workdir, "worker-fair", concurrency=1)
    server = start_web(env, workdir, "web-fair")
    try:
        busy = [model_server.script(chunks=["a", "b", "c"], delay=0.3) for _ in range(4)]
        other = model_server.script(chunks=["mine"])
        with (
            httpx.Client(base_url=server.url, timeout=30) as a,
            httpx.Client(base_url=server.url, timeout=30) as b,
        ):
            gens = [send(a, a.post("/api/conversations").json()["id"], "hi", m) for m in busy]
            mine = send(b, b.post("/api/conversations").json()["id"], "hi", other)
            assert (
                "".join(
                    e.data["text"] for e in read_events(b, mine["events_url"]) if e.event == "delta"
                )
                == "mine"
            )
            for gen in gens:
                read_events(a, gen["events_url"])
        started = {m: model_server.requests_for(m)[0].started for m in [*busy, other]}
        order = sorted(started, key=started.get)
        assert order.index(other) < order.index(busy[2]), order
    finally:
        server.stop()
        worker.stop()


@pytest.mark.e2e
def test_api_streams_count_against_the_same_cap_and_start_nothing_past_it(
    tight_stack, model_server
):
    import openai

    with httpx.Client(base_url=tight_stack.url, timeout=30) as http:
        key = http.post("/api/keys", json={}).json()["key"]
    client = openai.OpenAI(base_url=tight_stack.url + "/v1", api_key=key, max_retries=0)
    slow = model_server.script(chunks=["a"] * 40, delay=0.25)
    streams = [
        client.responses.create(model=slow, input="hi", background=True, stream=True)
        for _ in range(2)
    ]
    for stream in streams:
        next(iter(stream))  # open and flowing
    refused = model_server.script(chunks=["never"])
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model=refused, input="hi", stream=True)
    assert caught.value.body["code"] == "too_many_streams"
    assert model_server.requests_for(refused) == []
    for stream in streams:
        stream.close()
