"""A minimal qemu-guest-agent client: ``guest-sync-delimited``, ``guest-fsfreeze-freeze`` /
``guest-fsfreeze-thaw``, ``guest-shutdown``.

The agent speaks JSON over the host end of the VM's virtio-serial port (a unix socket QEMU
listens on). The socket accepts connections even when no agent runs in the guest, so every
call has a short deadline, and a session starts with ``guest-sync-delimited`` (the reply is
preceded by a 0xFF byte, which flushes stale data out of the channel).

Responsible for: the wire protocol and turning silence or errors into ``NetworkError`` /
``PermanentError``. Not responsible for: deciding consistency (the driver falls back to
crash-consistent and says why) or guest-side configuration of the agent.
"""

from __future__ import annotations

import json
import random
import socket
import time
from types import TracebackType
from typing import Any

from drsite.core.errors import NetworkError, PermanentError


class GuestAgent:
    """One connection to a guest agent socket. Use :meth:`connect` (which syncs)."""

    def __init__(self, sock: socket.socket, path: str, timeout: float) -> None:
        self._sock = sock
        self._path = path
        self._timeout = timeout
        self._buf = bytearray()

    @classmethod
    def connect(cls, path: str, *, timeout: float = 3.0) -> GuestAgent:
        """Connect and ``guest-sync-delimited``; ``NetworkError`` if no agent answers in
        ``timeout`` seconds."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise NetworkError(f"guest agent {path}: cannot connect ({e.strerror or e})") from e
        ga = cls(sock, path, timeout)
        try:
            ga.sync()
        except BaseException:
            ga.close()
            raise
        return ga

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def sync(self) -> None:
        """Resynchronise the channel: send a random id, discard everything until the 0xFF
        delimiter and the reply carrying that id."""
        token = random.randrange(1, 1 << 31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        deadline = time.monotonic() + self._timeout
        while True:
            ff = self._buf.find(b"\xff")
            if ff >= 0:
                del self._buf[:ff + 1]
                break
            self._buf.clear()
            self._recv(deadline)
        while True:
            msg = self._read(deadline)
            if msg.get("return") == token:
                return

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run one agent command; ``PermanentError`` on an error reply, ``NetworkError`` when
        the agent does not answer in time."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._read(time.monotonic() + (timeout or self._timeout))
        if "error" in reply:
            err = reply["error"]
            raise PermanentError(f"guest agent {command}: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    def freeze(self) -> int:
        """Freeze the guest's file systems; returns how many were frozen."""
        return int(self.execute("guest-fsfreeze-freeze", timeout=max(self._timeout, 10.0)))

    def thaw(self) -> int:
        """Thaw the guest's file systems; returns how many were thawed."""
        return int(self.execute("guest-fsfreeze-thaw", timeout=max(self._timeout, 10.0)))

    def shutdown(self) -> None:
        """Ask the guest to power off (``guest-shutdown``; the agent sends no reply)."""
        self._send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})

    # --- wire ---------------------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise NetworkError(f"guest agent {self._path}: send failed ({e})") from e

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NetworkError(f"guest agent {self._path}: no answer in time")
        try:
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
        except TimeoutError as e:
            raise NetworkError(f"guest agent {self._path}: no answer in time") from e
        except OSError as e:
            raise NetworkError(f"guest agent {self._path}: receive failed ({e})") from e
        if not chunk:
            raise NetworkError(f"guest agent {self._path}: connection closed")
        self._buf += chunk

    def _read(self, deadline: float) -> dict[str, Any]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).strip(b"\xff \r\t")
                del self._buf[:nl + 1]
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise NetworkError(f"guest agent {self._path}: not JSON: {line[:100]!r}") \
                        from e
                if isinstance(obj, dict):
                    return obj
                continue
            self._recv(deadline)
