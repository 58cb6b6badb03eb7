"""A small synchronous QMP client (QEMU Machine Protocol: JSON objects over a unix socket).

Responsible for: the greeting and ``qmp_capabilities`` negotiation, running one command at a
time with a deadline (:meth:`QmpClient.execute`), buffering asynchronous events and waiting for
them (:meth:`QmpClient.wait_event`), and translating every failure into :mod:`drsite.core.errors`:

* a QMP error reply → :class:`QmpCommandError` (permanent), or :class:`QmpInvalidArgument`
  (an ``InvalidInput``) when QEMU refused the arguments, or :class:`QmpNotFound` for
  ``DeviceNotFound``;
* socket errors, EOF, timeouts, and garbage on the wire → :class:`drsite.core.errors.NetworkError`
  (transient; the connection is closed and must be reopened).

Not responsible for: starting or supervising QEMU, out-of-band execution, file-descriptor
passing, or deciding what a command failure means for replication (callers do that). One client
serialises its callers with a lock; it is not meant for heavy concurrent use.
"""

from __future__ import annotations

import array
import json
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from drsite.core.errors import (
    DrsiteError,
    HypervisorError,
    InvalidInput,
    NetworkError,
    NotFound,
    PermanentError,
)

_MAX_LINE = 16 * 1024 * 1024
_MAX_EVENTS = 10_000

JsonObj = dict[str, Any]


