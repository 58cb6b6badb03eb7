"""The sync mirror's wire format (guest → recovery agent, over mTLS): length-prefixed frames.

Frame = ``type (1 byte) | length (4 bytes, LE) | body``:

- ``JSON`` (0): the client's hello ``{"item_id", "stream", "base"}`` and the server's answer
  ``{"ok": true}`` or ``{"ok": false, "error": DrsiteError.to_dict()}``;
- ``ENTRY`` (1): ``seq (8 bytes) | payload`` (:func:`~drsite.tracking.syncjournal.encode_writes`);
- ``ACK`` (2): ``seq (8 bytes)``: every entry up to ``seq`` is durable on the recovery site.

One connection is one journal run: the hello begins the journal at ``base`` (a seal
instant), entries follow as ``base + 1, base + 2, …``; the connection ends at the first error
(the mirror then waits for the next seal to begin again).

Responsible for: framing. Not responsible for: what the frames mean (mirror, server).
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from drsite.core.errors import NetworkError

T_JSON, T_ENTRY, T_ACK = 0, 1, 2
_HEAD = struct.Struct("<BI")
_SEQ = struct.Struct("<Q")
MAX_FRAME = (64 << 20) + 64
_CHUNK = 64 << 10


def frame(kind: int, body: bytes) -> bytes:
    return _HEAD.pack(kind, len(body)) + body


def json_frame(obj: dict[str, Any]) -> bytes:
    return frame(T_JSON, json.dumps(obj, separators=(",", ":")).encode())


def entry_frame(seq: int, payload: bytes) -> bytes:
    return _HEAD.pack(T_ENTRY, _SEQ.size + len(payload)) + _SEQ.pack(seq) + payload


def ack_frame(seq: int) -> bytes:
    return frame(T_ACK, _SEQ.pack(seq))


def seq_of(body: bytes | memoryview) -> int:
    return int(_SEQ.unpack_from(body, 0)[0])


def entry_payload(body: bytes) -> memoryview:
    return memoryview(body)[_SEQ.size:]


class FrameReader:
    """Reads frames from a (TLS) socket with its own buffer, so :meth:`ready` can tell
    whether a whole frame can be had without blocking (the server's group commit)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        # received into, then appended: no allocation per receive (a TLS read returns at
        # most one record, 16 KiB)
        self._chunk = memoryview(bytearray(_CHUNK))
        self._poller: select.poll | None = None
        self._polled_fd = -1

    def _complete(self) -> bool:
        if len(self._buf) < _HEAD.size:
            return False
        n = int(_HEAD.unpack_from(self._buf, 0)[1])
        if n > MAX_FRAME:
            raise NetworkError(f"sync frame of {n} bytes exceeds the limit")
        return len(self._buf) >= _HEAD.size + n

    def _fill(self) -> None:
        n = self.sock.recv_into(self._chunk)
        if not n:
            raise NetworkError("the sync peer closed the connection")
        self._buf += self._chunk[:n]

    def ready(self) -> bool:
        """A whole frame is buffered, or can be read without waiting."""
        while not self._complete():
            pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
            if not pending and not self._poll()(0):
                return False
            self._fill()
        return True

    def _poll(self) -> Callable[[float], list[tuple[int, int]]]:
        """``poll`` on the socket (not ``select``: no limit on the descriptor's number)."""
        fd = self.sock.fileno()
        if fd < 0:
            raise NetworkError("the sync connection is closed")
        if self._poller is None or fd != self._polled_fd:   # registered by number
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
            self._polled_fd = fd
        return self._poller.poll

    def spin(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Busy-wait, never sleeping, until a whole frame is buffered or bytes are readable
        (True), or ``time.monotonic()`` passes ``until``, or ``stop()`` says so (False). For a
        reader whose answer is due within microseconds: a blocked reader lets its CPU go idle,
        and waking an idle CPU (an inter-processor interrupt; in a VM, an exit to the
        hypervisor) costs tens of µs a message. Each turn is one ``poll(0)``, which releases
        the GIL — too briefly for a waiting thread to take it: other threads of the process
        may wait for the interpreter's forced switch while a spin lasts."""
        if self._complete():
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poll = self._poll()
        while True:
            if poll(0):
                return True
            if time.monotonic() >= until or (stop is not None and stop()):
                return False

    def read(self) -> tuple[int, bytes]:
        """The next frame ``(type, body)``; blocks (socket timeout applies)."""
        while not self._complete():
            self._fill()
        kind, n = _HEAD.unpack_from(self._buf, 0)
        body = bytes(self._buf[_HEAD.size:_HEAD.size + n])
        del self._buf[:_HEAD.size + n]
        return kind, body


def read_json(reader: FrameReader) -> dict[str, Any]:
    kind, body = reader.read()
    if kind != T_JSON:
        raise NetworkError(f"expected a JSON sync frame, got type {kind}")
    try:
        out = json.loads(body)
    except ValueError as e:
        raise NetworkError(f"malformed JSON sync frame: {e}") from None
    if not isinstance(out, dict):
        raise NetworkError("a JSON sync frame is not an object")
    return out


def read_json_body(body: bytes) -> dict[str, Any]:
    """A JSON frame's body as an object (``{}`` when it is not one)."""
    try:
        out = json.loads(body)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}
