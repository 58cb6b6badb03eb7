"""A per-disk durable change log (the seed's Hyper-V Replica log, ``.hrl``).

One file per disk and per rotation: a 256-byte header then fixed 24-byte records, one per
guest write, at the write's own granularity (``offset``, ``length``). The writer follows a
write-ahead rule: :meth:`ChangeLog.append` issues the ``os.write`` of the record *before* the
caller writes the data, so a killed writer never leaves data on disk that the log misses (the
page cache survives a process crash). :meth:`ChangeLog.flush` fsyncs the log; callers fsync the
log before the disk.

Trust rules on (re)open and load:
- header state CLEAN: the log was fsynced and closed; records are trusted after validation;
- header state OPEN and the same boot (a process crash): records are validated; a partial
  record at EOF is dropped; a bad complete record → untrusted;
- header state OPEN and another boot (a host crash lost the page cache) → untrusted;
- OVERFLOW or UNTRUSTED flags in the header → untrusted (the engine resyncs by checksums).

Responsible for: the file format, durability ordering, validation and fast loading into a
coalesced :class:`~drsite.core.extents.ExtentList`. Not responsible for: deciding when to
rotate, what to ship, or resync policy.
"""

from __future__ import annotations

import os
import secrets
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drsite.core.errors import CorruptData, InvalidInput, classify_os_error
from drsite.core.extents import ExtentList, coalesce
from drsite.fsutil import fsync_dir as _fsync_dir

MAGIC = b"DRSHRL01"
VERSION = 1
HEADER_SIZE = 256
RECORD_SIZE = 24
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MAX_RECORD_LEN = 0xFFFF_FFFF  # a longer write is recorded as several records
# what a cap derived from the policy assumes a disk can take: 4 KiB writes at 20 MB/s
ASSUMED_WRITES_PER_S = 5000
CAP_MARGIN = 3.0          # the cycle's own interval plus two missed ones
MAX_CAP_BYTES = 4 << 30


def cap_for_interval(frequency_s: float, *, writes_per_s: int = ASSUMED_WRITES_PER_S,
                     margin: float = CAP_MARGIN) -> int:
    """The change-log cap for a replication interval: one record per write, ``writes_per_s``
    writes per second, for ``margin`` × the interval (so a cycle that comes a couple of
    intervals late still finds a trusted log), never below :data:`DEFAULT_MAX_BYTES` nor above
    4 GiB. A 15-minute policy gets ~324 MB (the fixed 64 MiB held ≈ 9 minutes of 4 KiB writes
    at 20 MB/s: such a policy resynced every cycle under that load)."""
    want = HEADER_SIZE + int(RECORD_SIZE * writes_per_s * max(0.0, frequency_s) * margin)
    return max(DEFAULT_MAX_BYTES, min(MAX_CAP_BYTES, want))

# magic, version, state, flags, salt, record_size, boot_id, epoch, disk_id, reason, pad, crc
_HEADER = struct.Struct("<8sIIIII16s40s64s96s8xI")
assert _HEADER.size == HEADER_SIZE
_RECORD_BODY = struct.Struct("<QIII")  # offset, length, seq, flags (hashed: 5 u32 words)
RECORD_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("seq", "<u4"), ("flags", "<u4"),
                         ("check", "<u4")])
assert RECORD_DTYPE.itemsize == RECORD_SIZE

_M32 = 0xFFFF_FFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593


class LogState(IntEnum):
    OPEN = 1
    CLEAN = 2


class LogFlag(IntEnum):
    OVERFLOW = 1
    UNTRUSTED = 2


def current_boot_id() -> str:
    """The kernel's boot id (changes at every boot); a host crash shows as a different id."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: every process start counts as a new boot (never over-trusts)
        return str(uuid.uuid4())


# --- record checksum -----------------------------------------------------------------------
# MurmurHash3 (x86_32) over the record's five u32 words, seeded with the log's random salt.
# Chosen because it vectorises: numpy u32 arithmetic wraps like the C code, so 1M records are
# verified with ~30 array operations instead of 1M Python-level hash calls. It detects torn
# and garbage records (not adversaries); the salt stops a record from another log validating.

def _rotl_py(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def record_check(salt: int, words: tuple[int, int, int, int, int]) -> int:
    """MurmurHash3_x86_32 of five little-endian u32 words (scalar reference)."""
    h = salt & _M32
    for k in words:
        k = (k * _C1) & _M32
        k = _rotl_py(k, 15)
        k = (k * _C2) & _M32
        h ^= k
        h = _rotl_py(h, 13)
        h = (h * 5 + 0xE6546B64) & _M32
    h ^= 20
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def _rotl_np(x: npt.NDArray[np.uint32], r: int) -> npt.NDArray[np.uint32]:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def record_checks(salt: int, words: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Vectorised :func:`record_check` over an ``(n, 5)`` array of u32 words."""
    h = np.full(words.shape[0], salt & _M32, dtype=np.uint32)
    for i in range(5):
        k = words[:, i] * np.uint32(_C1)
        k = _rotl_np(k, 15) * np.uint32(_C2)
        h ^= k
        h = _rotl_np(h, 13) * np.uint32(5) + np.uint32(0xE6546B64)
    h ^= np.uint32(20)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def encode_record(salt: int, seq: int, offset: int, length: int, flags: int = 0) -> bytes:
    body = _RECORD_BODY.pack(offset, length, seq & _M32, flags)
    w = (offset & _M32, offset >> 32, length, seq & _M32, flags)
    return body + struct.pack("<I", record_check(salt, w))


