"""The sync journal: the recovery site's durable record of a synchronous item's guest writes.

A file VM in synchronous mode (``mode: sync``) sends every batch of guest writes to the
recovery site before the guest sees it acknowledged; the recovery site appends it here and
answers only once it is flushed (``fdatasync``, or an ``RWF_DSYNC`` write). Each batch is
one *entry* numbered by the guest's mirror (``seq``, +1 per batch, in the guest's write
order). A journal belongs to one *stream* (one
run of the mirror, a uuid) and starts at a *base*: the ``seq`` of a seal instant of that
stream (the cycle record's ``sync`` mark), so that

    the point sealed at (stream, m) + the entries with seq > m  ==  the disks at the last entry

whenever ``base <= m <= last``. Invariants:

- entries are contiguous: the entry after ``k`` is ``k + 1`` (an append out of order is refused);
- ``journal.json`` ``{stream, base}`` is the commit point of :meth:`SyncJournal.begin`: segments
  of another stream, or ending before ``base``, are deleted when the journal is opened;
- an entry is durable when :meth:`SyncJournal.sync` returned after its append, or a later
  ``append(durable=True)`` returned (one ``RWF_DSYNC`` write when nothing else is unflushed:
  it flushes its own range only, so any earlier unflushed entry or new zeros make it a write
  and an ``fdatasync`` instead — ``_dirty`` says which); a crash may
  leave a torn last entry (short, or a CRC mismatch), which :meth:`SyncJournal.open` cuts off,
  as it cuts off anything after the first entry that does not follow its predecessor;
- segments (``seg-<base:016x>.j``) hold entries ``> base``; :meth:`SyncJournal.trim` deletes
  whole segments every entry of which a committed point covers; the first remaining segment's
  base is the journal's ``first_base``;
- the last segment is *preallocated*: zeros are written ``PREALLOC`` ahead of its end, so an
  append overwrites blocks the file already has and its flush is of data only (an
  append past the end of a file also commits its new size: a filesystem journal commit, about
  one more wait per write). Zeros are never an entry (no magic), so a tail of zeros is the
  clean end of a segment, not a torn entry; a segment is cut to its last entry before the
  next one begins.

Responsible for: the journal's files, their crash safety and reading entries back. Not
responsible for: the network (``sitestore.syncserver``), when to trim (the store agent), or
applying entries to disks (``failover``).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drsite.core.errors import Conflict, InvalidInput, PermanentError, classify_os_error
from drsite.fsutil import atomic_write_json, fsync_dir, read_json
from drsite.imagefile import pwrite_all

SEGMENT_BYTES = 64 << 20     # a segment is closed after this much (trim drops whole segments)
PREALLOC = 1 << 20           # zeros written ahead of the last segment's end (see module doc)
_ZEROS = bytes(1 << 20)
MAX_ENTRY = 64 << 20         # largest batch accepted
_SEG_MAGIC = b"DRSJSEG1"
_SEG_HEAD = struct.Struct("<8s16sQ")        # magic, stream uuid bytes, base seq
_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)   # Linux: a write that is its own flush
_ENT_HEAD = struct.Struct("<4sQII")         # magic, seq, payload length, crc32(seq + payload)
_ENT_MAGIC = b"DRSE"
_W_HEAD = struct.Struct("<BQI")             # disk id length, offset, data length
STATE = "journal.json"

Write = tuple[str, int, bytes | bytearray | memoryview]


def encode_writes(writes: Sequence[Write]) -> bytes:
    """One entry's payload: the batch's writes, in order (disk id, offset, data)."""
    parts: list[bytes] = [struct.pack("<I", len(writes))]
    for disk_id, offset, data in writes:
        d = disk_id.encode()
        if not 0 < len(d) < 256:
            raise InvalidInput(f"disk id {disk_id!r} is not 1-255 bytes")
        parts.append(_W_HEAD.pack(len(d), offset, len(data)))
        parts.append(d)
        parts.append(bytes(data))
    return b"".join(parts)


def decode_writes(payload: bytes | memoryview) -> list[tuple[str, int, bytes]]:
    """The writes of one entry's payload; ``InvalidInput`` if it is malformed."""
    mv = memoryview(payload)
    try:
        (n,) = struct.unpack_from("<I", mv, 0)
        pos = 4
        out: list[tuple[str, int, bytes]] = []
        for _ in range(n):
            dlen, offset, length = _W_HEAD.unpack_from(mv, pos)
            pos += _W_HEAD.size
            disk_id = bytes(mv[pos:pos + dlen]).decode()
            pos += dlen
            if pos + length > len(mv):
                raise InvalidInput("sync journal entry: write runs past the payload")
            out.append((disk_id, offset, bytes(mv[pos:pos + length])))
            pos += length
    except (struct.error, UnicodeDecodeError) as e:
        raise InvalidInput(f"sync journal entry is malformed: {e}") from None
    if pos != len(mv):
        raise InvalidInput("sync journal entry has trailing bytes")
    return out


