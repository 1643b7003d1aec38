"""The stream bus's guarantees, against real Redis: appends exactly once, fenced writers,
leases taken back after Redis lost them, a fresh end when Redis lost everything, and the
worker's writer going on after Redis lost its scripts."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from tests.faults import PrivateRedis
from tidechat import metrics
from tidechat.redis_keys import RedisKeys
from tidechat.stream_bus import (
    DELTA,
    DONE,
    GONE,
    STATE_LOST,
    STOPPED,
    StreamBus,
    dumps,
    process_name,
)
from worker.stream_writer import Outbox, StreamWriter


@pytest.fixture
def bus(redis_client, key_prefix) -> StreamBus:
    return StreamBus(redis_client, RedisKeys(key_prefix + "bus:"), stream_ttl=60)


def delta(text: str) -> list[tuple[str, str]]:
    return [(DELTA, dumps({"text": text}))]


def texts(bus: StreamBus, gid: str) -> list[str]:
    return [e.payload()["text"] for e in bus.entries(gid) if e.event == DELTA]


def running(bus: StreamBus) -> tuple[str, int]:
    gid = uuid.uuid4().hex
    bus.create(gid)
    claim = bus.claim(gid, 5000)
    assert claim is not None and claim.seq == 0
    return gid, claim.fence


def test_a_retried_batch_is_appended_once(bus):
    """Before: a pipeline retried whole after a partial failure stored text twice."""
    gid, fence = running(bus)
    first = bus.append(gid, fence, 1, delta("Hello"))
    assert bus.append(gid, fence, 1, delta("Hello")) == first  # the retry: already there
    bus.append(gid, fence, 2, delta(", world"))
    assert texts(bus, gid) == ["Hello", ", world"]


def test_a_stale_writer_is_fenced_off_after_a_hand_off(bus):
    gid, fence = running(bus)
    bus.append(gid, fence, 1, delta("one "))
    assert bus.release(gid, fence)
    again = bus.claim(gid, 5000)
    assert again is not None and again.fence == fence + 1 and again.seq == 1
    assert bus.append(gid, fence, 2, delta("stale ")) == STOPPED
    assert bus.finish(gid, DONE, {"finish_reason": "stop"}, "done", fence) is None
    bus.append(gid, again.fence, 2, delta("two"))
    assert bus.finish(gid, DONE, {"finish_reason": "stop"}, "done", again.fence)
    assert texts(bus, gid) == ["one ", "two"]


def test_a_claim_names_its_worker_and_counts_a_first_run_only(bus, redis_client):
    """The claim's bookkeeping is in its own script call (it was a second round trip): the
    operator sees which worker runs the answer, and an answer handed on is not started
    twice in the metrics."""
    started = metrics.field("generations_started")

    def count() -> int:
        return int(redis_client.hget(bus.keys.metrics(), started) or 0)

    before = count()
    gid, fence = running(bus)
    assert redis_client.hget(bus.k(gid).meta, "worker").decode() == process_name()
    assert count() == before + 1
    assert bus.release(gid, fence)  # handed on (a deploy), then taken by the next worker
    assert bus.claim(gid, 5000).fence == fence + 1
    assert count() == before + 1
    assert bus.claim(gid, 5000) is None  # taken: nothing recorded for a failed claim
    assert count() == before + 1


def test_a_lease_redis_lost_is_taken_back_while_the_generation_is_still_ours(bus):
    gid, fence = running(bus)
    bus.redis.delete(bus.k(gid).lease)  # expired while the worker was cut off
    assert bus.renew_and_check([(gid, fence)], 5000) == [(1, False)]
    assert bus.redis.get(bus.k(gid).lease) == str(fence).encode()
    assert bus.reap(gid, {"code": "worker_lost"}) is None  # it has a lease again


def test_a_reaped_generation_is_not_taken_back(bus):
    gid, fence = running(bus)
    bus.redis.delete(bus.k(gid).lease)
    assert bus.reap(gid, {"code": "worker_lost", "message": "gone"})
    assert bus.renew_and_check([(gid, fence)], 5000) == [(0, False)]
    assert bus.append(gid, fence, 1, delta("late")) == STOPPED


def test_a_worker_renews_hundreds_of_leases_each_with_its_own_answer(bus):
    """One renewal covers every lease the worker holds, a script call per hash slot and
    chunk (on a cluster, tests/test_cluster.py's workers renew theirs across buckets): each
    lease still gets its own verdict, in its place, whatever its neighbours' are."""
    held = [running(bus) for _ in range(450)]  # more than two chunks
    lost, reaped, gone, cancelled = held[7], held[210], held[333], held[449]
    bus.redis.delete(bus.k(lost[0]).lease)  # expired while the worker was cut off
    bus.redis.delete(bus.k(reaped[0]).lease)
    assert bus.reap(reaped[0], {"code": "worker_lost", "message": "gone"})
    k = bus.k(gone[0])
    bus.redis.delete(k.meta, k.lease)  # Redis lost its state
    bus.request_cancel(cancelled[0])
    verdicts = {held[i][0]: v for i, v in enumerate(bus.renew_and_check(held, 5000))}
    expected = {gid: (1, False) for gid, _ in held}
    expected.update({reaped[0]: (0, False), gone[0]: (-1, False), cancelled[0]: (1, True)})
    assert verdicts == expected
    assert bus.redis.get(bus.k(lost[0]).lease) == str(lost[1]).encode()  # taken back
    assert 4000 < bus.redis.pttl(bus.k(held[100][0]).lease) <= 5000  # renewed


def test_when_redis_lost_the_state_writers_hear_gone_and_a_fresh_end_is_written(bus):
    gid, fence = running(bus)
    bus.append(gid, fence, 1, delta("partial"))
    k = bus.k(gid)
    bus.redis.delete(k.stream, k.meta, k.lease)  # a restart without persistence
    assert bus.renew_and_check([(gid, fence)], 5000) == [(-1, False)]
    assert bus.append(gid, fence, 2, delta("more")) == GONE
    assert bus.finish(gid, DONE, {"finish_reason": "stop"}, "done", fence) == GONE
    end = bus.end_lost(gid, "error", STATE_LOST, "error")
    assert end is not None
    assert [e.event for e in bus.entries(gid)] == ["error"]
    assert bus.meta(gid)["state"] == "error"
    assert bus.end_lost(gid, "error", STATE_LOST, "error") is None  # once only


def script_calls(r) -> int:
    """SCRIPT commands (EXISTS, LOAD) the server has run."""
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.split("|")[0] == "cmdstat_script")


