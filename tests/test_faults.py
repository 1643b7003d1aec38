"""Faults while answers stream: Redis killed, restarted empty or from its AOF, paused, full;
the worker killed; a task lost from the queue; PostgreSQL refusing or stalling; a cursor
out of range. Each test builds a stack of its own (tests/faults.py) and breaks only that.

After every fault, whatever it was:
- every client's text is the stored text of its answer, and it was shown the stored end;
- no client was given an event twice, however often it resumed;
- no message is left queued or streaming;
- a new message in the same conversation is accepted (202) and ends done, exactly.

The error codes: ``state_lost`` (Redis lost the answer's state), ``unavailable`` (Redis
refused writes), ``worker_lost`` (only for a worker that really died), ``queue_timeout``
(no worker took the answer in time).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL
from tests.faults import (
    Answer,
    PrivateRedis,
    Stack,
    assert_new_message_works,
    check_clients,
    generation,
    new_conversation,
    outcome_of_event,
    outcome_of_view,
    post,
    stack_env,
    start_answers,
    wait_all_final,
    wait_streaming,
    wait_text,
    words,
)
from tests.helpers import lock_sqlite
from tidechat import db

pytestmark = pytest.mark.e2e


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def make_stack(process_env: dict[str, str], tmp_path: Path) -> Iterator:
    """Build a private stack: redis-server, database, worker, web (all stopped at the end)."""
    stacks: list[Stack] = []

    def make(*, aof: bool = False, database_url: str | None = None, **extra: str) -> Stack:
        server = PrivateRedis(tmp_path, aof=aof).start()
        if database_url is None:
            database_url = f"sqlite:///{tmp_path / 'tidechat.db'}"
            db.upgrade(database_url)
        stack = Stack(stack_env(process_env, server.url, database_url, **extra), tmp_path, server)
        stacks.append(stack)
        stack.start_worker()
        stack.start_web()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


# -- helpers -----------------------------------------------------------------------------------
def wait_clients(stack: Stack, answers: list[Answer], timeout: float) -> float:
    """Until every client of these answers has ended; the seconds it took."""
    started = time.monotonic()
    for answer in answers:
        for follower in answer.followers:
            left = max(0.1, started + timeout - time.monotonic())
            assert follower.wait(left), (
                f"client {follower.describe()} still open after {timeout} s\n{stack.evidence()}"
            )
    return time.monotonic() - started


def assert_all_done_exactly(
    stack: Stack, http: httpx.Client, answers: list[Answer], timeout: float = 30
) -> None:
    """Every answer ends, every client saw what is stored, and it is the whole script."""
    wait_all_final(http, list({a.cid for a in answers}), timeout=timeout)
    views = check_clients(http, answers, stack)
    wrong = {
        a.gid: (outcome_of_view(views[a.gid]), views[a.gid]["text"])
        for a in answers
        if outcome_of_view(views[a.gid]) != "done" or views[a.gid]["text"] != a.script
    }
    assert not wrong, f"answers not done with their exact text: {wrong}\n{stack.evidence()}"


def assert_resumed(followers: list) -> None:
    """Each of these clients was cut, and was then streamed to again from its cursor."""
    for f in followers:
        assert any(o == "200" and cursor for _, o, cursor in f.attempts), f.describe()


def assert_no_worker_lost(stack: Stack) -> None:
    lines = [line for line in stack.evidence("worker_lost").splitlines() if "worker_lost" in line]
    assert not lines, "worker_lost after a Redis/database blip:\n" + "\n".join(lines)


def errors_replied(client: redis.Redis) -> int:
    """How many error replies Redis has sent (an OOM inside a script is an ERR on 6.2)."""
    return sum(stat["count"] for stat in client.info("errorstats").values())


# -- 1. Redis restarted empty ------------------------------------------------------------------
def test_redis_restarted_empty_ends_open_streams_with_state_lost(make_stack, model_server):
    stack = make_stack()
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=6, chunks=40, delay=0.15, stem="lost")
    for a in answers:  # a second client of each, whose network drops in the outage
        a.followers.append(stack.follow(http, a.gen, name=a.followers[0].name + "-cut"))
    wait_streaming(answers, deltas=5)

    stack.redis.kill()
    for a in answers:
        a.followers[1].cut()  # comes back with its cursor to a stream Redis no longer has
    time.sleep(1)
    stack.redis.start()  # same port and directory, no AOF, no RDB: it comes back empty
    restarted = time.monotonic()

    # Every open stream ends (no endless pings), with state_lost, soon after the restart.
    wait_clients(stack, answers, timeout=15)
    last_end = max(f.terminal.at for a in answers for f in a.followers if f.terminal)
    print(f"state_lost shown {last_end - restarted:.1f} s after the restart")
    assert last_end - restarted < 15
    shown = {f.name: outcome_of_event(f.terminal) for a in answers for f in a.followers}
    assert set(shown.values()) == {"error:state_lost"}, (shown, stack.evidence())
    # Before: a client that came back before the answer was ended got 204, which stops
    # EventSource for good, while the answer was still "streaming".
    answered = {o for a in answers for f in a.followers for _, o, _ in f.attempts}
    assert "204" not in answered, answered

    wait_all_final(http, [a.cid for a in answers], timeout=30)
    views = check_clients(http, answers, stack)
    for a in answers:
        assert outcome_of_view(views[a.gid]) == "error:state_lost", views[a.gid]
        assert views[a.gid]["text"] and a.script.startswith(views[a.gid]["text"])

    # Stop on an answer that ended so: accepted, and it stays as it ended.
    for a in answers[:3]:
        response = http.post(a.gen["cancel_url"])
        assert response.status_code in (200, 202), (response.status_code, response.text)
        assert generation(http, a.gid) == views[a.gid]

    assert_new_message_works(stack, http, model_server, answers[0].cid)


def test_stop_while_redis_has_lost_the_answer_keeps_the_text_clients_saw(make_stack, model_server):
    """Stop pressed right after Redis came back empty, before anything ended the answer:
    accepted, final, and the stored text is still the text the clients saw."""
    stack = make_stack()
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=3, chunks=40, delay=0.15, stem="stop")
    wait_streaming(answers, deltas=5)

    stack.redis.kill()
    time.sleep(1)
    stack.redis.start()
    for a in answers:
        response = http.post(a.gen["cancel_url"])
        assert response.status_code in (200, 202), (response.status_code, response.text)

    wait_clients(stack, answers, timeout=15)
    wait_all_final(http, [a.cid for a in answers], timeout=30)
    views = check_clients(http, answers, stack)
    for a in answers:
        assert outcome_of_view(views[a.gid]) in ("error:state_lost", "cancelled"), views[a.gid]
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 2. Redis killed and restarted from its AOF --------------------------------------------------
def test_redis_down_5s_with_aof_every_answer_ends_done_exactly(make_stack, model_server):
    stack = make_stack(aof=True)
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=6, chunks=30, delay=0.15, stem="aof")
    for a in answers:  # a second client of each answer, whose network drops in the outage
        a.followers.append(stack.follow(http, a.gen, name=a.followers[0].name + "-cut"))
    wait_streaming(answers, deltas=3)

    stack.redis.kill()
    for a in answers:
        a.followers[1].cut()  # resumes with Last-Event-ID, while Redis is down
    time.sleep(5)
    stack.redis.start()  # same port and directory: it loads its AOF

    took = wait_clients(stack, answers, timeout=25)
    print(f"every client ended {took:.1f} s after Redis was back")
    assert_all_done_exactly(stack, http, answers, timeout=30)
    assert_resumed([a.followers[1] for a in answers])
    assert_no_worker_lost(stack)
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 2b. a client opening the stream while Redis is down ------------------------------------
def test_client_opening_while_redis_is_down_is_served_once_it_is_back(make_stack, model_server):
    """A client that opens the stream while Redis is down (a page reload, or an EventSource
    without the page's watchdog resuming) is served as soon as Redis is back, not left
    hanging."""
    stack = make_stack(aof=True)
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=1, chunks=40, delay=0.15, stem="late")
    answer = answers[0]
    wait_streaming(answers, deltas=3)  # this web process's stream hub is running

    stack.redis.kill()
    time.sleep(0.5)
    patient = stack.follow(http, answer.gen, name="patient", watchdog=60)
    answer.followers.append(patient)
    time.sleep(3)
    stack.redis.start()
    back = time.monotonic()

    while not patient.events and time.monotonic() < back + 10:
        time.sleep(0.05)
    first = patient.events[0].at - back if patient.events else None
    assert first is not None and first < 5, (
        f"the client that opened the stream in the outage got its first event "
        f"{first} s after Redis was back: {patient.describe()}\n{stack.evidence()}"
    )
    wait_clients(stack, answers, timeout=20)
    assert_all_done_exactly(stack, http, answers, timeout=30)


# -- 3. Redis paused ---------------------------------------------------------------------------
def test_redis_paused_5s_every_answer_ends_done_exactly(make_stack, model_server):
    stack = make_stack()
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=6, chunks=30, delay=0.15, stem="pause")
    for a in answers[:3]:  # a second client of some answers, whose network drops meanwhile
        a.followers.append(stack.follow(http, a.gen, name=a.followers[0].name + "-cut"))
    wait_streaming(answers, deltas=3)

    stack.redis.pause()  # SIGSTOP: connections stay open, nothing answers
    for a in answers[:3]:
        a.followers[1].cut()
    time.sleep(5)
    stack.redis.resume()

    took = wait_clients(stack, answers, timeout=25)
    print(f"every client ended {took:.1f} s after Redis was resumed")
    assert_all_done_exactly(stack, http, answers, timeout=30)
    assert_resumed([a.followers[1] for a in answers[:3]])
    assert_no_worker_lost(stack)
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 4. Redis full -----------------------------------------------------------------------------
def test_redis_full_answers_end_done_or_unavailable_never_doubled(make_stack, model_server):
    stack = make_stack()
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=6, chunks=30, delay=0.15, stem="oom")
    wait_streaming(answers, deltas=3)

    admin = stack.redis.client()
    errors_before = errors_replied(admin)
    used = int(admin.info("memory")["used_memory"])
    # The big key first: while its 400 KB are in the query buffer, a maxmemory already set
    # would refuse it. Then a limit 200 KB above what was used: about 200 KB below now.
    admin.set("filler", b"x" * 400_000)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", used + 200_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("probe", "refused?")
    # Longer than the worker retries a refused write (TIDECHAT_REDIS_RETRY_SECONDS=15): the
    # answers it was writing end unavailable, whether or not it tells OOM from a blip. The
    # model streams on meanwhile.
    time.sleep(18)
    refused = errors_replied(admin) - errors_before - 1  # not the probe's
    print(f"{refused} commands refused")
    admin.delete("filler")
    admin.config_set("maxmemory", 0)
    admin.close()
    assert refused > 0, "the answers' writes were never refused:\n" + stack.evidence()

    wait_clients(stack, answers, timeout=30)
    wait_all_final(http, [a.cid for a in answers], timeout=30)
    views = check_clients(http, answers, stack)
    ends = {a.gid: outcome_of_view(views[a.gid]) for a in answers}
    print("ends:", sorted(ends.values()))
    assert set(ends.values()) <= {"done", "error:unavailable"}, (ends, stack.evidence())
    assert "error:unavailable" in ends.values(), (ends, stack.evidence())
    for a in answers:
        stored = views[a.gid]["text"]
        if ends[a.gid] == "done":
            assert stored == a.script, (a.gid, stored)
        else:  # what was stored before Redis refused, nothing twice
            assert a.script.startswith(stored), (a.gid, stored)
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 5. the worker killed, nobody watching -----------------------------------------------------
def test_worker_killed_unwatched_answers_end_worker_lost(make_stack, model_server):
    stack = make_stack()
    http = stack.http()
    answers = start_answers(
        stack, http, model_server, n=5, chunks=40, delay=0.15, stem="dead", follow=False
    )
    wait_text(http, answers, chars=1)

    os.killpg(stack.workers[0].popen.pid, signal.SIGKILL)
    took = wait_all_final(http, [a.cid for a in answers], timeout=15)
    print(f"worker_lost stored {took:.1f} s after the kill")
    views = {a.gid: generation(http, a.gid) for a in answers}
    ends = {gid: outcome_of_view(v) for gid, v in views.items()}
    assert set(ends.values()) == {"error:worker_lost"}, (ends, took, stack.evidence())
    for a in answers:
        stored = views[a.gid]["text"]
        assert stored and a.script.startswith(stored), (a.gid, stored)

    # A client that opens the answer now is given exactly the stored text and end.
    for a in answers:
        a.followers.append(stack.follow(http, a.gen, name=f"late-{a.gid[:6]}"))
    wait_clients(stack, answers, timeout=10)
    check_clients(http, answers, stack)

    stack.start_worker(name="worker-2")
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 6. a queued answer whose task vanished ------------------------------------------------------
def test_queued_answer_whose_task_vanished_ends_queue_timeout(make_stack, model_server):
    # The queue timeout is configuration every process shares (the sweeper that acts may be
    # the web process's or the worker's).
    stack = make_stack(TIDECHAT_QUEUE_TIMEOUT="3")
    http = stack.http()
    stack.workers[0].stop()  # no worker: the answer stays queued

    chunks = [f"q{i} " for i in range(20)]
    cid = new_conversation(http)
    answer = Answer(cid, post(http, cid, model_server.script(chunks=chunks, delay=0.1)), chunks)
    answer.followers.append(stack.follow(http, answer.gen, name="queued"))
    assert generation(http, answer.gid)["status"] == "queued"

    admin = stack.redis.client()
    queues = [
        key
        for key in admin.scan_iter(match=stack.prefix + "celery:*", count=1000)
        if admin.type(key) == b"list" and admin.llen(key) > 0
    ]
    assert queues, list(admin.scan_iter(match=stack.prefix + "*"))
    admin.delete(*queues)  # the task is gone: no worker will ever take it
    admin.close()

    stack.start_worker(name="worker-2", TIDECHAT_QUEUE_TIMEOUT="3")
    wait_clients(stack, [answer], timeout=15)
    assert outcome_of_event(answer.followers[0].terminal) == "error:queue_timeout", (
        answer.followers[0].describe(),
        stack.evidence(),
    )
    wait_all_final(http, [cid], timeout=30)
    views = check_clients(http, [answer], stack)
    assert outcome_of_view(views[answer.gid]) == "error:queue_timeout"
    assert views[answer.gid]["text"] == ""
    assert_new_message_works(stack, http, model_server, cid)


# -- 7. PostgreSQL refusing connections as answers finish -----------------------------------------
def test_postgres_refusing_as_answers_finish_all_end_done_exactly(
    postgres_behind_proxy, make_stack, model_server
):
    url, proxy = postgres_behind_proxy
    stack = make_stack(database_url=url)
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=6, chunks=30, delay=0.15, stem="pgoff")
    wait_streaming(answers, deltas=5)  # every worker has read and marked its message

    proxy.block()  # refuse new connections...
    proxy.drop()  # ...and cut the pooled ones: the answers finish while it is out of reach
    time.sleep(8)
    proxy.unblock()

    wait_clients(stack, answers, timeout=30)
    shown = {f.name: outcome_of_event(f.terminal) for a in answers for f in a.followers}
    assert set(shown.values()) == {"done"}, (shown, stack.evidence())
    assert_all_done_exactly(stack, http, answers, timeout=30)
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 7b. the database out of reach as the worker starts an answer ----------------------------
def test_answers_whose_worker_cannot_reach_the_database_at_start_are_retried(
    postgres_behind_proxy, make_stack, model_server
):
    """Before: a task that failed before streaming was never retried; its clients hung."""
    url, proxy = postgres_behind_proxy
    direct = make_url(url).set(
        host=make_url(POSTGRES_URL).host or "127.0.0.1", port=make_url(POSTGRES_URL).port or 5432
    ).render_as_string(hide_password=False)
    stack = make_stack(database_url=direct)  # the web reaches it; the worker goes through
    stack.workers.pop().stop(signal.SIGKILL)  # the proxy, below
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=4, chunks=10, delay=0.05, stem="late")
    proxy.block()
    stack.start_worker(name="worker-cut-off", DATABASE_URL=url)
    time.sleep(4)  # its tasks fail to start, and are retried with back-off
    proxy.unblock()

    wait_clients(stack, answers, timeout=45)
    assert_all_done_exactly(stack, http, answers, timeout=30)
    assert "could not start" in stack.evidence("could not start")
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 8. PostgreSQL stalled (a blackhole) as answers finish ----------------------------------------
def test_postgres_stalled_as_answers_finish_all_end_done_exactly(
    postgres_behind_proxy, make_stack, model_server
):
    url, proxy = postgres_behind_proxy
    stack = make_stack(database_url=url)
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=6, chunks=30, delay=0.15, stem="pgstall")
    wait_streaming(answers, deltas=5)

    proxy.stall()  # connections open, new ones accepted, not a byte forwarded either way
    time.sleep(10)
    proxy.unstall()

    wait_clients(stack, answers, timeout=30)
    shown = {f.name: outcome_of_event(f.terminal) for a in answers for f in a.followers}
    assert set(shown.values()) == {"done"}, (shown, stack.evidence())
    assert_all_done_exactly(stack, http, answers, timeout=30)
    assert_no_worker_lost(stack)
    assert_new_message_works(stack, http, model_server, answers[0].cid)


# -- 9. a cursor out of range ----------------------------------------------------------------
def test_huge_cursor_is_400_and_does_not_stall_other_streams(make_stack, model_server):
    stack = make_stack()
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=1, chunks=40, delay=0.1, stem="cur")
    answer = answers[0]
    watcher = answer.followers[0]
    wait_streaming(answers, deltas=5)

    bad = [
        ({"Last-Event-ID": "0-18446744073709551616"}, ""),
        ({}, "?after=99999999999999999999-0"),
        ({"Last-Event-ID": "18446744073709551616-0"}, ""),
        ({}, "?lastEventId=0-99999999999999999999"),
    ]
    asked = 0
    with httpx.Client(base_url=stack.url, cookies=http.cookies, timeout=10) as other:
        while not watcher.ended.is_set() and asked < 200:
            for headers, query in bad:
                response = other.get(answer.gen["events_url"] + query, headers=headers)
                assert response.status_code == 400, (headers, query, response.status_code)
                assert response.json()["error"]["code"] == "invalid_cursor"
                asked += 1
            time.sleep(0.05)
    assert asked >= 8

    wait_clients(stack, answers, timeout=20)
    gaps = watcher.gaps()
    print(f"{asked} bad cursors; largest gap of the other stream {max(gaps or [0]):.2f} s")
    assert gaps and max(gaps) < 1.0, (max(gaps), stack.evidence())
    assert_all_done_exactly(stack, http, answers, timeout=10)
    assert_new_message_works(stack, http, model_server, answer.cid)


# -- 10. SQLite's write lock held by another process ------------------------------------------
def test_sqlite_locked_by_another_process_stalls_no_stream(make_stack, model_server, tmp_path):
    """A backup, a migration or a script holds SQLite's write lock while someone sends a
    message and another answer ends: the POST and the worker's write of that end wait for
    it, and both processes go on serving everyone else (SQLite's own wait for a lock sleeps
    in C, where gevent cannot switch: every stream of the process stopped for as long as
    the lock was held)."""
    stack = make_stack()
    http = stack.http()
    answers = start_answers(stack, http, model_server, n=1, chunks=50, delay=0.1, stem="lock")
    watcher = answers[0].followers[0]
    wait_streaming(answers, deltas=5)
    chunks = words(5, "locked.")
    model = model_server.script(chunks=chunks, delay=0.02)
    cid = new_conversation(http)
    ending = start_answers(stack, http, model_server, n=1, chunks=5, delay=0.1, stem="end")

    holder = lock_sqlite(str(tmp_path / "tidechat.db"))  # this test's process: not the app's
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(lambda: (post(http, cid, model, "Sent while locked"), time.monotonic()))
        time.sleep(2)
        releasing = time.monotonic()
        holder.rollback()
        gen, posted = sent.result(timeout=30)
    assert posted > releasing, "the POST did not wait for the lock: the test proved nothing"

    wait_clients(stack, answers + ending, timeout=20)
    gaps = watcher.gaps()
    print(f"largest gap of the other stream while the lock was held {max(gaps or [0]):.2f} s")
    assert gaps and max(gaps) < 1.0, (max(gaps), stack.evidence())
    locked = Answer(cid, gen, chunks)
    locked.followers.append(stack.follow(http, gen, name="locked"))
    wait_clients(stack, [locked], timeout=20)
    assert_all_done_exactly(stack, http, [*answers, *ending, locked], timeout=10)