def _crc(seq: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<Q", seq)))


@dataclass(frozen=True)
class Coverage:
    """What the journal can add to a point sealed at ``(stream, mark)``: ``ok`` with the
    entries ``(mark, last]`` to replay, or not, with ``reason`` (the RPO is the point's)."""

    ok: bool
    last: int
    reason: str = ""


class _Segment:
    def __init__(self, path: Path, base: int, fd: int, size: int, last: int,
                 alloc: int) -> None:
        self.path = path
        self.base = base
        self.fd = fd
        self.size = size        # the end of the last entry
        self.last = last        # the last entry's seq (== base when empty)
        self.alloc = alloc      # the file's size: entries, then zeros (preallocated)


class SyncJournal:
    """One item's sync journal in ``directory`` (see module doc). Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._lock = threading.Lock()
        self.stream: str | None = None
        self._segs: list[_Segment] = []
        self.cut_bytes = 0          # bytes of a torn tail cut off at open
        # something appended may not be durable yet (an entry, or zeros written ahead): the
        # next durable append flushes the whole file, not its own range only
        self._dirty = False
        self.readonly = False       # opened by :meth:`open_readonly`
        # +1 at every begin: an append names the run it belongs to (``run=``), so a connection
        # a newer one replaced cannot append into the newer run
        self.run = 0

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path) -> SyncJournal:
        """Open (creating the directory), dropping segments the state does not name and
        cutting a torn or non-contiguous tail."""
        j = cls(directory)
        try:
            j.dir.mkdir(parents=True, exist_ok=True)
            j._load()
        except OSError as e:
            j.close()
            raise classify_os_error(e, f"sync journal {directory}") from e
        return j

    @classmethod
    def open_readonly(cls, directory: Path) -> SyncJournal:
        """Open for reading only, changing nothing on disk: what another process (the agent's
        journal server) may still be appending to. A torn or non-contiguous tail, or a
        segment the state does not name, ends the entries read (as :meth:`open` would cut
        there); :meth:`begin`, :meth:`append` and :meth:`trim` refuse. For break-glass
        failover, which runs beside the agent (``agent/breakglass.py``)."""
        j = cls(directory)
        j.readonly = True
        try:
            j._load()
        except OSError as e:
            j.close()
            raise classify_os_error(e, f"sync journal {directory}") from e
        return j

    def _load(self) -> None:
        state = journal_state(self.dir)
        files = sorted(self.dir.glob("seg-*.j"))
        if not isinstance(state, dict) or "stream" not in state:
            if not self.readonly:
                for f in files:
                    f.unlink()
            return
        stream, base = str(state["stream"]), int(state["base"])
        sid = uuid.UUID(stream).bytes
        expect: int | None = None
        for f in files:
            try:
                fd = os.open(f, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
            except FileNotFoundError:
                if self.readonly and expect is None:
                    continue   # trimmed by the writer since the listing
                raise
            head = os.pread(fd, _SEG_HEAD.size, 0)
            ok = len(head) == _SEG_HEAD.size
            if ok:
                magic, s, seg_base = _SEG_HEAD.unpack(head)
                ok = magic == _SEG_MAGIC and s == sid and seg_base >= base and \
                    (expect is None or seg_base == expect)
            if not ok:  # another stream, or not following: this and every later one go
                os.close(fd)
                if not self.readonly:
                    for g in files[files.index(f):]:
                        g.unlink(missing_ok=True)
                break
            size, last = self._scan(fd, seg_base)
            total = os.fstat(fd).st_size
            self._segs.append(_Segment(f, seg_base, fd, size, last, total))
            expect = last
            if size < total and not _zeros(fd, size, total):
                # torn or foreign tail: cut it (and what follows)
                self.cut_bytes += total - size
                self._segs[-1].alloc = size
                if not self.readonly:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                    for g in files[files.index(f) + 1:]:
                        g.unlink(missing_ok=True)
                break
        self.stream = stream
        if self.readonly:
            return
        # a crashed process may have left entries in the page cache only: the first durable
        # append after an open flushes the whole file
        self._dirty = True
        if not self._segs:
            self._new_segment(base)
        fsync_dir(self.dir)

    @staticmethod
    def _scan(fd: int, base: int) -> tuple[int, int]:
        """(size of the valid prefix, last seq) of a segment."""
        pos, last = _SEG_HEAD.size, base
        total = os.fstat(fd).st_size
        while pos + _ENT_HEAD.size <= total:
            magic, seq, length, crc = _ENT_HEAD.unpack(os.pread(fd, _ENT_HEAD.size, pos))
            if magic != _ENT_MAGIC or seq != last + 1 or length > MAX_ENTRY or \
                    pos + _ENT_HEAD.size + length > total:
                break
            payload = os.pread(fd, length, pos + _ENT_HEAD.size)
            if len(payload) != length or _crc(seq, payload) != crc:
                break
            pos += _ENT_HEAD.size + length
            last = seq
        return pos, last

    def _new_segment(self, base: int) -> None:
        assert self.stream is not None
        path = self.dir / f"seg-{base:016x}.j"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _SEG_HEAD.pack(_SEG_MAGIC, uuid.UUID(self.stream).bytes, base))
            alloc = _write_zeros(fd, _SEG_HEAD.size, _SEG_HEAD.size + PREALLOC)
            os.fsync(fd)
            os.replace(tmp, path)
            fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        self._segs.append(_Segment(path, base, fd, _SEG_HEAD.size, base, alloc))

    # -- state --------------------------------------------------------------------------------
    @property
    def first_base(self) -> int | None:
        with self._lock:
            return self._segs[0].base if self._segs else None

    @property
    def last(self) -> int | None:
        with self._lock:
            return self._segs[-1].last if self._segs else None

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {"stream": self.stream,
                    "first_base": self._segs[0].base if self._segs else None,
                    "last": self._segs[-1].last if self._segs else None,
                    "segments": len(self._segs),
                    "bytes": sum(s.size for s in self._segs)}

    def coverage(self, stream: str | None, mark: int | None) -> Coverage:
        """Whether the entries after a point sealed at ``(stream, mark)`` are all here."""
        with self._lock:
            if not self._segs or self.stream is None:
                return Coverage(False, 0, "the sync journal is empty")
            first, last = self._segs[0].base, self._segs[-1].last
            if stream is None or mark is None:
                return Coverage(False, last, "the point was not sealed in synchronous mode")
            if stream != self.stream:
                return Coverage(False, last, "the sync journal restarted after the point "
                                             "(synchronous mode was suspended)")
            if mark < first:
                return Coverage(False, last, f"the sync journal starts at {first}, after the "
                                             f"point's seal at {mark}")
            if mark > last:
                return Coverage(False, last, f"the sync journal ends at {last}, before the "
                                             f"point's seal at {mark} (synchronous mode was "
                                             "suspended)")
            return Coverage(True, last)

    # -- writing ------------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.readonly:
            raise Conflict(f"sync journal {self.dir} was opened read-only")

    def begin(self, stream: str, base: int, *, after_point: str | bool | None = False) -> None:
        """Start the journal over for ``stream`` at seal instant ``base`` (the previous
        entries are dropped: a journal is one contiguous run). Idempotent for the same
        (stream, base) when nothing was appended yet. ``after_point``: the item's newest
        committed point as this run begins (None: none), kept in ``journal.json`` for
        :func:`outlived` (False: not known, not kept)."""
        uuid.UUID(stream)  # validated
        self._writable()
        state: dict[str, Any] = {"stream": stream, "base": base}
        if after_point is not False:
            state["after_point"] = after_point
        with self._lock:
            self.run += 1
            try:
                if (self.stream == stream and len(self._segs) == 1
                        and self._segs[0].base == base and self._segs[0].last == base):
                    return
                atomic_write_json(self.dir / STATE, state)
                for s in self._segs:
                    os.close(s.fd)
                    s.path.unlink(missing_ok=True)
                self._segs = []
                self.stream = stream
                self._new_segment(base)
                self._dirty = False   # the only segment is new and flushed, nothing after it
            except OSError as e:
                raise classify_os_error(e, f"sync journal {self.dir}") from e

    def append(self, seq: int, payload: bytes | memoryview, *, durable: bool = False,
               run: int | None = None) -> None:
        """Append entry ``seq`` (must be ``last + 1``); durable after :meth:`sync` — or on
        return with ``durable``, which makes every entry appended so far durable (when
        nothing else is pending, one ``pwritev`` with ``RWF_DSYNC`` instead of a write and an
        ``fdatasync``: one system call, the same flush). ``run``: refused (Conflict) unless
        the journal's current run is that one (:attr:`run`, read right after the caller's
        :meth:`begin`)."""
        global _RWF_DSYNC
        if len(payload) > MAX_ENTRY:
            raise InvalidInput(f"sync journal entry of {len(payload)} bytes exceeds {MAX_ENTRY}")
        self._writable()
        with self._lock:
            if run is not None and run != self.run:
                raise Conflict("the sync journal began a newer run")
            if not self._segs:
                raise Conflict("the sync journal was not begun")
            seg = self._segs[-1]
            if seq != seg.last + 1:
                raise Conflict(f"sync journal entry {seq} does not follow {seg.last}")
            try:
                if seg.size >= SEGMENT_BYTES:
                    os.ftruncate(seg.fd, seg.size)   # no zeros before the next segment
                    seg.alloc = seg.size
                    os.fsync(seg.fd)   # the new size too (a zero tail would still read clean)
                    self._new_segment(seg.last)
                    seg = self._segs[-1]
                head = _ENT_HEAD.pack(_ENT_MAGIC, seq, len(payload), _crc(seq, payload))
                end = seg.size + len(head) + len(payload)
                if end > seg.alloc:   # made durable by the next sync, with the entry
                    seg.alloc = _write_zeros(seg.fd, seg.alloc, end + PREALLOC)
                    self._dirty = True
                # RWF_DSYNC flushes the entry's own range (and the metadata it needs) only:
                # with anything else unflushed (earlier entries, new zeros) the whole file is
                # flushed after the write instead
                flush_here = bool(durable and not self._dirty and _RWF_DSYNC)
                try:
                    n = os.pwritev(seg.fd, [head, payload], seg.size,
                                   _RWF_DSYNC if flush_here else 0)
                except OSError as e:
                    if not flush_here or e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    _RWF_DSYNC = 0   # a kernel without per-write flags: write, then flush
                    flush_here = False
                    n = os.pwritev(seg.fd, [head, payload], seg.size)
                if n != len(head) + len(payload):
                    raise PermanentError(f"short write to sync journal {seg.path}")
                seg.size += n
                seg.last = seq
                self._dirty = not flush_here
                if durable and self._dirty:
                    os.fdatasync(seg.fd)
                    self._dirty = False
            except OSError as e:
                raise classify_os_error(e, f"sync journal {self.dir}") from e

    def sync(self) -> None:
        """Make every appended entry durable (one ``fdatasync``: group commit)."""
        with self._lock:   # held through the flush: a durable append waits for it
            if not self._dirty or not self._segs:
                return
            try:
                os.fdatasync(self._segs[-1].fd)
            except OSError as e:
                raise classify_os_error(e, f"sync journal {self.dir}") from e
            self._dirty = False   # only once flushed

    def trim(self, stream: str | None, mark: int | None) -> int:
        """A point sealed at ``(stream, mark)`` is committed: delete the segments all of
        whose entries it covers (never the last one). Returns how many were deleted."""
        self._writable()
        with self._lock:
            if stream is None or mark is None or stream != self.stream:
                return 0
            n = 0
            while len(self._segs) > 1 and self._segs[1].base <= mark:
                s = self._segs.pop(0)
                os.close(s.fd)
                s.path.unlink(missing_ok=True)
                n += 1
            if n:
                fsync_dir(self.dir)
            return n

    # -- reading ------------------------------------------------------------------------------
    def entries_after(self, mark: int) -> Iterator[tuple[int, bytes]]:
        """``(seq, payload)`` of every entry with ``seq > mark``, in order."""
        with self._lock:
            segs = [(s.fd, s.base, s.size) for s in self._segs]
        for fd, base, size in segs:
            pos, last = _SEG_HEAD.size, base
            while pos < size:
                _, seq, length, _crc32 = _ENT_HEAD.unpack(os.pread(fd, _ENT_HEAD.size, pos))
                if seq != last + 1:
                    raise PermanentError(f"sync journal {self.dir} is not contiguous at {seq}")
                if seq > mark:
                    yield seq, os.pread(fd, length, pos + _ENT_HEAD.size)
                pos += _ENT_HEAD.size + length
                last = seq

    def close(self) -> None:
        with self._lock:
            for s in self._segs:
                try:
                    os.close(s.fd)
                except OSError:
                    pass
            self._segs = []


def _zeros(fd: int, start: int, end: int) -> bool:
    """Whether bytes ``[start, end)`` of ``fd`` are all zero (a preallocated tail)."""
    while start < end:
        chunk = os.pread(fd, min(len(_ZEROS), end - start), start)
        if not chunk or chunk != _ZEROS[:len(chunk)]:
            return False
        start += len(chunk)
    return True


def _write_zeros(fd: int, start: int, end: int) -> int:
    """Write zeros over ``[start, end)`` (rounded up to 4 KiB); the new end."""
    end = (end + 4095) & ~4095
    pos = start
    while pos < end:
        n = min(len(_ZEROS), end - pos)
        pwrite_all(fd, memoryview(_ZEROS)[:n], pos)
        pos += n
    return end


def journal_state(directory: Path) -> dict[str, Any] | None:
    """``journal.json`` of a journal directory (no lock, no open), or None (missing or
    damaged: a ``begin`` that never committed)."""
    try:
        raw = read_json(Path(directory) / STATE)
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


def outlived(state: dict[str, Any] | None, latest_id: str | None,
             latest_mark: dict[str, Any] | None) -> bool:
    """Whether a journal (its ``journal.json`` ``state``) can no longer serve any failover,
    given the item's newest committed point (``latest_id``, its ``sync`` mark): only a
    failover to "latest" replays, and only when that point was sealed in the journal's stream.
    A point committed after the run began (``after_point``) that is not of the stream was
    sealed after the stream's mirror ended (a VM seals one cycle at a time, and a mirror
    marks every seal while it lives): mode asynchronous, or a new mirror whose own run
    replaces this one. Never for a journal that does not record ``after_point``."""
    if not isinstance(state, dict) or "after_point" not in state or latest_id is None:
        return False
    after = state["after_point"]
    if after is not None and latest_id <= str(after):   # p%012d: ordered as strings
        return False
    return (latest_mark or {}).get("stream") != state.get("stream")


def replay(journal: SyncJournal, mark: int, images: dict[str, Path]) -> tuple[int, int]:
    """Apply the entries after ``mark`` to raw disk ``images`` (disk id → path), in order,
    then fsync them. Idempotent (the same writes in the same order). Returns (entries, bytes).
    ``PermanentError`` when an entry names a disk that is not given or writes past its end."""
    fds: dict[str, int] = {}
    sizes: dict[str, int] = {}
    n = nbytes = 0
    try:
        for disk_id, path in images.items():
            fds[disk_id] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            sizes[disk_id] = os.fstat(fds[disk_id]).st_size
        for _seq, payload in journal.entries_after(mark):
            for disk_id, offset, data in decode_writes(payload):
                fd = fds.get(disk_id)
                if fd is None or offset + len(data) > sizes[disk_id]:
                    raise PermanentError(f"sync journal entry {_seq} writes outside the "
                                         f"recovery images (disk {disk_id!r} at {offset})")
                pwrite_all(fd, data, offset)
                nbytes += len(data)
            n += 1
        for fd in fds.values():
            os.fsync(fd)
    except OSError as e:
        raise classify_os_error(e, "replaying the sync journal") from e
    finally:
        for fd in fds.values():
            os.close(fd)
    return n, nbytes
