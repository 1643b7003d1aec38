"""Metrics: exact counts after a scripted run, correct across gunicorn's processes, and
only for the operator."""

from __future__ import annotations

import uuid
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import new_conversation, read_events, send
from tests.stack import start_web, start_worker

pytestmark = pytest.mark.e2e
OPERATOR = {"Authorization": "Bearer ops-secret"}


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", headers=OPERATOR)
    assert response.status_code == 200, response.text
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture(scope="module")
def own_stack(process_env, workdir, key_prefix, redis_client):
    """A web process (two gunicorn workers) and a worker with a key prefix of their own,
    so the app-wide counts start at zero (under the session's, whose keys are deleted at
    its end: ``redis_client``)."""
    prefix = f"{key_prefix}metrics-{uuid.uuid4().hex[:8]}:"
    env = {
        **process_env,
        "TIDECHAT_KEY_PREFIX": prefix,
        "TIDECHAT_CELERY_QUEUE": prefix + "generate",
        "TIDECHAT_OPS_TOKEN": "ops-secret",
        "TIDECHAT_OPS_ALLOW": "",
    }
    with ExitStack() as stack:
        worker = start_worker(env, workdir, "worker-metrics")
        stack.callback(worker.stop)
        web = start_web(env, workdir, "web-metrics", workers=2)
        stack.callback(web.stop)
        yield web


def test_counts_after_a_scripted_run_are_exact(own_stack, model_server):
    ok = model_server.script(chunks=["one ", "two ", "three"])
    broken = model_server.script(status=500)
    slow = model_server.script(chunks=["a"] * 100, delay=0.1)
    with httpx.Client(base_url=own_stack.url, timeout=30) as http:
        for model in (ok, ok, broken):
            gen = send(http, new_conversation(http), "hi", model)
            read_events(http, gen["events_url"])
        gen = send(http, new_conversation(http), "hi", slow)
        head = read_events(http, gen["events_url"], limit=2)
        http.post(gen["cancel_url"])
        rest = read_events(http, gen["events_url"], cursor=head[-1].id)  # a resume
        assert rest[-1].data["finish_reason"] == "cancelled"
        m = scrape(http)

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("tidechat_generations_queued_total") == 4
    assert value("tidechat_generations_started_total") == 4
    assert value("tidechat_generations_finished_total", status="done", code="") == 2
    assert value("tidechat_generations_finished_total", status="error", code="upstream_error") == 1
    assert value("tidechat_generations_finished_total", status="cancelled", code="") == 1
    assert value("tidechat_answer_duration_seconds_count") == 4
    assert value("tidechat_time_to_first_token_seconds_count") == 3  # the error sent no text
    assert value("tidechat_tokens_relayed_total") >= 5
    assert value("tidechat_resumes_total", cursor="Last-Event-ID") == 1
    assert value("tidechat_queue_depth") == 0
    assert value("tidechat_workers", health="healthy") == 1


def test_open_streams_add_up_across_the_web_processes(own_stack, model_server):
    slow = model_server.script(chunks=["a"] * 60, delay=0.1)
    with httpx.Client(base_url=own_stack.url, timeout=30) as http:
        gen = send(http, new_conversation(http), "hi", slow)
        clients = [
            httpx.Client(base_url=own_stack.url, timeout=30, cookies=http.cookies) for _ in range(6)
        ]
        with ExitStack() as streams:
            for c in clients:
                streams.enter_context(c)
                response = streams.enter_context(c.stream("GET", gen["events_url"]))
                assert response.status_code == 200
            for _ in range(12):  # each scrape may land on either gunicorn worker
                with httpx.Client(base_url=own_stack.url, timeout=30) as fresh:
                    m = scrape(fresh)
                    assert m[("tidechat_open_streams", (("door", "page"),))] == 6
        http.post(gen["cancel_url"])


def test_metrics_are_for_the_operator_only(own_stack):
    with httpx.Client(base_url=own_stack.url, timeout=30) as http:
        assert http.get("/metrics").status_code == 404
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 404
        assert http.get("/metrics", headers=OPERATOR).status_code == 200


def test_histograms_scrape_as_cumulative_buckets(make_app):
    """Each value is stored in its one bin; the scrape adds them up into Prometheus's
    cumulative buckets, sum and count."""
    from tidechat import metrics

    prefix = f"tchist:{uuid.uuid4().hex[:8]}:"
    app = make_app(TIDECHAT_KEY_PREFIX=prefix, TIDECHAT_OPS_TOKEN="ops-secret")
    r, keys = app.extensions["stream_bus"].redis, app.extensions["redis_keys"]
    try:
        with r.pipeline(transaction=False) as pipe:
            for value in (0.07, 0.3, 0.5, 100.0):  # 0.5 sits on a bound: le="0.5" holds it
                metrics.observe(pipe, keys, "ttft_seconds", value)
            pipe.execute()
        text = app.test_client().get("/metrics", headers=OPERATOR).get_data(as_text=True)
        m = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                m[(sample.name, sample.labels.get("le"))] = sample.value
        name = "tidechat_time_to_first_token_seconds"
        buckets = {le: m[(name + "_bucket", le)] for le in ("0.05", "0.1", "0.25", "0.5", "60.0")}
        assert buckets == {"0.05": 0, "0.1": 1, "0.25": 1, "0.5": 3, "60.0": 3}
        assert m[(name + "_bucket", "+Inf")] == 4 and m[(name + "_count", None)] == 4
        assert m[(name + "_sum", None)] == pytest.approx(100.87)
    finally:
        r.delete(keys.metrics())
