"""The test load balancer (tests/lb_proxy.py) does what the SSE tests rely on."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.lb_proxy import LoadBalancer
from tests.stack import free_port


class Backend:
    """A tiny HTTP server: answers every GET with its one-letter name, records all bytes."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.received = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while data := conn.recv(65536):
                self.received += data
                if data.startswith(b"GET "):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + self.name)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def backends():
    made = [Backend(b"A"), Backend(b"B")]
    yield made
    for backend in made:
        backend.close()


def get(sock: socket.socket, path: str = "/x") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    sock.settimeout(5)
    data = b""
    while not data.endswith((b"A", b"B")):
        chunk = sock.recv(1024)
        assert chunk, "closed"
        data += chunk
    return data[-1:]


def test_round_robin_skips_a_refusing_backend(backends):
    a, b = backends
    lb = LoadBalancer([a.address, ("127.0.0.1", free_port()), b.address])
    try:
        seen = []
        for _ in range(4):
            with socket.create_connection(lb.listener.getsockname()) as sock:
                seen.append(get(sock))
        assert seen == [b"A", b"B", b"A", b"B"]
        assert [x.backend for x in lb.exchanges] == [0, 2, 0, 2]
        assert all(x.status == 200 for x in lb.exchanges)
    finally:
        lb.close()


def test_drop_resets_open_connections_and_backend_of_finds_them(backends):
    a, b = backends
    lb = LoadBalancer([a.address, b.address])
    try:
        one = socket.create_connection(lb.listener.getsockname())
        two = socket.create_connection(lb.listener.getsockname())
        assert get(one, "/one") == b"A" and get(two, "/two") == b"B"
        assert lb.backend_of("/one") == 0 and lb.backend_of("/two") == 1
        assert sorted(lb.open_connections().values()) == [0, 1]
        lb.drop()
        for sock in (one, two):
            with pytest.raises(ConnectionResetError):  # an RST, not a clean end
                sock.recv(1024)
            sock.close()
        assert lb.backend_of("/one") is None and lb.open_connections() == {}
    finally:
        lb.close()


def test_stall_holds_every_byte_of_open_and_new_connections_until_unstall(backends):
    a, _ = backends
    lb = LoadBalancer([a.address])
    try:
        before = socket.create_connection(lb.listener.getsockname())
        assert get(before) == b"A"
        lb.stall()
        during = socket.create_connection(lb.listener.getsockname())
        sent = len(a.received)
        for sock in (before, during):
            sock.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1024)
        time.sleep(0.2)
        assert len(a.received) == sent  # nothing reached the backend either
        lb.unstall()
        for sock in (before, during):
            sock.settimeout(5)
            assert sock.recv(1024).endswith(b"A")
            sock.close()
        assert len(lb.requests_to("/held")) == 2
    finally:
        lb.close()
