"""The guest's control channel: JSON lines over a unix socket (like QMP).

Request ``{"cmd": NAME, ...args}``, reply ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code", "class", "message", "hint"}}``; the client turns errors back
into the matching :mod:`drsite.core.errors` class (:func:`~drsite.core.errors.from_dict`).
Commands: ping, status, seal, release, start_tracking, freeze, thaw, write, flush, workload,
shutdown, hold, seal_held, unhold, cut, sync_config.

Responsible for: framing, dispatch and error translation. Not responsible for: what a command
does (that is :class:`~drsite.hypervisors.file.vm.FileVm` and the guest runtime).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from drsite.core import errors as E

log = logging.getLogger(__name__)
Handler = Callable[[dict[str, Any]], Any]
MAX_LINE = 64 * 1024 * 1024


class ControlServer:
    """Serves a handler table on the VM's control socket, one thread per connection."""

    def __init__(self, address: str, handlers: dict[str, Handler]) -> None:
        self.address = address
        self.handlers = handlers
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if not address.startswith("\0"):
            with suppress(FileNotFoundError):
                os.unlink(address)  # stale socket of a killed guest (we hold the VM lock)
        self._sock.bind(address)
        self._sock.listen(16)
        self._sock.settimeout(0.25)  # accept wakes 4x/s to notice stop(): not a busy loop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="drsite-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(2.0)
        with suppress(OSError):
            self._sock.close()
        if not self.address.startswith("\0"):
            with suppress(FileNotFoundError):
                os.unlink(self.address)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        with conn, conn.makefile("rb") as rf:
            for line in rf:
                try:
                    req = json.loads(line)
                    handler = self.handlers.get(req.get("cmd", ""))
                    if handler is None:
                        raise E.InvalidInput(f"unknown command {req.get('cmd')!r}")
                    reply: dict[str, Any] = {"ok": True, "result": handler(req)}
                except Exception as e:
                    if not isinstance(e, E.DrsiteError):
                        log.exception("control command failed")
                    reply = {"ok": False, "error": describe_error(e)}
                try:
                    conn.sendall(dumps(reply))
                except OSError:
                    return


def describe_error(e: BaseException) -> dict[str, str]:
    """The reply's ``error`` for an exception a handler raised: a drsite error as it is,
    anything else (a bug) as a plain permanent error."""
    err = e if isinstance(e, E.DrsiteError) else E.PermanentError(f"{type(e).__name__}: {e}")
    return err.to_dict()


def dumps(obj: Any) -> bytes:
    """One JSON line of the channel."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def call(address: str, cmd: str, *, timeout: float = 120.0, **args: Any) -> Any:
    """One request on a fresh connection. Raises ``NetworkError`` if nobody listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(address)
        except OSError as e:
            raise E.NetworkError(f"guest control socket unreachable: {e.strerror or e}") from e
        s.sendall(dumps({"cmd": cmd, **args}))
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise E.NetworkError(f"guest closed the control socket during {cmd!r}")
            buf += chunk
    except TimeoutError as e:
        raise E.NetworkError(f"guest did not answer {cmd!r} within {timeout:.0f}s") from e
    except OSError as e:
        raise E.NetworkError(f"guest control socket: {e}") from e
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise E.from_dict(reply.get("error"))
    return reply.get("result")


def encode_data(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(data)).decode()


def decode_data(s: str) -> bytes:
    return base64.b64decode(s)
