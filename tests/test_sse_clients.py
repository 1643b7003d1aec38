"""Real EventSource clients resume exactly, through two web processes and a faulty network.

The clients are the ones people use, as shipped, with default options: the npm package
event-source-polyfill in Chromium, the npm package eventsource in Node, and Chromium's
native EventSource (tests/clients/). They reach two gunicorn+gevent web processes (sharing
the session's Redis, database and Celery worker) through a loopback load balancer
(tests/lb_proxy.py) that the tests use to cut the network, stall it, and find the process a
client is attached to so as to SIGKILL or SIGTERM it.

Whatever happens, each client must end with exactly the stored answer: every event once, in
order, then ``done``; and then stop: at most one more request to the events URL after
``done``, answered 204, and no reconnect loop. The HTTP tests at the end pin the resume
cursor's three names and the database replay of an expired stream.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from tests.clients import (
    BROWSER_CLIENTS,
    CLIENTS,
    CLOSED,
    NPM_CLIENTS,
    BrowserClient,
    Chromium,
    Client,
    Follow,
    NodeClient,
    Record,
    WireEvent,
    ensure_node_modules,
    node_binary,
    parse_sse,
)
from tests.helpers import start
from tests.lb_proxy import Exchange, LoadBalancer
from tests.stack import WebProc, start_web
from tidechat.redis_keys import RedisKeys

pytestmark = pytest.mark.e2e

PING_INTERVAL = 1  # seconds of quiet before a keepalive `ping` event
RETRY_MS = 1000  # the `retry:` hint
GRACE = 2.0  # seconds a client stays open after `done`: its reconnect (1 s on) shows in it
MAX_GAP = 5.0  # the longest silence a client may see while its web process stops
PROMPT_END = 1.5  # seconds a SIGTERMed process may take to end its streams ("well under 1")


def words(n: int, stem: str = "w") -> list[str]:
    return [f"{stem}0", *(f" {stem}{i}" for i in range(1, n))]


ANSWER = words(30)  # with 40 ms between chunks: 1.2 s, so the cuts land mid-answer


# -- the stack: two web processes behind the load balancer ------------------------------------
class WebPair:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = {
            **env,
            "TIDECHAT_PING_INTERVAL": str(PING_INTERVAL),
            "TIDECHAT_SSE_RETRY_MS": str(RETRY_MS),
        }
        self.workdir = workdir
        # One at a time, from this thread: each dies with the thread that started it
        # (PR_SET_PDEATHSIG), so never from a pool's thread.
        self.procs: list[WebProc] = [self._start(0), self._start(1)]
        self.proxy = LoadBalancer([address(p) for p in self.procs])

    def _start(self, index: int) -> WebProc:
        return start_web(self.env, self.workdir, name=f"sse-web-{index}")

    def ensure_up(self) -> None:
        """Restart any process a test stopped (on a new port), and point the proxy at it."""
        for i, proc in enumerate(self.procs):
            if proc.popen.poll() is not None:
                self.procs[i] = self._start(i)
                self.proxy.set_backend(i, address(self.procs[i]))

    def stop(self) -> None:
        self.proxy.close()
        for proc in self.procs:
            proc.stop(signal.SIGKILL)


def address(proc: WebProc) -> tuple[str, int]:
    parts = urlsplit(proc.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


@pytest.fixture(scope="module")
def pair(process_env, workdir, worker) -> Iterator[WebPair]:
    stack = WebPair(process_env, workdir)
    yield stack
    stack.stop()


@pytest.fixture
def lb(pair: WebPair) -> Iterator[WebPair]:
    pair.ensure_up()
    yield pair
    pair.proxy.unstall()
    pair.proxy.unblock()


# -- the clients ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node_ready() -> None:
    reason = ensure_node_modules()
    if reason:
        pytest.skip(reason)
    if not Path(node_binary()).exists():
        pytest.skip("Node.js is not installed (apt-get install nodejs)")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS

    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e .[dev])")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (bin/test does)")
    browser = Chromium(CHROMIUM, CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def make_client(request, lb: WebPair) -> Iterator:
    made: list[Client] = []

    def make(name: str) -> Client:
        if name in NPM_CLIENTS:
            request.getfixturevalue("node_ready")
        if name in BROWSER_CLIENTS:
            chromium = request.getfixturevalue("chromium")
            client: Client = BrowserClient(chromium, lb.proxy.url, name)
        else:
            client = NodeClient(lb.proxy.url)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def follows() -> Iterator[list[Follow]]:
    """Followers to stop at the end of the test, whatever happened."""
    running: list[Follow] = []
    yield running
    for follow in running:
        follow.close()


def follow(follows: list[Follow], client: Client, url: str, grace: float = GRACE, **kw) -> Follow:
    run = client.follow(url, grace=grace, **kw)
    follows.append(run)
    return run


# -- what a client saw ------------------------------------------------------------------------
def events_of(records: list[Record]) -> list[Record]:
    """The answer's events (delta, done, error): every event but the keepalive."""
    return [r for r in records if r.kind == "event" and r.type != "ping"]


