"""The hub against real Redis, where Redis fails in the middle of admitting a client."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable

import redis

from tidechat.redis_keys import RedisKeys
from tidechat.stream_bus import DELTA, DONE, StreamBus, dumps
from tidechat.stream_hub import StreamHub, Subscription

DATA = re.compile(rb"^data: (.*)$", re.M)


def text_of(sub: Subscription, chars: int, timeout: float = 5) -> str:
    """What the subscription delivers, until ``chars`` characters (or the timeout)."""
    text, deadline = "", time.monotonic() + timeout
    while len(text) < chars and time.monotonic() < deadline:
        got = sub.get(0.2)
        if got is not None:
            text += "".join(json.loads(d).get("text", "") for d in DATA.findall(got[0]))
    return text


def ends_within(sub: Subscription, timeout: float) -> bool:
    """Whether the subscription reaches its stream's end within ``timeout``."""
    deadline = time.monotonic() + timeout
    while sub.status != "ended" and time.monotonic() < deadline:
        sub.get(0.1)
    return sub.status == "ended"


def test_a_client_admitted_as_redis_fails_gets_its_gap_once_it_is_back(
    redis_url, redis_client, key_prefix
):
    """Before: a backfill that failed mid-admission left the client joined without it (a
    hole in its text) and dropped the clients admitted after it (503 after 30 s)."""
    keys = RedisKeys(key_prefix + "hub:")
    bus = StreamBus(redis_client, keys, stream_ttl=60)
    gid, append = _stream_of(bus)
    ids = [append(seq) for seq in (1, 2, 3)]
    hub = StreamHub(redis_url, keys, 60, block_ms=200, reap_interval=0.2)
    try:
        ahead = hub.subscribe(gid)
        assert ahead.wait_ready(5) and text_of(ahead, 9) == "t1 t2 t3 "

        real_xrange, failed = hub._reader.xrange, []

        def xrange_failing_once(*args, **kwargs):  # the backfill is the hub's one XRANGE
            if not failed:
                failed.append(True)
                raise redis.ConnectionError("Redis went away")
            return real_xrange(*args, **kwargs)

        hub._reader.xrange = xrange_failing_once
        behind = hub.subscribe(gid, ids[0])  # needs t2 and t3 from a backfill
        after = hub.subscribe(gid, ids[1])
        assert behind.wait_ready(5) and after.wait_ready(5)
        assert failed
        append(4)
        assert text_of(behind, 9) == "t2 t3 t4 "
        assert text_of(after, 6) == "t3 t4 "
    finally:
        hub.stop()


def _stream_of(bus: StreamBus) -> tuple[str, Callable[[int], str]]:
    """A new running generation, and its append(seq) of the text ``t<seq> ``."""
    gid = uuid.uuid4().hex
    bus.create(gid)
    claim = bus.claim(gid, 60_000)

    def append(seq: int) -> str:
        return bus.append(gid, claim.fence, seq, [(DELTA, dumps({"text": f"t{seq} "}))])

    return gid, append


def _streams_at_t1(
    client: redis.Redis, prefix: str, n: int
) -> tuple[RedisKeys, StreamBus, list[tuple[str, Callable[[int], str]]], list[str]]:
    """``n`` running generations under ``prefix``, each with ``t1 `` appended: the keys,
    the bus, each one's (gid, append) and the id of its ``t1``."""
    keys = RedisKeys(prefix)
    bus = StreamBus(client, keys, stream_ttl=60)
    streams = [_stream_of(bus) for _ in range(n)]
    return keys, bus, streams, [append(1) for _, append in streams]


def test_a_paced_reader_delivers_every_entry_of_every_stream_once(
    redis_url, redis_client, key_prefix
):
    """The reader waits between reads in proportion to the streams it watches (here 10 ms
    each, so a read at most every 0.2 s): entries appended meanwhile arrive at the next
    read, none lost or doubled, for clients from the start and from a cursor."""
    keys, _, streams, firsts = _streams_at_t1(redis_client, key_prefix + "hub-pace:", 20)
    hub = StreamHub(redis_url, keys, 60, block_ms=200, reap_interval=0.2, pace_s=0.01)
    try:
        subs = [(hub.subscribe(gid), hub.subscribe(gid, first)) for (gid, _), first in
                zip(streams, firsts, strict=True)]  # fmt: skip
        for seq in (2, 3, 4):
            for _, append in streams:
                append(seq)
            time.sleep(0.05)
        for whole, rest in subs:
            assert text_of(whole, 12) == "t1 t2 t3 t4 "
            assert text_of(rest, 9) == "t2 t3 t4 "
            assert whole.get(0.3) is None and rest.get(0) is None  # nothing more, no repeats
    finally:
        hub.stop()


