"""A small pure-Python NBD client (fixed newstyle handshake, structured replies, meta contexts,
block status, pipelined reads).

Responsible for: the handshake with ``NBD_OPT_STRUCTURED_REPLY``, ``NBD_OPT_SET_META_CONTEXT``
(``base:allocation``, ``qemu:dirty-bitmap:NAME``) and ``NBD_OPT_GO``; ``NBD_CMD_READ``,
``WRITE``, ``FLUSH``, ``BLOCK_STATUS`` and ``DISC``; many requests in flight with replies matched
by cookie (:meth:`NbdClient.read_extents`); translating failures into :mod:`drsite.core.errors`:

* socket errors, EOF, timeouts, short reads and server I/O errors → ``NetworkError`` (transient);
  server ``ENOSPC`` → ``LowDiskSpace``; server ``EPERM``/``EINVAL``/``EOVERFLOW``/``ENOTSUP``
  (a request the server will never accept) → :class:`NbdRequestRefused` (permanent);
* a peer that breaks the protocol (bad magic, unknown cookie, chunk outside its request,
  missing data) → :class:`NbdProtocolError` (permanent).

After any transport or protocol error the connection is closed; open a new one to retry.
Not responsible for: TLS, ``NBD_OPT_EXPORT_NAME`` (old servers), extended headers (64-bit
lengths), TRIM/WRITE_ZEROES/CACHE, or thread safety (one client per thread).
"""

from __future__ import annotations

import errno
import io
import socket
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

import numpy as np
import numpy.typing as npt

from drsite.core.errors import (
    HypervisorError,
    InvalidInput,
    LowDiskSpace,
    NetworkError,
    NotFound,
    PermanentError,
)
from drsite.core.extents import I64, ExtentList, coalesce

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT | 1
REP_ERR_POLICY = REP_ERR_BIT | 2
REP_ERR_UNKNOWN = REP_ERR_BIT | 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15

STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME

BASE_ALLOCATION = "base:allocation"

_REQ = struct.Struct(">IHHQQI")
_STRUCTURED = struct.Struct(">HHQI")  # after the 4-byte magic
_SIMPLE = struct.Struct(">IQ")  # after the 4-byte magic
_MAX_OPT_REPLY = 1 << 20
_MAX_CHUNK = 64 << 20
# qemu-nbd's default maximum request (NBD_MAX_BUFFER_SIZE)
DEFAULT_MAX_REQUEST = 32 << 20
_STATUS_SPAN = 1 << 30

_REFUSED = {errno.EPERM, errno.EINVAL, errno.EOVERFLOW, errno.ENOTSUP}


def dirty_bitmap_context(name: str) -> str:
    """The meta context name under which qemu exports dirty bitmap ``name``."""
    return f"qemu:dirty-bitmap:{name}"


class NbdProtocolError(HypervisorError):
    """The server broke the NBD protocol; retrying the same server will not help."""

    default_hint = "The NBD server misbehaved; check its version and logs."


class NbdRequestRefused(HypervisorError):
    """The server refused a request it will never accept (EPERM, EINVAL, ENOTSUP...)."""

    def __init__(self, message: str, nbd_errno: int) -> None:
        super().__init__(message)
        self.nbd_errno = nbd_errno


@dataclass
class _Request:
    cookie: int
    cmd: int
    offset: int
    length: int
    buf: memoryview | None = None
    received: int = 0
    done: bool = False
    error: int = 0
    message: str = ""
    status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportInfo:
    """What ``NBD_OPT_GO`` told us about the export."""

    name: str
    size: int
    transmission_flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_REQUEST

    @property
    def read_only(self) -> bool:
        return bool(self.transmission_flags & TFLAG_READ_ONLY)