def test_the_writer_appends_in_one_round_trip_and_survives_redis_forgetting_its_scripts(
    tmp_path,
):
    """Each batch is one pipelined EVALSHA (no SCRIPT EXISTS first, as redis-py's Script
    does in a pipeline); a server restarted from disk has the streams but not the scripts:
    the writer loads it again and the text goes on exactly, nothing lost or doubled."""
    server = PrivateRedis(tmp_path).start()
    try:
        r = server.client()
        bus = StreamBus(r, RedisKeys("writer:"), stream_ttl=60)
        writer = StreamWriter(bus, 0.0, retry_seconds=5)
        gid, fence = running(bus)
        box = Outbox(gid, fence)
        words = [f"word{i} " for i in range(10)]
        writer.put(box, words[0])  # the first append on this server loads the script
        assert writer.drain(box, timeout=10)
        before = script_calls(r)
        for word in words[1:5]:
            writer.put(box, word)
            assert writer.drain(box, timeout=10)
        assert script_calls(r) == before  # no SCRIPT EXISTS per batch
        r.script_flush()  # what a restart from the AOF leaves: data, no scripts
        for word in words[5:]:
            writer.put(box, word)
            assert writer.drain(box, timeout=10)
        assert not box.failed and texts(bus, gid) == words
    finally:
        server.stop()


