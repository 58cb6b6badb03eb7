"""A seeded workload generator: the stand-in for a guest OS writing to its disks.

Every I/O is stamped so tests can prove what a frozen view holds: the first 32 bytes are
``MAGIC, seq, offset, seed`` and the last 8 bytes repeat ``seq`` (a torn block shows as a
header/trailer mismatch). The i-th write of a session (``seq = start_seq + i``) goes to a
position that is a pure function of ``(spec, seq)`` (:func:`plan_writes`), so a test can replay
the writes up to any ``seq`` without a journal.

Responsible for: generating and rate-limiting writes (sleeping, never spinning). Not responsible
for: tracking or copy-before-write (every write goes through a :class:`BlockWriter`, in a running
VM its :class:`~drsite.hypervisors.file.vm.FileVm`).
"""

from __future__ import annotations

import random
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from drsite.core.errors import DrsiteError, InvalidInput
from drsite.core.model import DiskSpec

STAMP_MAGIC = b"DRSWKLD1"
_STAMP = struct.Struct("<8sQQQ")
_TRAILER = struct.Struct("<Q")
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_TICK = 0.005  # rate-limiter granularity (seconds)
_BATCH_BYTES = 4 << 20  # at most this much per batch of writes


@dataclass(frozen=True)
class WorkloadSpec:
    """What the workload writes. ``rate`` is bytes/s (0 = as fast as possible); the region is
    ``[region_offset, region_offset + region_length)`` of every disk (``None`` = to the end);
    ``disks`` empty = all disks, write ``seq`` goes to ``disks[seq % len(disks)]``."""

    pattern: Literal["sequential", "random"] = "random"
    io_size: int = 4096
    rate: int = 20_000_000
    region_offset: int = 0
    region_length: int | None = None
    data: Literal["random", "compressible"] = "random"
    seed: int = 0
    start_seq: int = 1
    disks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pattern not in ("sequential", "random") or self.data not in ("random", "compressible"):
            raise InvalidInput(f"bad workload spec {self!r}")
        if self.io_size < 40 or self.io_size % 8 or self.rate < 0 or self.region_offset < 0:
            raise InvalidInput("workload io_size must be >= 40 and a multiple of 8; rate >= 0")
        if self.region_offset % self.io_size:
            raise InvalidInput("workload region_offset must be a multiple of io_size")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["disks"] = list(self.disks)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> WorkloadSpec:
        d = dict(d)
        d["disks"] = tuple(d.get("disks", ()))
        return WorkloadSpec(**d)


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def slots(spec: WorkloadSpec, disk_size: int) -> int:
    end = disk_size if spec.region_length is None else min(disk_size,
                                                            spec.region_offset + spec.region_length)
    n = (end - spec.region_offset) // spec.io_size
    if n <= 0:
        raise InvalidInput("workload region holds no whole I/O")
    return n


