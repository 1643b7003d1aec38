"""The hub against real Redis, where Redis fails in the middle of admitting a client."""

from __future__ import annotations

import json
import re
import time
import uuid

import redis

from tidechat.redis_keys import RedisKeys
from tidechat.stream_bus import DELTA, StreamBus, dumps
from tidechat.stream_hub import StreamHub, Subscription

DATA = re.compile(rb"^data: (.*)$", re.M)


def text_of(sub: Subscription, chars: int, timeout: float = 5) -> str:
    """What the subscription delivers, until ``chars`` characters (or the timeout)."""
    text, deadline = "", time.monotonic() + timeout
    while len(text) < chars and time.monotonic() < deadline:
        got = sub.get(0.2)
        if got is not None:
            text += "".join(json.loads(d)["text"] for d in DATA.findall(got[0]))
    return text


def test_a_client_admitted_as_redis_fails_gets_its_gap_once_it_is_back(
    redis_url, redis_client, key_prefix
):
    """Before: a backfill that failed mid-admission left the client joined without it (a
    hole in its text) and dropped the clients admitted after it (503 after 30 s)."""
    keys = RedisKeys(key_prefix + "hub:")
    bus = StreamBus(redis_client, keys, stream_ttl=60)
    gid = uuid.uuid4().hex
    bus.create(gid)
    claim = bus.claim(gid, 60_000)

    def append(seq: int) -> str:
        return bus.append(gid, claim.fence, seq, [(DELTA, dumps({"text": f"t{seq} "}))])

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