def deltas(records: list[Record]) -> int:
    return sum(1 for r in records if r.kind == "event" and r.type == "delta")


def text_of(records: list[Record]) -> str:
    """The text the deltas carried (deltas that arrive together may come as one event)."""
    return "".join(r.data["text"] for r in records if r.kind == "event" and r.type == "delta")


def errors_of(records: list[Record]) -> list[Record]:
    return [r for r in records if r.kind == "error"]


def cursor_sent(exchange: Exchange) -> str | None:
    """The resume cursor a request carried: the header, else ?after=, else ?lastEventId=."""
    query = parse_qs(urlsplit(exchange.line.split(" ")[1]).query)
    header = exchange.header("Last-Event-ID")
    return header or (query.get("after") or query.get("lastEventId") or [None])[0]


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def assert_exact_then_stops(
    client: Client, cid: str, gen: dict, records: list[Record], proxy: LoadBalancer
) -> list[Record]:
    """The client got the stored answer exactly once, ended with done, then stopped."""
    stored = client.wait_final(cid)
    assert stored["status"] == "done", stored
    events = events_of(records)
    ids = [e.id for e in events]
    assert all(ids), f"{client.name}: an answer event without an id: {events}"
    doubled = sorted({i for i in ids if ids.count(i) > 1})
    assert not doubled, f"{client.name}: event ids delivered more than once: {doubled}"
    assert ids == sorted(ids, key=id_key), f"{client.name}: events out of order: {ids}"
    text = "".join(e.data["text"] for e in events if e.type == "delta")
    assert text == stored["content"], f"{client.name} read {text!r}"
    assert [e.type for e in events].count("done") == 1, [e.type for e in events]
    assert events[-1].type == "done", f"{client.name}: did not end with done: {events[-3:]}"

    done_at = events[-1].t
    after = [x for x in proxy.exchanges_to(gen["events_url"]) if x.at > done_at]
    assert len(after) <= 1, (
        f"{client.name} kept reconnecting after done: {[(x.line, x.status) for x in after]}"
    )
    assert all(x.status == 204 for x in after), [(x.line, x.status) for x in after]
    end = records[-1]
    assert end.kind == "end" and end.ready_state == CLOSED, (
        f"{client.name} was still {end.ready_state} (not closed) {GRACE}s after done: "
        f"{records[-5:]}"
    )
    return events


def assert_resumed_with_cursor(
    client: Client, records: list[Record], exchanges: list[Exchange], cut_at: float
) -> Exchange:
    """The client noticed the cut, and its next request carried the id of the last event it
    had seen, where this client puts it."""
    noticed = [e for e in errors_of(records) if e.t >= cut_at]
    assert noticed, f"{client.name} never noticed the cut"
    before = [e for e in events_of(records) if e.t <= noticed[0].t]
    assert before, "the cut came before any event"
    resumed = [x for x in exchanges if x.at >= noticed[0].t]
    assert resumed, f"{client.name} never reconnected after the cut"
    first = resumed[0]
    assert cursor_sent(first) == before[-1].id, (first.head, before[-1])
    if client.name == "polyfill":
        assert first.header("Last-Event-ID") is None, first.head  # only ?lastEventId=
        assert f"lastEventId={before[-1].id}" in first.line, first.line
    else:
        assert first.header("Last-Event-ID") == before[-1].id, first.head
    return first


def attached_mid_answer(name, make_client, follows, lb, model):
    """A client 8 deltas into ``model``'s answer: (client, cid, gen, run, its backend)."""
    client = make_client(name)
    cid, gen = client.start(model)
    run = follow(follows, client, gen["events_url"])
    run.wait_until(lambda rs: deltas(rs) >= 8, 20, "no 8 deltas")

    attached = lb.proxy.backend_of(gen["events_url"])
    assert attached is not None, "the client's stream is not open through the proxy"
    return client, cid, gen, run, attached