def plan_writes(spec: WorkloadSpec, disk_ids: list[str], disk_size: int,
                seqs: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(disk index into ``disk_ids``, byte offset) of the writes with sequence numbers ``seqs``."""
    s = np.asarray(seqs, dtype=np.uint64)
    targets = list(spec.disks) or disk_ids
    n = np.uint64(slots(spec, disk_size))
    if spec.pattern == "sequential":
        slot = (s - np.uint64(spec.start_seq)) // np.uint64(len(targets)) % n
    else:
        with np.errstate(over="ignore"):
            slot = _splitmix64(s ^ np.uint64((spec.seed * 0x9E3779B1) & _U64)) % n
    idx = np.asarray([disk_ids.index(t) for t in targets], dtype=np.int64)
    disk_idx = idx[(s % np.uint64(len(targets))).astype(np.int64)]
    return disk_idx, spec.region_offset + slot.astype(np.int64) * spec.io_size


def parse_stamp(block: bytes | memoryview) -> tuple[int, int] | None:
    """``(seq, offset)`` of a stamped block, or None if it carries no intact stamp."""
    if len(block) < 40 or bytes(block[:8]) != STAMP_MAGIC:
        return None
    _, seq, offset, _seed = _STAMP.unpack_from(block, 0)
    (trailer,) = _TRAILER.unpack_from(block, len(block) - 8)
    return (int(seq), int(offset)) if trailer == seq else None


class BlockWriter(Protocol):
    """What the workload writes through: a VM's block layer, which tracks every write. The
    workload submits a batch at a time, like a guest's request queue (``tag`` is the batch's
    last sequence number, remembered as the VM's last tag)."""

    def write_many(self, writes: Sequence[tuple[str, int, bytes]], *,
                   tag: int | None = None) -> None:
        ...


class Workload:
    """Runs a :class:`WorkloadSpec` against the ``disks`` of a VM in a background thread,
    writing through ``vm``; stops at the first ``DrsiteError`` (e.g. the VM was closed)."""

    def __init__(self, vm: BlockWriter, disks: Sequence[DiskSpec], spec: WorkloadSpec) -> None:
        self.vm = vm
        self.spec = spec
        self._disk_ids = [d.disk_id for d in disks]
        for t in spec.disks:
            if t not in self._disk_ids:
                raise InvalidInput(f"workload names unknown disk {t!r}")
        sizes = {d.disk_id: d.size for d in disks}
        self._size = min(sizes[t] for t in (spec.disks or tuple(self._disk_ids)))
        slots(spec, self._size)
        self._rng = random.Random(spec.seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drsite-workload", daemon=True)
        self.next_seq = spec.start_seq
        self.bytes_written = 0
        self.error: str | None = None
        self.started_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _payload(self, seq: int, offset: int) -> bytes:
        io = self.spec.io_size
        body = io - _STAMP.size - _TRAILER.size
        if self.spec.data == "random":
            mid = self._rng.randbytes(body)
        else:  # half a repeated pattern, half zeros: compresses about 4:1 or better
            half = body // 2
            mid = (seq.to_bytes(8, "little") * (half // 8 + 1))[:half] + bytes(body - half)
        return _STAMP.pack(STAMP_MAGIC, seq, offset, self.spec.seed) + mid + _TRAILER.pack(seq)

    def _run(self) -> None:
        spec = self.spec
        batch = max(1, min(64, _BATCH_BYTES // spec.io_size))
        t0 = time.monotonic()
        done = 0
        try:
            while not self._stop.is_set():
                if spec.rate:
                    now = time.monotonic()
                    due = spec.rate * (now - t0) - done
                    # wake at most every _TICK and write what accrued in one batch: waking per
                    # I/O would cost more CPU than the I/O itself
                    threshold = max(spec.io_size, min(spec.rate * _TICK, 256 * spec.io_size))
                    if due < threshold:
                        self._stop.wait((threshold - due) / spec.rate)
                        continue
                    if due > spec.rate * 0.05:  # after a pause: no catch-up burst
                        t0 = now - done / spec.rate
                        due = spec.rate * 0.05
                    n = max(1, min(batch * 4, int(due // spec.io_size)))
                else:
                    n = batch
                if self._stop.is_set():
                    return
                seqs = np.arange(self.next_seq, self.next_seq + n, dtype=np.uint64)
                didx, offs = plan_writes(spec, self._disk_ids, self._size, seqs)
                writes = [(self._disk_ids[di], off, self._payload(seq, off))
                          for seq, di, off in zip(seqs.tolist(), didx.tolist(), offs.tolist(),
                                                  strict=True)]
                self.vm.write_many(writes, tag=self.next_seq + n - 1)
                self.next_seq += n
                done += n * spec.io_size
                self.bytes_written += n * spec.io_size
        except DrsiteError as e:  # the VM was closed under us, or a disk error: stop writing
            self.error = str(e)

    def stats(self) -> dict[str, Any]:
        elapsed = max(1e-9, time.monotonic() - self.started_at) if self.started_at else 0.0
        return {"spec": self.spec.to_dict(), "running": self.running, "next_seq": self.next_seq,
                "bytes_written": self.bytes_written, "error": self.error,
                "rate_bps": (self.bytes_written / elapsed) if elapsed else 0.0}
