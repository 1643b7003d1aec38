"""The pytest side of the 3-master Redis Cluster harness (``bench/redis_cluster.py``).

The module-scoped ``redis_cluster`` fixture is a ``RedisCluster3`` shared by one test
module, stopped (every node, and its temp dir) even when the tests fail. Importing the
fixture's function registers it under that name::

    from tests.redis_cluster import redis_cluster_fixture  # noqa: F401

    def test_x(redis_cluster): ...

Tests that ``kill`` a node should take their own ``with RedisCluster3() as cluster:``
instead, since the module's other tests share the fixture's cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.redis_cluster import BUS_OFFSET, SLOTS, RedisCluster3, redis_cli_executable

__all__ = [
    "BUS_OFFSET",
    "SLOTS",
    "RedisCluster3",
    "redis_cli_executable",
    "redis_cluster_fixture",
]


@pytest.fixture(scope="module", name="redis_cluster")
def redis_cluster_fixture() -> Iterator[RedisCluster3]:
    """A 3-master cluster shared by one test module; stopped even if the tests fail."""
    with RedisCluster3() as cluster:
        yield cluster
