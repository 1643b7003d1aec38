"""A loopback TCP proxy in front of the web server that can cut the network on demand.

The browser talks to the app through it. ``drop()`` resets every open connection (an
EventSource mid-stream sees its connection die, as on a flaky network) and ``block()``
refuses new ones until ``unblock()``, so a test controls exactly when the page is offline.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class DroppingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.blocked = False
        self.requests: list[str] = []  # the head of every request that went through
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def block(self) -> None:
        self.blocked = True

    def unblock(self) -> None:
        self.blocked = False

    def drop(self) -> None:
        """Reset every connection open through the proxy right now."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _reset(sock)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.drop()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst, log in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, log), daemon=True).start()

    def requests_to(self, path_part: str) -> list[str]:
        """Heads of the requests whose request line contains ``path_part``."""
        return [r for r in list(self.requests) if path_part in r.split("\r\n", 1)[0]]

    def _pump(self, src: socket.socket, dst: socket.socket, log: bool) -> None:
        try:
            while data := src.recv(65536):
                if log and data[:4] in (b"GET ", b"POST", b"PATC", b"DELE", b"HEAD"):
                    self.requests.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Cut a connection at once, mid-body (shutdown also wakes a thread blocked on it)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