def test_the_writer_keeps_its_connection_and_goes_on_when_redis_drops_it(bus, redis_client, caplog):
    """The writer appends on a connection of its own, kept from batch to batch (redis-py's
    pipeline took one from the pool and checked it for unread data every batch). When
    Redis drops it (a restart, a proxy's idle timeout, CLIENT KILL), the next batch fails
    on it, opens another, and is retried: the text is exact, nothing lost or doubled."""
    writer = StreamWriter(bus, 0.0, retry_seconds=5)
    gid, fence = running(bus)
    box = Outbox(gid, fence)
    writer.put(box, "one ")
    assert writer.drain(box, timeout=10)
    held = writer._held._conn
    host, port = held._sock.getsockname()[:2]
    for word in ("two ", "three "):
        writer.put(box, word)
        assert writer.drain(box, timeout=10)
    assert writer._held._conn is held and held._sock is not None  # the same, still open
    assert redis_client.client_kill(f"{host}:{port}")
    for word in ("four ", "five "):
        writer.put(box, word)
        assert writer.drain(box, timeout=10)
    assert "appending failed" in caplog.text  # the drop was seen, and the batch retried
    assert not box.failed
    assert "".join(texts(bus, gid)) == "one two three four five "
    assert held._sock.getsockname()[1] != port  # a new connection


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_whose_thread_died_starts_another_for_the_next_delta(bus):
    """A thread killed by a bug outside the write's own handling gets a successor at the
    next delta, and no delta is lost or doubled."""
    writer = StreamWriter(bus, 0.0, retry_seconds=5)
    gid, fence = running(bus)
    box = Outbox(gid, fence)
    writer.put(box, "one ")
    assert writer.drain(box, timeout=10)
    first, take = writer._thread, writer._take

    def dies() -> list:
        writer._take = take
        raise SystemExit  # ends the thread quietly, the queued delta untaken

    writer._take = dies
    writer.put(box, "two ")
    first.join(5)
    assert not first.is_alive()
    writer.put(box, "three ")
    assert writer.drain(box, timeout=10)
    assert writer._thread is not first
    assert "".join(texts(bus, gid)) == "one two three "


def test_a_forked_child_starts_its_own_writer_thread(bus):
    writer = StreamWriter(bus, 0.0, retry_seconds=5)
    gid, fence = running(bus)
    box = Outbox(gid, fence)
    writer.put(box, "parent ")
    assert writer.drain(box, timeout=10)
    pid = os.fork()
    if pid == 0:  # the child: the parent's writer thread is not here
        ok = False
        try:
            writer.put(box, "child ")
            ok = writer.drain(box, timeout=10)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "".join(texts(bus, gid)) == "parent child "


def entry_count(bus: StreamBus, gid: str) -> int:
    return sum(1 for e in bus.entries(gid) if e.event == DELTA)


def test_a_busy_writer_gathers_many_answers_per_append_and_a_lone_one_is_written_at_once(bus):
    """Group commit: while two or more deltas are due within the wait, the writer waits
    before each batch, so many answers' deltas share a round trip and each answer's share
    one entry; a lone, slow answer never waits (before: no wait, or a wait for every
    delta)."""
    wait_s = 0.3
    writer = StreamWriter(bus, wait_s * 1000, retry_seconds=5)
    lone_gid, fence = running(bus)
    lone = Outbox(lone_gid, fence)
    for word in ("a ", "lone ", "answer "):
        writer.put(lone, word)
        assert writer.drain(lone, timeout=wait_s * 0.8)  # in Redis before a wait could end
        time.sleep(wait_s * 2)
    assert texts(bus, lone_gid) == ["a ", "lone ", "answer "]

    boxes = [Outbox(*running(bus)) for _ in range(20)]
    sent = {box.gid: [] for box in boxes}
    for i in range(30):  # 600 deltas, about 1 ms apart: 20 answers at 33 deltas/s each
        for box in boxes:
            word = f"w{i} "
            writer.put(box, word)
            sent[box.gid].append(word)
            time.sleep(0.001)
    for box in boxes:
        assert writer.drain(box, timeout=10) and not box.failed
        assert "".join(texts(bus, box.gid)) == "".join(sent[box.gid])  # exact, in order
        assert entry_count(bus, box.gid) <= 15  # 30 deltas, about 0.6 s: a few waits' worth