class QmpCommandError(HypervisorError):
    """QEMU answered a command with an error; ``qmp_class`` and ``desc`` are QEMU's words."""

    default_hint = "QEMU refused the command; see the message, fix the VM's state, then retry."

    def __init__(self, command: str, qmp_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {qmp_class}: {desc}")
        self.command = command
        self.qmp_class = qmp_class
        self.desc = desc


class QmpInvalidArgument(InvalidInput):
    """QEMU refused the arguments of a command (missing/unknown parameter, wrong type)."""

    def __init__(self, command: str, qmp_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {desc}")
        self.command = command
        self.qmp_class = qmp_class
        self.desc = desc


class QmpNotFound(NotFound):
    """QEMU does not know the device, node or job named in the command."""

    def __init__(self, command: str, qmp_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {desc}")
        self.command = command
        self.qmp_class = qmp_class
        self.desc = desc


_ARG_MARKERS = ("Parameter '", "Invalid parameter", "parameter '", "Expected '", "doesn't support")


def error_from_reply(command: str, err: JsonObj) -> DrsiteError:
    """Translate the ``error`` member of a QMP reply into a drsite error."""
    cls = str(err.get("class", "GenericError"))
    desc = str(err.get("desc", ""))
    if cls == "DeviceNotFound":
        return QmpNotFound(command, cls, desc)
    if cls == "GenericError" and any(m in desc for m in _ARG_MARKERS):
        return QmpInvalidArgument(command, cls, desc)
    return QmpCommandError(command, cls, desc)


class QmpClient:
    """One QMP connection, negotiated and ready for commands.

    Build it with :meth:`connect`. ``greeting`` holds QEMU's ``QMP`` greeting object (version,
    capabilities). Events that arrive while waiting for a reply are kept (at most 10 000, oldest
    dropped) until :meth:`wait_event` or :meth:`take_events` consumes them.
    """

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self._path = path
        self._buf = bytearray()
        self._events: deque[JsonObj] = deque(maxlen=_MAX_EVENTS)
        self._lock = threading.RLock()
        self._next_id = 0
        self._closed = False
        self.greeting: JsonObj = {}

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> QmpClient:
        """Connect to the QMP unix socket ``path``, read the greeting, enter command mode.

        Raises ``NetworkError`` if the socket cannot be reached or QEMU does not answer in
        ``timeout`` seconds, ``PermanentError`` if the peer does not speak QMP.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise NetworkError(f"QMP {path}: cannot connect ({e.strerror or e})") from e
        client = cls(sock, path)
        try:
            greeting = client._read_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise PermanentError(f"QMP {path}: peer did not send a QMP greeting: {greeting!r}")
            client.greeting = greeting["QMP"]
            client.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        """Close the socket; idempotent. Buffered events stay readable."""
        if not self._closed:
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- commands ------------------------------------------------------------------------------

    def execute(self, command: str, arguments: JsonObj | None = None, *,
                timeout: float = 30.0, fds: Sequence[int] = ()) -> Any:
        """Run ``command`` with ``arguments`` and return the ``return`` member of the reply.

        Raises ``QmpCommandError``/``QmpInvalidArgument``/``QmpNotFound`` when QEMU refuses,
        ``NetworkError`` on socket errors, EOF or when no reply comes within ``timeout`` seconds
        (the connection is then closed: a late reply would be mismatched).
        """
        with self._lock:
            if self._closed:
                raise NetworkError(f"QMP {self._path}: connection is closed")
            self._next_id += 1
            msg_id = f"drsite-{self._next_id}"
            msg: JsonObj = {"execute": command, "id": msg_id}
            if arguments:
                msg["arguments"] = arguments
            deadline = time.monotonic() + timeout
            self._send(msg, fds)
            while True:
                reply = self._read_message(deadline)
                if "event" in reply:
                    self._events.append(reply)
                    continue
                if reply.get("id") != msg_id:
                    self.close()
                    raise NetworkError(f"QMP {self._path}: reply for another command: {reply!r}")
                if "error" in reply:
                    raise error_from_reply(command, reply["error"])
                if "return" not in reply:
                    self.close()
                    raise NetworkError(f"QMP {self._path}: malformed reply {reply!r}")
                return reply["return"]

    # --- events ---------------------------------------------------------------------------------

    def take_events(self, name: str | None = None) -> list[JsonObj]:
        """Remove and return the buffered events (only those called ``name`` if given)."""
        with self._lock:
            if name is None:
                out = list(self._events)
                self._events.clear()
                return out
            out = [e for e in self._events if e.get("event") == name]
            rest = [e for e in self._events if e.get("event") != name]
            self._events.clear()
            self._events.extend(rest)
            return out

    def wait_event(self, name: str, *, timeout: float = 30.0,
                   match: Callable[[JsonObj], bool] | None = None) -> JsonObj:
        """Return (and remove) the first buffered or incoming event ``name`` accepted by ``match``
        (which sees the event's ``data``). Raises ``NetworkError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            for ev in list(self._events):
                if ev.get("event") == name and (match is None or match(ev.get("data", {}))):
                    self._events.remove(ev)
                    return ev
            if self._closed:
                raise NetworkError(f"QMP {self._path}: connection is closed")
            while True:
                msg = self._read_message(deadline, close_on_timeout=False)
                if "event" not in msg:
                    self.close()
                    raise NetworkError(f"QMP {self._path}: unexpected message {msg!r}")
                if msg["event"] == name and (match is None or match(msg.get("data", {}))):
                    return msg
                self._events.append(msg)

    # --- wire -------------------------------------------------------------------------------------

    def _send(self, msg: JsonObj, fds: Sequence[int] = ()) -> None:
        """``fds`` go along (SCM_RIGHTS) with the message (``getfd``)."""
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                n = self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", fds))])
                data = data[n:]
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise NetworkError(f"QMP {self._path}: send failed ({e.strerror or e})") from e

    def _read_message(self, deadline: float, *, close_on_timeout: bool = True) -> JsonObj:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    self.close()
                    raise NetworkError(f"QMP {self._path}: not JSON: {line[:200]!r}") from e
                if not isinstance(obj, dict):
                    self.close()
                    raise NetworkError(f"QMP {self._path}: not a JSON object: {line[:200]!r}")
                return obj
            if len(self._buf) > _MAX_LINE:
                self.close()
                raise NetworkError(f"QMP {self._path}: message longer than {_MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                if close_on_timeout:
                    self.close()
                raise NetworkError(f"QMP {self._path}: no answer in time")
            try:
                self._sock.settimeout(left)
                chunk = self._sock.recv(65536)
            except TimeoutError as e:
                if close_on_timeout:
                    self.close()
                raise NetworkError(f"QMP {self._path}: no answer in time") from e
            except OSError as e:
                self.close()
                raise NetworkError(f"QMP {self._path}: receive failed ({e.strerror or e})") from e
            if not chunk:
                self.close()
                raise NetworkError(f"QMP {self._path}: QEMU closed the connection")
            self._buf += chunk


def wait_for_monitor(proc: subprocess.Popen[bytes], sock: Path, timeout: float, what: str,
                     detail: Callable[[], str] = lambda: "") -> None:
    """Wait until the freshly started QEMU process ``proc`` answers on its QMP socket
    ``sock`` (a connection is accepted and closed). ``PermanentError`` if it exits first,
    ``NetworkError`` (after killing it) if ``timeout`` passes; both name ``what`` and end with
    ``detail()`` (its log, say)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise PermanentError(f"{what} exited with {proc.returncode}{detail()}")
        if sock.exists():
            try:
                QmpClient.connect(str(sock), timeout=2.0).close()
                return
            except NetworkError:
                pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise NetworkError(f"{what} did not open its QMP socket in {timeout:.0f}s{detail()}")
        time.sleep(0.01)