# -- (a) the network drops mid-answer ---------------------------------------------------------
@pytest.mark.parametrize("name", CLIENTS)
def test_dropped_network_mid_answer_resumes_exactly(name, make_client, follows, lb, model_server):
    model = model_server.script(chunks=ANSWER, delay=0.04)
    client, cid, gen, run, _ = attached_mid_answer(name, make_client, follows, lb, model)
    cut_at = time.time()
    lb.proxy.drop()
    records = run.wait_ended()

    assert errors_of(records), f"{name} never noticed the cut"
    assert_exact_then_stops(client, cid, gen, records, lb.proxy)
    assert_resumed_with_cursor(client, records, lb.proxy.exchanges_to(gen["events_url"]), cut_at)
    assert len(model_server.requests_for(model)) == 1  # one generation, not restarted


@pytest.mark.parametrize("name", CLIENTS)
def test_keepalive_between_events_does_not_move_the_cursor(
    name, make_client, follows, lb, model_server
):
    """The model goes quiet after a few deltas; `ping` events (no id) fill the silence; the
    network drops right after one: the client resumes from the last delta's id, not from
    the start (the ping left its cursor alone)."""
    # Silent for 6 s: pings at about 1 to 5 s leave the test 5 s to see one last (with 1.6
    # s, and once in CI with 3.5 s, a loaded machine polled Chromium's records only after
    # the end: the pings came on time, the test's look at them did not).
    model = model_server.script(chunks=words(4), delay=0.02, hang=6)
    client = make_client(name)
    cid, gen = client.start(model)
    run = follow(follows, client, gen["events_url"])

    def ping_after_deltas(records: list[Record]) -> bool:
        kinds = [r.type for r in records if r.kind == "event"]
        return text_of(records) == "".join(words(4)) and kinds[-1] == "ping"

    records = run.wait_until(ping_after_deltas, 10, "no ping after the deltas")
    cut_at = time.time()
    lb.proxy.drop()
    ping = records[-1]
    assert ping.id == ("" if name == "eventsource" else events_of(records)[-1].id), ping
    records = run.wait_ended()

    assert_exact_then_stops(client, cid, gen, records, lb.proxy)
    assert_resumed_with_cursor(client, records, lb.proxy.exchanges_to(gen["events_url"]), cut_at)


# -- (b) the web process the client is attached to is SIGKILLed ----------------------------
@pytest.mark.parametrize("name", CLIENTS)
def test_killed_web_process_resumes_on_the_other(name, make_client, follows, lb, model_server):
    model = model_server.script(chunks=ANSWER, delay=0.04)
    client, cid, gen, run, attached = attached_mid_answer(name, make_client, follows, lb, model)
    cut_at = time.time()
    os.killpg(lb.procs[attached].popen.pid, signal.SIGKILL)
    records = run.wait_ended()

    assert errors_of(records), f"{name} never noticed its server die"
    assert_exact_then_stops(client, cid, gen, records, lb.proxy)
    exchanges = lb.proxy.exchanges_to(gen["events_url"])
    resumed = assert_resumed_with_cursor(client, records, exchanges, cut_at)
    assert resumed.backend != attached  # the dead one refused it: the balancer moved on


# -- (c) the web process the client is attached to is SIGTERMed (a deploy) ----------------
@pytest.mark.parametrize("name", CLIENTS)
def test_sigterm_ends_streams_at_once_and_clients_resume_elsewhere(
    name, make_client, follows, lb, model_server
):
    model = model_server.script(chunks=ANSWER, delay=0.04)
    client, cid, gen, run, attached = attached_mid_answer(name, make_client, follows, lb, model)
    doomed = lb.procs[attached]
    term_at = time.time()
    os.kill(doomed.popen.pid, signal.SIGTERM)  # gunicorn's master: graceful shutdown
    try:
        records = run.wait_ended()
    finally:
        doomed.stop(signal.SIGKILL)  # whatever it still holds; the fixture restarts it

    events = assert_exact_then_stops(client, cid, gen, records, lb.proxy)
    seen = [r.t for r in records if r.kind == "event"]
    gaps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
    assert max(gaps) <= MAX_GAP, f"{name} heard nothing for {max(gaps):.1f}s"

    ended = [e for e in errors_of(records) if e.t > term_at]
    late = [e for e in events if term_at < e.t and (not ended or e.t < ended[0].t)]
    assert ended and ended[0].t < events[-1].t, (
        f"{name}'s stream was not ended at SIGTERM: {len(late)} more events came from the "
        f"stopping process, then done"
    )
    assert ended[0].t - term_at <= PROMPT_END, (
        f"the stopping process ended {name}'s stream {ended[0].t - term_at:.2f}s after SIGTERM"
    )
    exchanges = lb.proxy.exchanges_to(gen["events_url"])
    assert_resumed_with_cursor(client, records, exchanges, ended[0].t - 0.001)
    # A reconnect may still reach the stopping process for a moment (it answers with no
    # events and retry: 250): each one kept the cursor, and the other process served it.
    later = [x for x in exchanges if x.at >= ended[0].t]
    assert all(cursor_sent(x) for x in later), [x.line for x in later]
    assert any(x.backend != attached and x.status == 200 for x in later), [
        (x.backend, x.status) for x in later
    ]