# --- header --------------------------------------------------------------------------------

@dataclass
class LogHeader:
    state: LogState
    flags: int
    salt: int
    boot_id: str
    epoch: str
    disk_id: str
    reason: str = ""

    def pack(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, int(self.state), self.flags, self.salt, RECORD_SIZE,
                            uuid.UUID(self.boot_id).bytes, self.epoch.encode(),
                            self.disk_id.encode(), self.reason.encode()[:96], 0)
        return body[:-4] + struct.pack("<I", zlib.crc32(body[:-4]))

    @staticmethod
    def unpack(raw: bytes, what: str) -> LogHeader:
        if len(raw) < HEADER_SIZE:
            raise CorruptData(f"{what}: truncated change-log header")
        (magic, version, state, flags, salt, rsize, boot, epoch, disk, reason,
         crc) = _HEADER.unpack(raw[:HEADER_SIZE])
        if magic != MAGIC or version != VERSION or rsize != RECORD_SIZE:
            raise CorruptData(f"{what}: not a drsite change log (v{VERSION})")
        if zlib.crc32(raw[:HEADER_SIZE - 4]) != crc:
            raise CorruptData(f"{what}: change-log header checksum mismatch")
        try:
            st = LogState(state)
        except ValueError as e:
            raise CorruptData(f"{what}: bad change-log state {state}") from e
        return LogHeader(st, flags, salt, str(uuid.UUID(bytes=boot)),
                         epoch.rstrip(b"\0").decode(), disk.rstrip(b"\0").decode(),
                         reason.rstrip(b"\0").decode(errors="replace"))


@dataclass(frozen=True)
class LogContents:
    """What a log file says, after validation. ``extents`` is empty when not ``trusted``."""

    path: Path
    epoch: str
    disk_id: str
    state: LogState
    records: int
    extents: ExtentList
    trusted: bool
    overflowed: bool
    reason: str
    valid_bytes: int  # header + whole valid records (a reopen truncates to this)

    @property
    def covered_bytes(self) -> int:
        """Bytes covered by the coalesced extents (for the "log passes 50% of disk" rule)."""
        return self.extents.total


def _validate(raw: bytes, path: Path, boot_id: str, *, live: bool) -> LogContents:
    hdr = LogHeader.unpack(raw, str(path))
    body = memoryview(raw)[HEADER_SIZE:]
    n = len(body) // RECORD_SIZE
    recs = np.frombuffer(body[: n * RECORD_SIZE], dtype=RECORD_DTYPE)
    overflowed = bool(hdr.flags & LogFlag.OVERFLOW)
    reason = hdr.reason
    trusted = not (hdr.flags & (LogFlag.OVERFLOW | LogFlag.UNTRUSTED))
    if hdr.flags & LogFlag.OVERFLOW and not reason:
        reason = "change log overflowed"
    if trusted and hdr.state is LogState.OPEN and hdr.boot_id != boot_id:
        trusted, reason = False, "host restarted while the change log was open (unflushed changes lost)"
    if trusted and n:
        words = np.frombuffer(body[: n * RECORD_SIZE], dtype="<u4").reshape(n, 6)
        good = (record_checks(hdr.salt, words[:, :5]) == words[:, 5]) & (
            recs["seq"] == np.arange(n, dtype=np.uint32))
        if not bool(good.all()):
            first_bad = int(np.argmin(good))
            # a concurrent reader of a live log may see the last record half-copied: a torn tail
            if live and first_bad == n - 1:
                n -= 1
                recs = recs[:n]
            else:
                trusted, reason = False, f"change-log record {first_bad} of {n} is corrupt"
    if not trusted:
        ext = ExtentList.empty()
    else:
        ext = coalesce(recs["offset"].astype(np.int64), recs["length"].astype(np.int64))
    return LogContents(path, hdr.epoch, hdr.disk_id, hdr.state, n, ext, trusted, overflowed,
                       reason, HEADER_SIZE + n * RECORD_SIZE)