def test_the_reader_cut_off_mid_read_reconnects_and_goes_on_exactly(
    redis_url, redis_client, key_prefix
):
    """The reader's connection killed while it blocks in XREAD: it connects again and
    reads on from its cursors, nothing lost or doubled."""
    keys = RedisKeys(key_prefix + "hub-kill:")
    bus = StreamBus(redis_client, keys, stream_ttl=60)
    gid, append = _stream_of(bus)
    append(1)
    hub = StreamHub(redis_url, keys, 60, block_ms=5000, reap_interval=5)
    try:
        sub = hub.subscribe(gid)
        assert sub.wait_ready(5) and text_of(sub, 3) == "t1 "
        name = f"tidechat-hub-{hub.id[:8]}-reader"
        blocked = [c["id"] for c in redis_client.client_list()
                   if c["name"] == name and c["cmd"] == "xread"]  # fmt: skip
        assert len(blocked) == 1
        assert redis_client.client_kill_filter(_id=blocked[0]) == 1
        append(2)
        append(3)
        assert text_of(sub, 6, timeout=10) == "t2 t3 "
        assert sub.get(0.3) is None
    finally:
        hub.stop()


def test_a_reader_watching_many_streams_reads_those_that_moved_exactly(
    redis_url, redis_client, key_prefix
):
    """Past ``direct_max`` watched streams the reader blocks on the moved stream and reads
    only the streams named there. With a reap interval far longer than the test (no full
    read to fall back on), every delta and end still arrives once, for clients that came
    before, during and after the switch, from the start and from a cursor."""
    keys, bus, streams, firsts = _streams_at_t1(redis_client, key_prefix + "hub-moved:", 12)
    hub = StreamHub(redis_url, keys, 60, block_ms=200, reap_interval=60, direct_max=4)
    try:
        subs = []
        for (gid, append), first in zip(streams, firsts, strict=True):
            subs.append((hub.subscribe(gid), hub.subscribe(gid, first)))
            append(2)
            time.sleep(0.01)
        for _, append in streams:
            append(3)
        for whole, rest in subs:
            assert text_of(whole, 9) == "t1 t2 t3 "
            assert text_of(rest, 6) == "t2 t3 "
        assert hub._moved_cursor is not None  # the reader did follow the moved stream
        for gid, append in streams[:6]:
            append(4)
            bus.finish(gid, DONE, {"finish_reason": "stop"}, "done", 1)
        for (whole, rest), ended in zip(subs, [True] * 6 + [False] * 6, strict=True):
            for sub in (whole, rest):
                assert text_of(sub, 3, timeout=5 if ended else 0.2) == ("t4 " if ended else "")
                assert ends_within(sub, 5 if ended else 0) is ended
    finally:
        hub.stop()


def test_a_stream_whose_moved_hint_is_lost_is_still_read_within_a_reap_interval(
    redis_url, redis_client, key_prefix
):
    """The moved stream is capped: a reader far behind may find a hint trimmed away.
    Entries with no hint (written past the scripts) still arrive at the next full read,
    all of them though they fill several reads' COUNT, once; and the streams with hints
    are not held up meanwhile."""
    keys, _, streams, _ = _streams_at_t1(redis_client, key_prefix + "hub-lost:", 3)
    hub, subs = _hub_following_moved(redis_url, keys, streams, reap_interval=1.0)
    try:
        unhinted = keys.generation(streams[0][0]).stream
        for n in range(5):
            redis_client.xadd(unhinted, {"event": DELTA, "data": dumps({"text": f"u{n} "})})
        streams[1][1](2)
        assert text_of(subs[1], 3, timeout=0.8) == "t2 "  # its hint: at once
        # No hint: at the next full read (within about a second), not one COUNT per read.
        assert text_of(subs[0], 15, timeout=2.2) == "u0 u1 u2 u3 u4 "
        assert subs[0].get(1.5) is None and subs[2].get(0) is None
    finally:
        hub.stop()


def test_a_stream_that_moved_more_than_one_read_holds_is_read_to_its_end(
    redis_url, redis_client, key_prefix
):
    """One append (one hint) of more entries than the reader's COUNT: the reader reads
    that stream again until it has them all, rather than waiting for a next hint."""
    keys, bus, streams, _ = _streams_at_t1(redis_client, key_prefix + "hub-count:", 2)
    hub, subs = _hub_following_moved(redis_url, keys, streams, reap_interval=60)
    try:
        gid = streams[0][0]
        bus.append(gid, 1, 2, [(DELTA, dumps({"text": f"u{n} "})) for n in range(7)])
        assert text_of(subs[0], 21, timeout=3) == "u0 u1 u2 u3 u4 u5 u6 "
        assert subs[0].get(0.3) is None
    finally:
        hub.stop()


def _hub_following_moved(
    redis_url: str, keys: RedisKeys, streams: list, reap_interval: float
) -> tuple[StreamHub, list[Subscription]]:
    """A hub that follows the moved stream from its second stream, two entries per read,
    and a subscription from the start to each stream, which has delivered its ``t1``."""
    hub = StreamHub(redis_url, keys, 60, block_ms=200, reap_interval=reap_interval,
                    read_count=2, direct_max=1)  # fmt: skip
    subs = [hub.subscribe(gid) for gid, _ in streams]
    if not all(text_of(sub, 3) == "t1 " for sub in subs):
        hub.stop()
        raise AssertionError("the streams' first entries did not arrive")
    return hub, subs