class NbdClient:
    """One NBD connection to one export, after a successful handshake.

    Build it with :meth:`connect_unix` (or :meth:`handshake` on a connected socket).
    ``contexts`` maps the negotiated meta context names to their ids. Requests may be
    pipelined; :meth:`read_extents` keeps ``inflight`` reads outstanding.
    """

    def __init__(self, sock: socket.socket, what: str) -> None:
        self._sock = sock
        self._rfile = cast(io.BufferedReader, sock.makefile("rb", buffering=1 << 18))
        self._what = what
        self._closed = False
        self._next_cookie = 1
        self._pending: dict[int, _Request] = {}
        self.structured = False
        self.contexts: dict[str, int] = {}
        self.info = ExportInfo("", 0, 0)
        #: the most requests this connection ever had outstanding at once (for metrics/tests)
        self.peak_inflight = 0

    # --- connection -------------------------------------------------------------------------

    @classmethod
    def connect_unix(cls, path: str, export: str, *, meta_contexts: Iterable[str] = (),
                     timeout: float = 30.0) -> NbdClient:
        """Connect to the NBD server on unix socket ``path`` and open ``export``.

        Every name in ``meta_contexts`` must be granted by the server, else ``NotFound``
        (e.g. a dirty bitmap that is not exported). ``timeout`` bounds every socket operation.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        what = f"NBD {path}:{export}"
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise NetworkError(f"{what}: cannot connect ({e.strerror or e})") from e
        client = cls(sock, what)
        try:
            client.handshake(export, list(meta_contexts))
        except BaseException:
            client._shutdown()
            raise
        return client

    def handshake(self, export: str, meta_contexts: list[str]) -> None:
        """Fixed newstyle negotiation: structured replies, meta contexts, then ``GO``."""
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise self._protocol("not a newstyle NBD server")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._protocol("server does not support fixed newstyle negotiation")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        name = export.encode()

        rtype, _ = self._option(OPT_STRUCTURED_REPLY, b"")
        if rtype == REP_ACK:
            self.structured = True
        elif rtype != REP_ERR_UNSUP:
            raise self._protocol(f"unexpected reply {rtype:#x} to STRUCTURED_REPLY")

        if meta_contexts:
            if not self.structured:
                raise PermanentError(f"{self._what}: server has no structured replies, "
                                     "so no block status")
            queries = b"".join(struct.pack(">I", len(q.encode())) + q.encode()
                               for q in meta_contexts)
            data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta_contexts))
            self._send_option(OPT_SET_META_CONTEXT, data + queries)
            while True:
                rtype, payload = self._option_reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype == REP_META_CONTEXT and len(payload) >= 4:
                    (cid,) = struct.unpack(">I", payload[:4])
                    self.contexts[payload[4:].decode(errors="replace")] = cid
                    continue
                raise self._option_error("SET_META_CONTEXT", rtype, payload)
            missing = [q for q in meta_contexts if q not in self.contexts]
            if missing:
                raise NotFound(f"{self._what}: server does not offer {', '.join(missing)}",
                               hint="Export the dirty bitmap with the NBD export "
                                    "(qemu-nbd -B NAME or block-export-add bitmaps).")

        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send_option(OPT_GO, data)
        size = tflags = -1
        blocks = (1, 4096, DEFAULT_MAX_REQUEST)
        while True:
            rtype, payload = self._option_reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype != REP_INFO:
                raise self._option_error("GO", rtype, payload)
            if len(payload) < 2:
                raise self._protocol("short NBD_REP_INFO")
            (itype,) = struct.unpack(">H", payload[:2])
            if itype == INFO_EXPORT and len(payload) == 12:
                size, tflags = struct.unpack(">QH", payload[2:])
            elif itype == INFO_BLOCK_SIZE and len(payload) == 14:
                mn, pref, mx = struct.unpack(">III", payload[2:])
                blocks = (mn, pref, mx)
        if size < 0:
            raise self._protocol("GO finished without NBD_INFO_EXPORT")
        self.info = ExportInfo(export, size, tflags, blocks[0], blocks[1],
                               min(blocks[2], DEFAULT_MAX_REQUEST))

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.info.size

    def close(self) -> None:
        """Send ``NBD_CMD_DISC`` (best effort) and close the socket; idempotent."""
        if self._closed:
            return
        try:
            self._send(_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except NetworkError:
            pass
        self._shutdown()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- commands -------------------------------------------------------------------------------

    def readinto(self, offset: int, buf: memoryview, *, inflight: int = 16) -> None:
        """Fill ``buf`` with the export's bytes at ``offset`` (split and pipelined).

        Raises ``InvalidInput`` if the range passes the end of the export.
        """
        self._check_range(offset, len(buf))
        self._pipelined(CMD_READ, offset, buf, inflight)

    def read(self, offset: int, length: int) -> bytes:
        """The export's bytes at ``[offset, offset + length)``."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def read_extents(self, extents: ExtentList | Iterable[tuple[int, int]], *,
                     inflight: int = 16, request_size: int | None = None
                     ) -> Iterator[tuple[int, memoryview]]:
        """Read ``extents`` with up to ``inflight`` requests outstanding; yield
        ``(offset, data)`` pieces (at most ``request_size`` bytes each) in extent order.

        Each yielded buffer is fresh and owned by the caller. Not responsible for deciding
        which extents to read (see :meth:`dirty_extents`, :meth:`allocated_extents`).
        """
        if inflight < 1:
            raise InvalidInput("inflight must be at least 1")
        step = self._request_size(request_size)
        window: deque[_Request] = deque()

        def pieces() -> Iterator[tuple[int, int]]:
            for off, ln in extents:
                self._check_range(off, ln)
                end = off + ln
                while off < end:
                    n = min(step, end - off)
                    yield off, n
                    off += n

        for off, n in pieces():
            if len(window) >= inflight:
                req = window.popleft()
                self._finish(req)
                assert req.buf is not None
                yield req.offset, req.buf
            window.append(self._submit(CMD_READ, off, n, buf=memoryview(bytearray(n))))
        while window:
            req = window.popleft()
            self._finish(req)
            assert req.buf is not None
            yield req.offset, req.buf

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, inflight: int = 16
              ) -> None:
        """Write ``data`` at ``offset`` (split and pipelined); returns when the server has
        acknowledged every piece. Raises ``InvalidInput`` on a read-only export."""
        if self.info.read_only:
            raise InvalidInput(f"{self._what}: the export is read-only")
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        self._pipelined(CMD_WRITE, offset, mv, inflight)

    def _pipelined(self, cmd: int, offset: int, mv: memoryview, inflight: int) -> None:
        """READ into / WRITE from ``mv`` at ``offset`` in pieces of the request size, with up to
        ``inflight`` requests outstanding; returns when every piece is acknowledged."""
        self._pipeline(cmd, [(offset, mv)], inflight)

    def _pipeline(self, cmd: int, ranges: Iterable[tuple[int, memoryview]],
                  inflight: int) -> None:
        """READ into / WRITE from each ``(offset, buffer)`` in pieces of the request size, with
        up to ``inflight`` requests outstanding across all of them; returns when every piece
        is acknowledged."""
        step = self._request_size(None)
        window: deque[_Request] = deque()
        for offset, mv in ranges:
            pos = 0
            while pos < len(mv):
                if len(window) >= inflight:
                    self._finish(window.popleft())
                n = min(step, len(mv) - pos)
                piece = mv[pos:pos + n]
                if cmd == CMD_READ:
                    window.append(self._submit(cmd, offset + pos, n, buf=piece))
                else:
                    window.append(self._submit(cmd, offset + pos, n, payload=piece))
                pos += n
        while window:
            self._finish(window.popleft())

    def read_many(self, offsets: Sequence[int], lengths: Sequence[int], buf: memoryview, *,
                  inflight: int = 16) -> None:
        """Read the extents ``(offsets[i], lengths[i])`` into ``buf`` (their bytes concatenated,
        in order), pipelined: scattered small extents cost a request each, not a round trip."""
        mv = buf.cast("B") if buf.format != "B" else buf
        if sum(lengths) != len(mv):
            raise InvalidInput(f"{self._what}: the extents do not fill the buffer")
        ranges = []
        pos = 0
        for off, n in zip(offsets, lengths, strict=True):
            self._check_range(off, n)
            ranges.append((off, mv[pos:pos + n]))
            pos += n
        self._pipeline(CMD_READ, ranges, max(1, inflight))

    def write_many(self, writes: Iterable[tuple[int, bytes | bytearray | memoryview]], *,
                   inflight: int = 16) -> None:
        """Write each ``(offset, data)``, pipelined; returns when the server has acknowledged
        every piece (a guest's queue of requests)."""
        if self.info.read_only:
            raise InvalidInput(f"{self._what}: the export is read-only")
        ranges = []
        for off, data in writes:
            mv = memoryview(data).cast("B")
            self._check_range(off, len(mv))
            ranges.append((off, mv))
        self._pipeline(CMD_WRITE, ranges, max(1, inflight))

    def flush(self) -> None:
        """``NBD_CMD_FLUSH`` if the server supports it (else a no-op)."""
        if self.info.transmission_flags & TFLAG_SEND_FLUSH:
            self._finish(self._submit(CMD_FLUSH, 0, 0))

    def block_status(self, offset: int, length: int) -> dict[str, list[tuple[int, int]]]:
        """One ``NBD_CMD_BLOCK_STATUS``: per negotiated context, ``(length, flags)``
        descriptors from ``offset`` on. The server may describe less than ``length``."""
        if not self.contexts:
            raise InvalidInput(f"{self._what}: no meta context was negotiated")
        self._check_range(offset, length)
        req = self._submit(CMD_BLOCK_STATUS, offset, length)
        self._finish(req)
        by_id = {v: k for k, v in self.contexts.items()}
        return {by_id[cid]: descs for cid, descs in req.status.items()}

    def extents(self, context: str, offset: int = 0, length: int | None = None
                ) -> tuple[I64, I64, npt.NDArray[np.uint32]]:
        """Block status of ``context`` over ``[offset, offset + length)`` (default: the whole
        export) as ``(starts, lengths, flags)`` arrays covering the range without gaps;
        neighbours with equal flags are not merged."""
        if context not in self.contexts:
            raise InvalidInput(f"{self._what}: meta context {context} was not negotiated")
        end = self.size if length is None else offset + length
        self._check_range(offset, end - offset)
        starts: list[int] = []
        lens: list[int] = []
        flags: list[int] = []
        pos = offset
        while pos < end:
            descs = self.block_status(pos, min(end - pos, _STATUS_SPAN)).get(context, [])
            if not descs:
                raise self._protocol(f"no block status for {context} at {pos}")
            for ln, fl in descs:
                n = min(ln, end - pos)
                if n <= 0:
                    break
                starts.append(pos)
                lens.append(n)
                flags.append(fl)
                pos += n
        return (np.asarray(starts, np.int64), np.asarray(lens, np.int64),
                np.asarray(flags, np.uint32))

    def dirty_extents(self, bitmap: str) -> ExtentList:
        """The ranges marked dirty in the exported bitmap ``bitmap``, coalesced."""
        starts, lens, flags = self.extents(dirty_bitmap_context(bitmap))
        sel = (flags & STATE_DIRTY) != 0
        return coalesce(starts[sel], lens[sel])

    def allocated_extents(self) -> ExtentList:
        """The ranges ``base:allocation`` does not report as holes (may hold data), coalesced."""
        starts, lens, flags = self.extents(BASE_ALLOCATION)
        sel = (flags & STATE_HOLE) == 0
        return coalesce(starts[sel], lens[sel])

    # --- transmission ------------------------------------------------------------------------------

    def _request_size(self, wanted: int | None) -> int:
        step = min(wanted or (4 << 20), self.info.max_block or DEFAULT_MAX_REQUEST)
        return max(step, 1)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidInput(f"{self._what}: range [{offset}, {offset + length}) passes the "
                               f"end of the export ({self.size} bytes)")

    def _submit(self, cmd: int, offset: int, length: int, *, buf: memoryview | None = None,
                payload: memoryview | None = None) -> _Request:
        if self._closed:
            raise NetworkError(f"{self._what}: connection is closed")
        cookie = self._next_cookie
        self._next_cookie += 1
        req = _Request(cookie, cmd, offset, length, buf)
        self._pending[cookie] = req
        self.peak_inflight = max(self.peak_inflight, len(self._pending))
        self._send(_REQ.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length))
        if payload is not None:
            self._send(payload)
        return req

    def _finish(self, req: _Request) -> None:
        """Read replies until ``req`` is complete; raise its error if it failed."""
        while not req.done:
            self._read_reply()
        if req.error:
            raise self._server_error(req)
        if req.cmd == CMD_READ and req.received != req.length:
            self._shutdown()
            raise NetworkError(f"{self._what}: short read at {req.offset}: {req.received} of "
                               f"{req.length} bytes")

    def _read_reply(self) -> None:
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = _SIMPLE.unpack(self._recv(_SIMPLE.size))
            req = self._take(cookie)
            if err:
                req.error = err
            elif req.cmd == CMD_READ:
                if self.structured:
                    raise self._protocol("simple reply to a read after structured replies")
                assert req.buf is not None
                self._recv_into(req.buf)
                req.received = req.length
            req.done = True
            del self._pending[cookie]
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            raise self._protocol(f"bad reply magic {magic:#x}")
        rflags, rtype, cookie, length = _STRUCTURED.unpack(self._recv(_STRUCTURED.size))
        req = self._take(cookie)
        if length > _MAX_CHUNK + 8:
            raise self._protocol(f"reply chunk of {length} bytes")
        if rtype == REPLY_TYPE_OFFSET_DATA and req.cmd == CMD_READ:
            if length < 8:
                raise self._protocol("short OFFSET_DATA chunk")
            (off,) = struct.unpack(">Q", self._recv(8))
            n = length - 8
            rel = off - req.offset
            if rel < 0 or rel + n > req.length:
                raise self._protocol(f"data chunk [{off}, {off + n}) outside its request")
            assert req.buf is not None
            self._recv_into(req.buf[rel:rel + n])
            req.received += n
        elif rtype == REPLY_TYPE_OFFSET_HOLE and req.cmd == CMD_READ:
            if length != 12:
                raise self._protocol("bad OFFSET_HOLE chunk")
            off, n = struct.unpack(">QI", self._recv(12))
            rel = off - req.offset
            if rel < 0 or rel + n > req.length:
                raise self._protocol(f"hole chunk [{off}, {off + n}) outside its request")
            assert req.buf is not None
            req.buf[rel:rel + n] = bytes(n)
            req.received += n
        elif rtype == REPLY_TYPE_BLOCK_STATUS and req.cmd == CMD_BLOCK_STATUS:
            if length < 12 or (length - 4) % 8:
                raise self._protocol("bad BLOCK_STATUS chunk")
            payload = self._recv(length)
            (cid,) = struct.unpack(">I", payload[:4])
            if cid not in self.contexts.values():
                raise self._protocol(f"block status for unknown context {cid}")
            arr = np.frombuffer(payload, dtype=">u4", offset=4).reshape(-1, 2)
            req.status[cid] = [(int(a), int(b)) for a, b in arr.tolist()]
        elif rtype & REPLY_TYPE_ERROR_BIT:
            if length < 6:
                raise self._protocol("short error chunk")
            payload = self._recv(length)
            err, mlen = struct.unpack(">IH", payload[:6])
            if 6 + mlen > length or err == 0:
                raise self._protocol("malformed error chunk")
            req.error = req.error or err
            req.message = payload[6:6 + mlen].decode(errors="replace")
        elif rtype == REPLY_TYPE_NONE:
            if length != 0 or not rflags & REPLY_FLAG_DONE:
                raise self._protocol("bad NONE chunk")
        else:
            raise self._protocol(f"unexpected reply chunk type {rtype} for command {req.cmd}")
        if rflags & REPLY_FLAG_DONE:
            req.done = True
            del self._pending[cookie]

    def _take(self, cookie: int) -> _Request:
        req = self._pending.get(cookie)
        if req is None:
            raise self._protocol(f"reply for unknown cookie {cookie}")
        return req

    def _server_error(self, req: _Request) -> Exception:
        what = (f"{self._what}: server error {errno.errorcode.get(req.error, req.error)} on "
                f"command {req.cmd} at {req.offset}+{req.length}"
                + (f": {req.message}" if req.message else ""))
        if req.error == errno.ENOSPC:
            return LowDiskSpace(what)
        if req.error in _REFUSED:
            return NbdRequestRefused(what, req.error)
        return NetworkError(what)

    # --- option haggling ----------------------------------------------------------------------

    def _send_option(self, opt: int, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option(self, opt: int, data: bytes) -> tuple[int, bytes]:
        self._send_option(opt, data)
        return self._option_reply(opt)

    def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, ln = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or ropt != opt:
            raise self._protocol(f"bad option reply (magic {magic:#x}, option {ropt})")
        if ln > _MAX_OPT_REPLY:
            raise self._protocol(f"option reply of {ln} bytes")
        return rtype, self._recv(ln) if ln else b""

    def _option_error(self, what: str, rtype: int, payload: bytes) -> Exception:
        msg = f"{self._what}: {what} refused ({rtype:#x})"
        if payload:
            msg += ": " + payload.decode(errors="replace")
        if rtype == REP_ERR_UNKNOWN:
            return NotFound(msg, hint="Check the export name.")
        if rtype & REP_ERR_BIT:
            return PermanentError(msg)
        return self._protocol(f"unexpected reply {rtype:#x} to {what}")

    # --- wire ------------------------------------------------------------------------------------

    def _protocol(self, msg: str) -> NbdProtocolError:
        self._shutdown()
        return NbdProtocolError(f"{self._what}: {msg}")

    def _shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._pending.clear()
            for c in (self._rfile, self._sock):
                try:
                    c.close()
                except OSError:
                    pass

    def _send(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise NetworkError(f"{self._what}: connection is closed")
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._shutdown()
            raise NetworkError(f"{self._what}: send failed ({e.strerror or e})") from e

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, mv: memoryview) -> None:
        if self._closed:
            raise NetworkError(f"{self._what}: connection is closed")
        got = 0
        try:
            while got < len(mv):
                k = self._rfile.readinto(mv[got:])
                if not k:
                    self._shutdown()
                    raise NetworkError(f"{self._what}: server closed the connection")
                got += k
        except OSError as e:
            self._shutdown()
            raise NetworkError(f"{self._what}: receive failed ({e.strerror or e})") from e