# -- (d) the network stalls: only the polyfill can tell, by its heartbeat timeout -----------
def test_polyfill_notices_a_stalled_network_and_resumes(make_client, follows, lb, model_server):
    """No byte either way for 45 s (event-source-polyfill's default heartbeatTimeout): it
    gives up on the connection and resumes from its cursor once the network is back.
    (Native EventSource and the eventsource package cannot notice a stall by themselves.)"""
    model = model_server.script(chunks=ANSWER, delay=0.04)
    client = make_client("polyfill")
    cid, gen = client.start(model)
    run = follow(follows, client, gen["events_url"])
    run.wait_until(lambda rs: deltas(rs) >= 8, 20, "no 8 deltas")

    lb.proxy.stall()
    stalled_at = time.time()
    try:
        records = run.wait_until(
            lambda rs: any(e.t > stalled_at for e in errors_of(rs)), 60, "no stall noticed"
        )
    finally:
        lb.proxy.unstall()
    noticed = next(e for e in errors_of(records) if e.t > stalled_at)
    assert noticed.t - stalled_at > 40, noticed  # its heartbeat timeout, nothing sooner
    assert "No activity" in (noticed.message or ""), noticed
    records = run.wait_ended()

    assert_exact_then_stops(client, cid, gen, records, lb.proxy)
    assert_resumed_with_cursor(client, records, lb.proxy.exchanges_to(gen["events_url"]), noticed.t)


# -- (e) a client that opens with the last id of a finished answer ------------------------
@pytest.mark.parametrize("name", CLIENTS)
def test_opening_with_the_last_id_gets_204_and_the_client_stops(
    name, make_client, follows, lb, model_server
):
    model = model_server.script(chunks=words(5))
    client = make_client(name)
    cid, gen = client.start(model)
    client.wait_final(cid)
    status, body = client.raw_get(gen["events_url"])
    assert status == 200, body
    last = [e for e in parse_sse(body) if e.id][-1]
    assert last.event == "done"

    opened_at = time.time()
    run = follow(follows, client, gen["events_url"], grace=1.5, cursor=last.id)
    records = run.wait_ended()

    assert not events_of(records), f"{name} was sent events past its cursor: {records}"
    failed = errors_of(records)
    assert len(failed) == 1 and failed[0].ready_state == CLOSED, records
    if name != "native":  # the native EventSource does not say which status it got
        assert failed[0].code == 204, failed
    opened = [x for x in lb.proxy.exchanges_to(gen["events_url"]) if x.at >= opened_at]
    assert len(opened) == 1 and opened[0].status == 204, [(x.line, x.status) for x in opened]
    assert cursor_sent(opened[0]) == last.id, opened[0].head
    assert records[-1].kind == "end" and records[-1].ready_state == CLOSED


# -- (f) the stream expired from Redis: the answer comes from the database ------------------
@pytest.fixture
def expire(redis_client: redis.Redis, key_prefix: str):
    def expire(gid: str) -> None:
        keys = RedisKeys(key_prefix).generation(gid)
        redis_client.delete(keys.stream, keys.meta, keys.lease, keys.cancel)

    return expire


@pytest.mark.parametrize("name", CLIENTS)
def test_expired_stream_replays_the_stored_answer_once(
    name, make_client, follows, lb, model_server, expire
):
    chunks = words(12)
    model = model_server.script(chunks=chunks, delay=0.01)
    client = make_client(name)
    cid, gen = client.start(model)
    assert client.wait_final(cid)["content"] == "".join(chunks)
    expire(gen["id"])

    run = follow(follows, client, gen["events_url"])
    records = run.wait_ended()

    events = assert_exact_then_stops(client, cid, gen, records, lb.proxy)
    assert [(e.type, e.id) for e in events] == [("delta", "0-1"), ("done", "0-2")]


# -- the cursor over plain HTTP -------------------------------------------------------------
@pytest.fixture(scope="module")
def owner(pair: WebPair) -> Iterator[httpx.Client]:
    """One identity for the HTTP tests (so they can share one long answer)."""
    with httpx.Client(base_url=pair.proxy.url, timeout=30) as client:
        yield client


@pytest.fixture
def http(owner: httpx.Client, lb: WebPair) -> httpx.Client:
    return owner


