"""A loopback TCP proxy that can black-hole the link it carries (tests of issue 13).

``Proxy(target_port)`` listens on 127.0.0.1 (``.port``) and forwards every connection to
``127.0.0.1:target_port`` byte for byte (TLS passes through untouched). ``hold()`` stops
forwarding without closing anything: connections stay open, new ones are accepted, bytes are
neither read nor sent — what a hung peer or a partitioned network looks like to a client (no
RST, no FIN: only timeouts tell). ``release()`` forwards again; ``close()`` ends everything.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class Proxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listen = socket.create_server(("127.0.0.1", 0))
        self._listen.setblocking(False)
        self.port: int = self._listen.getsockname()[1]
        self._held = threading.Event()
        self._stop = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._peer: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, daemon=True, name="blackhole-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def hold(self) -> None:
        """Black-hole the link: nothing is forwarded; every socket stays open."""
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for s in list(self._peer):
                with contextlib.suppress(OSError):
                    s.close()
            self._peer.clear()
        self._listen.close()
        self._sel.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listen.accept()
        except BlockingIOError:
            return
        if self._held.is_set():
            # accepted (the TCP handshake completed) but never forwarded: a hung peer
            with self._lock:
                self._peer[client] = client
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
        with self._lock:
            self._peer[client] = upstream
            self._peer[upstream] = client
        self._sel.register(client, selectors.EVENT_READ)
        self._sel.register(upstream, selectors.EVENT_READ)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            other = self._peer.pop(s, None)
            if other is not None and other is not s:
                self._peer.pop(other, None)
        for x in (s, other):
            if x is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(x)
            with contextlib.suppress(OSError):
                x.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._held.is_set():
                # read nothing, send nothing; still accept (and park) new connections
                for key, _ in self._sel.select(timeout=0.05):
                    if key.fileobj is self._listen:
                        self._accept()
                continue
            for key, _ in self._sel.select(timeout=0.05):
                s = key.fileobj
                if s is self._listen:
                    self._accept()
                    continue
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                other = self._peer.get(s)
                if not data or other is None:
                    self._drop(s)
                    continue
                try:
                    other.setblocking(True)
                    other.sendall(data)
                    other.setblocking(False)
                except OSError:
                    self._drop(s)
