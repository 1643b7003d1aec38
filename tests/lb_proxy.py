"""A loopback TCP load balancer over one or more web processes, with a faulty network.

Clients connect to ``url``; each new connection goes to the next backend in turn
(round-robin), and a backend that refuses the connection is skipped for the one after it,
as a load balancer does with a dead instance. The test controls the network:

- ``drop()`` resets every open connection (RST), as a flaky network does mid-stream;
- ``stall()`` keeps every connection (open ones and new ones) open but forwards no byte in
  either direction until ``unstall()``: a phone network that went quiet without a word;
- ``block()`` refuses new connections until ``unblock()``.

It records the head of every request with the backend that got it and the status code of
its response (``exchanges_to``, ``requests_to``), so tests can count reconnects and see
what each client sent; ``backend_of`` tells which backend an open request is attached to.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

_METHODS = (b"GET ", b"POST", b"PUT ", b"PATC", b"DELE", b"HEAD", b"OPTI")


@dataclass
class Exchange:
    """One request that went through, and (once seen) the status of its response."""

    head: str  # the request line and headers, as sent
    backend: int  # index of the backend it went to
    conn: int  # the connection's number
    at: float  # time.time() when the proxy forwarded it
    status: int | None = None

    @property
    def line(self) -> str:
        return self.head.split("\r\n", 1)[0]

    def header(self, name: str) -> str | None:
        for row in self.head.split("\r\n")[1:]:
            key, _, value = row.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@dataclass
class Connection:
    id: int
    backend: int
    client: socket.socket
    upstream: socket.socket
    exchanges: list[Exchange] = field(default_factory=list)
    alive: bool = True
    dropped: bool = False  # reset by drop(): the pumps leave the sockets alone
    _pumps_left: int = 2


class LoadBalancer:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        if not backends:
            raise ValueError("a load balancer needs at least one backend")
        self.backends = list(backends)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.blocked = False
        self.requests: list[str] = []  # the head of every request that went through
        self.exchanges: list[Exchange] = []
        self._next = 0
        self._ids = itertools.count(1)
        self._conns: dict[int, Connection] = {}
        self._lock = threading.Lock()
        self._flowing = threading.Condition(self._lock)
        self._stalled = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="lb-accept").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    # -- the network ------------------------------------------------------------------
    def set_backend(self, index: int, address: tuple[str, int]) -> None:
        """Point backend ``index`` at a new address (a restarted process)."""
        with self._lock:
            self.backends[index] = address

    def block(self) -> None:
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    def drop(self) -> None:
        """Reset every connection open through the proxy right now."""
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            for conn in conns:
                conn.alive, conn.dropped = False, True
            self._flowing.notify_all()
        for conn in conns:
            _reset(conn.client)
            _reset(conn.upstream)

    def stall(self) -> None:
        """Forward nothing, either way, on any connection (new ones too) until unstall()."""
        with self._lock:
            self._stalled = True

    def unstall(self) -> None:
        with self._lock:
            self._stalled = False
            self._flowing.notify_all()

    @property
    def stalled(self) -> bool:
        return self._stalled

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        self.unstall()
        self.drop()

    # -- what went through ------------------------------------------------------------
    def requests_to(self, path_part: str) -> list[str]:
        """Heads of the requests whose request line contains ``path_part``."""
        return [r for r in list(self.requests) if path_part in r.split("\r\n", 1)[0]]

    def exchanges_to(self, path_part: str) -> list[Exchange]:
        """The requests whose request line contains ``path_part``, oldest first."""
        return [e for e in list(self.exchanges) if path_part in e.line]

    def open_connections(self) -> dict[int, int]:
        """Each open connection's number and the index of the backend it goes to."""
        with self._lock:
            return {c.id: c.backend for c in self._conns.values() if c.alive}

    def backend_of(self, path_part: str) -> int | None:
        """The backend of the newest request to ``path_part`` whose connection is open."""
        with self._lock:
            live = [
                e
                for c in self._conns.values()
                if c.alive
                for e in c.exchanges
                if path_part in e.line
            ]
        return max(live, key=lambda e: e.at).backend if live else None

    # -- plumbing ---------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked:
                _reset(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            start, self._next = self._next, (self._next + 1) % len(self.backends)
            backends = list(self.backends)
        for k in range(len(backends)):
            index = (start + k) % len(backends)
            try:
                upstream = socket.create_connection(backends[index], timeout=5)
            except OSError:  # refused (a dead process): try the next one
                continue
            upstream.settimeout(None)
            break
        else:
            _reset(client)
            return
        if index != start:  # skipped a dead one: the next connection goes past this one
            with self._lock:
                self._next = (index + 1) % len(self.backends)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(next(self._ids), index, client, upstream)
        with self._lock:
            if self._closed:
                conn.alive = False
            else:
                self._conns[conn.id] = conn
        if not conn.alive:
            _reset(client)
            _reset(upstream)
            return
        for src, dst, outbound in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(
                target=self._pump, args=(conn, src, dst, outbound), daemon=True
            ).start()

    def _wait_flowing(self, conn: Connection) -> bool:
        """Block while the network is stalled; False once the connection is gone."""
        with self._lock:
            while self._stalled and conn.alive:
                self._flowing.wait(0.2)
            return conn.alive

    def _pump(self, conn: Connection, src: socket.socket, dst: socket.socket, outbound: bool):
        try:
            # While stalled, read nothing either: the bytes wait in the kernel's buffers.
            while self._wait_flowing(conn):
                data = src.recv(65536)
                if not data or not self._wait_flowing(conn):
                    break
                if outbound:
                    self._record_request(conn, data)
                else:
                    self._record_response(conn, data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                conn.alive = False
                self._conns.pop(conn.id, None)
                conn._pumps_left -= 1
                last = conn._pumps_left == 0
            if not conn.dropped:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                if last:
                    for sock in (src, dst):
                        with contextlib.suppress(OSError):
                            sock.close()

    def _record_request(self, conn: Connection, data: bytes) -> None:
        if data[:4] not in _METHODS:
            return
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        exchange = Exchange(head, conn.backend, conn.id, time.time())
        with self._lock:
            self.requests.append(head)
            self.exchanges.append(exchange)
            conn.exchanges.append(exchange)

    def _record_response(self, conn: Connection, data: bytes) -> None:
        # HTTP/1.1 without pipelining: a response's head starts the first bytes the server
        # sends after the request, so it begins a read.
        if not data.startswith(b"HTTP/1."):
            return
        with self._lock:
            waiting = [e for e in conn.exchanges if e.status is None]
            if waiting:
                with contextlib.suppress(ValueError, IndexError):
                    waiting[0].status = int(data.split(b" ", 2)[1])


def _reset(sock: socket.socket) -> None:
    """Cut a connection at once with an RST, mid-body: SO_LINGER 0, then close. Shutting
    down the reading side first wakes a thread blocked reading it, and sends nothing (a
    FIN would tell the peer the body ended cleanly)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()