def read(http: httpx.Client, url: str, **headers: str) -> tuple[int, list[WireEvent]]:
    response = http.get(url, headers=headers)
    if response.status_code == 200:
        assert response.headers["content-type"].startswith("text/event-stream")
        return 200, parse_sse(response.text)
    return response.status_code, []


def answer(events: list[WireEvent]) -> list[WireEvent]:
    """The answer's events (the ones with data, but the keepalive)."""
    return [e for e in events if e.data is not None and e.event != "ping"]


def finished_stream(http: httpx.Client, model: str) -> tuple[str, dict, list[WireEvent]]:
    cid, gen = start(http, model)
    status, events = read(http, gen["events_url"])
    assert status == 200
    return cid, gen, answer(events)


@pytest.fixture(scope="module")
def long_answer(owner, pair, model_server):
    """A finished answer of more than 100 events."""
    pair.ensure_up()
    model = model_server.script(chunks=words(160), delay=0.01)
    _, gen, full = finished_stream(owner, model)
    assert len(full) > 101, f"only {len(full)} events: the worker merged deltas"
    return gen, full


def test_last_event_id_param_resumes_after_the_100th_event(http, long_answer):
    gen, full = long_answer
    status, rest = read(http, f"{gen['events_url']}?lastEventId={full[99].id}")
    assert status == 200
    assert answer(rest) == full[100:]


def test_last_event_id_param_at_the_end_gets_204(http, long_answer):
    gen, full = long_answer
    response = http.get(f"{gen['events_url']}?lastEventId={full[-1].id}")
    assert response.status_code == 204 and response.content == b""


def test_header_beats_after_beats_last_event_id(http, long_answer):
    gen, full = long_answer
    url = gen["events_url"]
    both = f"{url}?after={full[20].id}&lastEventId={full[10].id}"
    assert answer(read(http, both, **{"Last-Event-ID": full[30].id})[1]) == full[31:]
    assert answer(read(http, both)[1]) == full[21:]
    assert answer(read(http, f"{url}?lastEventId={full[10].id}")[1]) == full[11:]


@pytest.mark.parametrize("where", ["header", "after", "lastEventId"])
@pytest.mark.parametrize("cursor", ["nonsense", "1-2-3", "18446744073709551616-0"])
def test_malformed_cursor_is_400_wherever_it_is(http, model_server, where, cursor):
    _, gen, _ = finished_stream(http, model_server.script(chunks=words(3)))
    url = gen["events_url"]
    if where == "header":
        response = http.get(url, headers={"Last-Event-ID": cursor})
    else:
        response = http.get(f"{url}?{where}={cursor}")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_cursor"


def test_stream_opens_with_retry_and_a_ping_without_id_and_pings_when_quiet(http, model_server):
    model = model_server.script(chunks=["late"], first_delay=3)
    _, gen = start(http, model)
    status, events = read(http, gen["events_url"])
    assert status == 200
    assert events[0].retry == RETRY_MS, events[:2]
    pings = [e for e in events if e.event == "ping"]
    assert events[1].event == "ping", events[:3]
    assert all(p.id is None and p.data == {"interval": PING_INTERVAL} for p in pings), pings
    before_answer = events[: events.index(answer(events)[0])]
    assert len([e for e in before_answer if e.event == "ping"]) >= 3  # at open, then each 1 s
    assert [e.event for e in answer(events)] == ["delta", "done"]


def test_database_replay_honours_cursors(http, model_server, expire):
    chunks = words(8)
    cid, gen, full = finished_stream(http, model_server.script(chunks=chunks))
    url = gen["events_url"]
    deadline = time.monotonic() + 20
    while http.get(f"/api/conversations/{cid}").json()["messages"][-1]["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    expire(gen["id"])

    delta = WireEvent("delta", "0-1", {"text": "".join(chunks)})
    done = WireEvent("done", "0-2", full[-1].data)
    for cursor in (None, "0"):
        headers = {"Last-Event-ID": cursor} if cursor else {}
        assert answer(read(http, url, **headers)[1]) == [delta, done], cursor
    assert answer(read(http, url, **{"Last-Event-ID": "0-1"})[1]) == [done]
    assert answer(read(http, f"{url}?after=0-1")[1]) == [done]
    assert answer(read(http, f"{url}?lastEventId=0-1")[1]) == [done]
    for cursor in ("0-2", "0-3", full[0].id, full[-1].id):
        assert read(http, url, **{"Last-Event-ID": cursor})[0] == 204, cursor
        assert read(http, f"{url}?lastEventId={cursor}")[0] == 204, cursor
