"""A loopback TCP proxy in front of the web server that can cut the network on demand.

The browser talks to the app through it. ``drop()`` resets every open connection (an
EventSource mid-stream sees its connection die, as on a flaky network) and ``block()``
refuses new ones until ``unblock()``, so a test controls exactly when the page is offline.
It is ``tests/lb_proxy.py``'s load balancer with a single backend.
"""

from __future__ import annotations

from tests.lb_proxy import LoadBalancer


class DroppingProxy(LoadBalancer):
    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__([(target_host, target_port)])