def load_log(path: Path, *, boot_id: str | None = None, live: bool = False) -> LogContents:
    """Read and validate a whole log file (one ``read``, then numpy).

    ``live=True`` when another process may be appending right now (a half-copied last record is
    then dropped rather than distrusted). Raises ``CorruptData`` for a damaged header.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise classify_os_error(e, f"change log {path}") from e
    return _validate(raw, path, boot_id or current_boot_id(), live=live)



class ChangeLog:
    """The writer side of one change-log file (single writer, caller serialises calls).

    Invariants: the header reaches the disk (fsync) in state OPEN before the first record of a
    session is appended, so a host crash always shows as "OPEN under another boot"; once
    untrusted or overflowed, no record is appended again (the log says "resync" and nothing more).
    """

    def __init__(self, path: Path, fd: int, header: LogHeader, records: int, max_bytes: int) -> None:
        self.path = path
        self._fd = fd
        self._hdr = header
        self.records = records
        self.max_records = max(0, (max_bytes - HEADER_SIZE) // RECORD_SIZE)
        self._dirty = False

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, *, epoch: str, disk_id: str, max_bytes: int = DEFAULT_MAX_BYTES,
               boot_id: str | None = None, untrusted_reason: str = "") -> ChangeLog:
        """Create a new empty log (replacing any file at ``path``), durable before returning."""
        if len(epoch.encode()) > 40:
            raise InvalidInput(f"epoch id too long: {epoch!r}")
        hdr = LogHeader(LogState.OPEN, LogFlag.UNTRUSTED if untrusted_reason else 0,
                        secrets.randbits(32), boot_id or current_boot_id(), epoch, disk_id,
                        untrusted_reason)
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.write(fd, hdr.pack())
            os.fsync(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            os.lseek(fd, 0, os.SEEK_END)
        except OSError as e:
            raise classify_os_error(e, f"change log {path}") from e
        return cls(path, fd, hdr, 0, max_bytes)

    @classmethod
    def reopen(cls, path: Path, *, epoch: str, disk_id: str, max_bytes: int = DEFAULT_MAX_BYTES,
               boot_id: str | None = None) -> tuple[ChangeLog, LogContents]:
        """Reopen an existing log for appending after a clean or unclean stop.

        Applies the trust rules (module doc); an untrusted log is kept, flagged UNTRUSTED with
        its reason, so the verdict survives further restarts. A damaged header, or a log of
        another epoch/disk, is replaced by a new log flagged UNTRUSTED.
        """
        boot = boot_id or current_boot_id()
        try:
            contents = load_log(path, boot_id=boot)
        except CorruptData as e:
            log = cls.create(path, epoch=epoch, disk_id=disk_id, max_bytes=max_bytes,
                             boot_id=boot, untrusted_reason=str(e)[-96:])
            return log, load_log(path, boot_id=boot)
        if contents.epoch != epoch or contents.disk_id != disk_id:
            log = cls.create(path, epoch=epoch, disk_id=disk_id, max_bytes=max_bytes, boot_id=boot,
                             untrusted_reason="change log belongs to another epoch or disk")
            return log, load_log(path, boot_id=boot)
        raw_hdr = LogHeader.unpack(path.read_bytes()[:HEADER_SIZE], str(path))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            os.ftruncate(fd, contents.valid_bytes)  # drop a torn tail before appending
        except OSError as e:
            raise classify_os_error(e, f"change log {path}") from e
        hdr = LogHeader(LogState.OPEN, raw_hdr.flags, raw_hdr.salt, boot, epoch, disk_id,
                        raw_hdr.reason)
        if not contents.trusted and not contents.overflowed:
            hdr.flags |= LogFlag.UNTRUSTED
            hdr.reason = contents.reason[:96]
        log = cls(path, fd, hdr, contents.records, max_bytes)
        log._write_header(sync=True)
        os.lseek(fd, 0, os.SEEK_END)
        return log, contents

    # -- state --------------------------------------------------------------------------------
    @property
    def trusted(self) -> bool:
        return not (self._hdr.flags & (LogFlag.OVERFLOW | LogFlag.UNTRUSTED))

    @property
    def overflowed(self) -> bool:
        return bool(self._hdr.flags & LogFlag.OVERFLOW)

    @property
    def reason(self) -> str:
        return self._hdr.reason

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _write_header(self, *, sync: bool) -> None:
        try:
            os.pwrite(self._fd, self._hdr.pack(), 0)
            if sync:
                os.fsync(self._fd)
        except OSError as e:
            raise classify_os_error(e, f"change log {self.path}") from e

    def mark_untrusted(self, reason: str) -> None:
        """Record that changes were lost (e.g. a write bypassed the log); sticky."""
        if self.trusted:
            self._hdr.flags |= LogFlag.UNTRUSTED
            self._hdr.reason = reason[:96]
            self._write_header(sync=False)

    # -- writing ------------------------------------------------------------------------------
    def append(self, offset: int, length: int) -> None:
        """Record a write of ``length`` bytes at ``offset``; call BEFORE writing the data."""
        if length <= 0:
            return
        if not self.trusted:
            return  # the log already says "resync"; details no longer matter
        parts: list[bytes] = []
        while length > 0:
            n = min(length, MAX_RECORD_LEN)
            if self.records + len(parts) >= self.max_records:
                self._hdr.flags |= LogFlag.OVERFLOW
                self._hdr.reason = "change log overflowed"
                self._write_header(sync=False)  # before the data write, like a record
                return
            parts.append(encode_record(self._hdr.salt, self.records + len(parts), offset, n))
            offset += n
            length -= n
        buf = b"".join(parts)
        try:
            written = os.write(self._fd, buf)
        except OSError as e:
            raise classify_os_error(e, f"change log {self.path}") from e
        if written != len(buf):  # short write (disk full): the partial record is a torn tail
            os.ftruncate(self._fd, HEADER_SIZE + self.records * RECORD_SIZE)
            os.lseek(self._fd, 0, os.SEEK_END)
            raise classify_os_error(OSError(28, "short write"), f"change log {self.path}")
        self.records += len(parts)
        self._dirty = True

    def append_many(self, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Record several writes with one ``os.write``; call BEFORE writing any of their data.
        Same records as :meth:`append` called for each in order (checks computed vectorised)."""
        n = len(offsets)
        if n == 0 or not self.trusted:
            return
        ln = np.asarray(lengths, dtype=np.int64)
        if n == 1 or self.records + n > self.max_records or bool((ln <= 0).any()) \
                or bool((ln > MAX_RECORD_LEN).any()):
            for off, length in zip(offsets, lengths, strict=True):  # the rare cases, exactly
                self.append(off, length)
            return
        recs = np.zeros(n, RECORD_DTYPE)
        recs["offset"] = np.asarray(offsets, dtype=np.uint64)
        recs["length"] = ln
        recs["seq"] = (self.records + np.arange(n, dtype=np.int64)) & _M32
        words = recs.view("<u4").reshape(n, 6)
        words[:, 5] = record_checks(self._hdr.salt, words[:, :5])
        buf = recs.tobytes()
        try:
            written = os.write(self._fd, buf)
        except OSError as e:
            raise classify_os_error(e, f"change log {self.path}") from e
        if written != len(buf):  # short write (disk full): partial records are a torn tail
            os.ftruncate(self._fd, HEADER_SIZE + self.records * RECORD_SIZE)
            os.lseek(self._fd, 0, os.SEEK_END)
            raise classify_os_error(OSError(28, "short write"), f"change log {self.path}")
        self.records += n
        self._dirty = True

    def set_max_bytes(self, max_bytes: int) -> None:
        """The cap from now on (a log made ahead of its use takes the one in force then)."""
        self.max_records = max(0, (max_bytes - HEADER_SIZE) // RECORD_SIZE)

    def flush(self) -> None:
        """fsync the log (the guest's flush does this before fsyncing the disk)."""
        if self._dirty and self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise classify_os_error(e, f"change log {self.path}") from e
            self._dirty = False

    def close(self) -> None:
        """Clean close: fsync the records, then mark the header CLEAN (and fsync it)."""
        if self._fd < 0:
            return
        self._dirty = True
        self.flush()
        self._hdr.state = LogState.CLEAN
        self._write_header(sync=True)
        os.close(self._fd)
        self._fd = -1

    def abandon(self) -> None:
        """Close the descriptor without marking clean: what a SIGKILL leaves behind (tests)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def seal(self, sealed_path: Path) -> None:
        """Close cleanly and rename to ``sealed_path`` (durable). The caller opens a new log."""
        self.close()
        try:
            os.replace(self.path, sealed_path)
            _fsync_dir(sealed_path.parent)
        except OSError as e:
            raise classify_os_error(e, f"change log {self.path}") from e
        self.path = sealed_path

    def move(self, path: Path) -> None:
        """Rename the log to ``path``, still open and not durable: a seal's instant, whose
        :meth:`close` (records, then the CLEAN header, fsynced) and the directory's fsync come
        after, before the seal's commit point. A process crash meanwhile leaves an OPEN log
        of this boot (trusted after validation); a host crash, one of another boot
        (untrusted)."""
        try:
            os.replace(self.path, path)
        except OSError as e:
            raise classify_os_error(e, f"change log {self.path}") from e
        self.path = path

    def rotate(self, sealed_path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ChangeLog:
        """:meth:`seal` this log and return a new empty log at the old path."""
        active = self.path
        self.seal(sealed_path)
        return ChangeLog.create(active, epoch=self._hdr.epoch, disk_id=self._hdr.disk_id,
                                max_bytes=max_bytes, boot_id=self._hdr.boot_id)
