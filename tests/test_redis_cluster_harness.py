"""The 3-master Redis Cluster harness (tests/redis_cluster.py) is a real cluster.

Keys spread over all three shards; one hash tag pins keys to one slot, so a multi-key
XREAD over ``{b3}`` streams works and one over two slots is refused (CROSSSLOT); and when
one master is SIGKILLed, its keys fail fast while the other shards keep serving.
"""

from __future__ import annotations

import time

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, RedisClusterException, ResponseError

from tests.redis_cluster import SLOTS, RedisCluster3, redis_cluster_fixture  # noqa: F401


def test_cluster_is_up_with_three_masters(redis_cluster: RedisCluster3) -> None:
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"
    assert len(redis_cluster.ports) == 3
    assert redis_cluster.url_all == "redis+cluster://" + ",".join(
        f"127.0.0.1:{p}" for p in redis_cluster.ports
    )
    owners = redis_cluster.slot_owners()
    assert sorted(owners.values()) == sorted(redis_cluster.ports)
    assert sum(last - first + 1 for first, last in owners) == SLOTS
    info = redis.Redis(port=redis_cluster.ports[1]).cluster("INFO")
    assert info["cluster_state"] == "ok"
    assert int(info["cluster_size"]) == 3


def test_keys_land_on_all_three_shards(redis_cluster: RedisCluster3) -> None:
    client = RedisCluster.from_url(redis_cluster.redis_url)
    try:
        seen: dict[int, str] = {}
        for n in range(200):
            key = f"harness:spread:{n}"
            client.set(key, n)
            seen.setdefault(redis_cluster.node_for_key(key), key)
        assert set(seen) == set(redis_cluster.ports)
        for port, key in seen.items():
            assert client.get(key) == key.rsplit(":", 1)[1].encode()
            # it really is stored on that master, not just routed there
            assert redis.Redis(port=port).get(key) is not None
            assert client.get_node_from_key(key).port == port
    finally:
        client.close()


def test_hash_tag_pins_streams_to_one_slot(redis_cluster: RedisCluster3) -> None:
    client = redis_cluster.client()
    try:
        a, b = "tc:{b3}:stream", "tc:{b3}:events"
        assert redis_cluster.keyslot(a) == redis_cluster.keyslot(b)
        assert redis_cluster.node_for_key(a) == redis_cluster.node_for_key(b)
        client.xadd(a, {"t": "hello"})
        client.xadd(b, {"t": "world"})
        got = client.xread({a: 0, b: 0})
        assert sorted(_stream_name(name) for name, _ in got) == sorted([a, b])

        # two streams on different slots: redis-py refuses before sending...
        c = "tc:{b4}:stream"
        assert redis_cluster.keyslot(c) != redis_cluster.keyslot(a)
        client.xadd(c, {"t": "x"})
        with pytest.raises(RedisClusterException, match="same key slot"):
            client.xread({a: 0, c: 0})
        # ...and the server itself answers CROSSSLOT (even when one master owns both slots)
        node = redis.Redis(port=redis_cluster.node_for_key(a))
        other = redis_cluster.key_on(redis_cluster.node_for_key(a), "x")
        assert redis_cluster.keyslot(other) != redis_cluster.keyslot(a)
        with pytest.raises(ClusterCrossSlotError, match="hash to the same slot") as crossslot:
            node.xread({a: 0, other: 0})
        assert isinstance(crossslot.value, ResponseError)  # "-CROSSSLOT ..." on the wire
        node.close()
    finally:
        client.close()


def _stream_name(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name


def test_dead_shard_fails_its_keys_only() -> None:
    with RedisCluster3() as cluster:
        dead, alive = cluster.ports[0], cluster.ports[1]
        key_a, key_b = cluster.key_on(dead, "a"), cluster.key_on(alive, "b")
        client = RedisCluster.from_url(
            cluster.redis_url, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            client.set(key_a, "A")
            client.set(key_b, "B")
            cluster.kill(dead)  # the seed node, too

            # at once (the survivors still think it is up) and once they flag it FAIL
            for phase in ("just killed", "flagged fail"):
                started = time.monotonic()
                with pytest.raises(redis.ConnectionError):
                    client.get(key_a)
                assert time.monotonic() - started < 3, phase  # refused on loopback: fast
                assert client.get(key_b) == b"B"
                client.set(key_b, "B")
                if phase == "just killed":
                    assert cluster.wait_failed(dead) < 10  # node timeout is 2 s

            # with partial coverage allowed, the survivors still call the cluster ok
            assert redis.Redis(port=alive).cluster("INFO")["cluster_state"] == "ok"

            # a new client seeded only with the dead node cannot start at all...
            with pytest.raises(RedisClusterException):
                RedisCluster(host="127.0.0.1", port=dead, socket_connect_timeout=1)
            # ...one seeded with every node can, and sees the same split
            fresh = cluster.client()  # seeded with all three nodes
            try:
                assert fresh.get(key_b) == b"B"
                with pytest.raises(redis.ConnectionError):
                    fresh.get(key_a)
            finally:
                fresh.close()
        finally:
            client.close()
