"""Disk images for failover: restoring a recovery point into a sparse raw image, a frozen copy of
a hydrated replica, and verification of an image against a point or a source disk.

Responsible for: producing and checking raw images on the recovery site. Not responsible for:
creating VMs (the hypervisor) or deciding which point to use (the failover actions).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drsite.core.errors import (
    BrokenChain,
    CorruptData,
    InvalidReplicaState,
    ObjectNotFound,
    classify_os_error,
)
from drsite.core.extents import ExtentList
from drsite.imagefile import RawImageReader, copy_sparse, pwrite_all
from drsite.replication.resync import RESYNC_BLOCK, Readable, block_digests
from drsite.store.reader import PointReader, iter_pieces
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

PIECE = 4 << 20
RESTORE_THREADS = 4


@dataclass
class RestoreStats:
    """What a restore did: bytes of data extents read from the store, seconds taken."""

    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def restore_point(repo: Repository, point_id: str, disk_id: str, dest: Path, *,
                  threads: int = RESTORE_THREADS) -> RestoreStats:
    """Write disk ``disk_id`` of ``point_id`` into a new sparse raw image ``dest``.

    Only the point's data extents are read (verified reads, ``threads`` readers in parallel,
    each with its own :class:`PointReader`); all-zero pieces stay holes. ``dest`` is replaced
    from scratch, so a restore interrupted by a crash is simply run again. Raises
    ``CorruptData``/``BrokenChain`` if the store cannot return the point intact.
    """
    t0 = time.monotonic()
    stats = RestoreStats()
    first = repo.reader(point_id, disk_id)
    size = first.size
    pieces = list(iter_pieces(first.data_extents(), PIECE))
    first.close()
    tmp = dest.with_name(f".{dest.name}.restoring")
    local = threading.local()
    readers: list[PointReader] = []
    lock = threading.Lock()
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise classify_os_error(e, f"restore image {tmp}") from e

    def work(piece: tuple[int, int]) -> None:
        r: PointReader | None = getattr(local, "reader", None)
        if r is None:
            r = repo.reader(point_id, disk_id)
            local.reader = r
            with lock:
                readers.append(r)
        off, n = piece
        buf = bytearray(n)
        r.readinto(off, memoryview(buf))
        written = 0
        if np.frombuffer(buf, np.uint8).any():  # an all-zero piece stays a hole
            pwrite_all(fd, buf, off)
            written = n
        with lock:
            stats.bytes_read += n
            stats.bytes_written += written

    try:
        os.ftruncate(fd, size)
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="drsite-restore") as pool:
            for _ in pool.map(work, pieces):
                pass
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
    except OSError as e:
        raise classify_os_error(e, f"restore image {dest}") from e
    finally:
        if fd >= 0:
            os.close(fd)
        for r in readers:
            r.close()
        if tmp.exists():
            tmp.unlink()
    stats.seconds = time.monotonic() - t0
    return stats


def frozen_replica_copy(hydrator: ReplicaHydrator, point_id: str, disk_sizes: dict[str, int],
                        dest_dir: Path, *, attempts: int = 3) -> dict[str, Path] | None:
    """Copy the replica's images while it holds ``point_id``, never writing the replica.

    Consistency without pausing hydration: the hydrator's state is read before and after the
    copy; if it held ``point_id`` with nothing being applied both times, no apply ran in
    between (a started apply leaves ``applying`` set, a finished one a newer point id, and
    point ids are never reused). Returns None when the replica does not hold ``point_id`` or
    kept moving for ``attempts`` tries (the caller restores from the store instead).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(max(1, attempts)):
        if hydrator.state() != (point_id, None):
            return None
        out: dict[str, Path] = {}
        for disk_id, size in disk_sizes.items():
            dst = dest_dir / f"{disk_id}.img"
            copy_sparse(hydrator.disk_path(disk_id), dst, size)
            out[disk_id] = dst
        if hydrator.state() == (point_id, None):
            return out
    return None


COMPARE_BYTES = 4 << 20     # bytes of each side a comparison batch holds
COMPARE_EXTENTS = 512       # extents per batch: a batch's map lookups stay O(batch) numpy work


def _read_batch(r: Readable, offs: npt.NDArray[np.int64], lens: npt.NDArray[np.int64],
                buf: memoryview) -> None:
    """Fill ``buf`` with the extents, concatenated: one ``readv`` when the reader has one (a
    point reader, an image), else one ``readinto`` per extent."""
    readv = getattr(r, "readv", None)
    if readv is not None:
        readv(offs, lens, buf)
        return
    pos = 0
    for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
        r.readinto(off, buf[pos:pos + n])
        pos += n


def compare_batches(extents: ExtentList) -> list[tuple[int, int]]:
    """``[lo, hi)`` index ranges cutting ``extents`` (each at most ``COMPARE_BYTES`` long) into
    batches of at most ``COMPARE_BYTES`` bytes and ``COMPARE_EXTENTS`` extents, in order."""
    out: list[tuple[int, int]] = []
    lo = total = 0
    for i, n in enumerate(extents.lengths.tolist()):
        if i > lo and (total + n > COMPARE_BYTES or i - lo >= COMPARE_EXTENTS):
            out.append((lo, i))
            lo, total = i, 0
        total += n
    if lo < len(extents):
        out.append((lo, len(extents)))
    return out


def blocks_differ(a: Readable, b: Readable, *, block: int = RESYNC_BLOCK) -> int:
    """Number of ``block``-sized blocks in which two readers of equal size differ.

    Every byte either side lists as data (``data_extents``) is read on both sides and compared;
    everything else reads as zeros on both (the readers' contract), so equal there without
    reading. Work is proportional to the data: batches of many extents with one ``readv`` per
    side, no array or loop sized by the disk. An extent either side cannot read intact
    (``CorruptData``, ``BrokenChain``, ``ObjectNotFound``) differs in all its blocks."""
    size = a.size
    if size != b.size:
        return max(1, (max(size, b.size) + block - 1) // block)
    ext = a.data_extents().union(b.data_extents()).clip(size).split(COMPARE_BYTES)
    if len(ext) == 0:
        return 0
    buf_a, buf_b = bytearray(COMPARE_BYTES), bytearray(COMPARE_BYTES)
    va, vb = np.frombuffer(buf_a, np.uint8), np.frombuffer(buf_b, np.uint8)
    differ: list[npt.NDArray[np.int64]] = []
    for lo, hi in compare_batches(ext):
        offs, lens = ext.starts[lo:hi], ext.lengths[lo:hi]
        n = int(lens.sum())
        try:
            _read_batch(a, offs, lens, memoryview(buf_a)[:n])
            _read_batch(b, offs, lens, memoryview(buf_b)[:n])
        except (CorruptData, BrokenChain, ObjectNotFound):
            differ.append(_unreadable_blocks(a, b, offs, lens, block))
            continue
        ne = va[:n] != vb[:n]
        if not ne.any():
            continue
        at = np.flatnonzero(ne)
        pos = np.cumsum(lens) - lens
        i = np.searchsorted(pos, at, "right") - 1
        differ.append(np.unique((offs[i] + (at - pos[i])) // block))
    return int(np.unique(np.concatenate(differ)).size) if differ else 0


def _unreadable_blocks(a: Readable, b: Readable, offs: npt.NDArray[np.int64],
                       lens: npt.NDArray[np.int64], block: int) -> npt.NDArray[np.int64]:
    """A batch that failed to read: compare it extent by extent; an extent that cannot be
    read intact on either side differs in every block it touches."""
    out: list[npt.NDArray[np.int64]] = []
    for off, n in zip(offs.tolist(), lens.tolist(), strict=True):
        one = ExtentList(np.array([off], np.int64), np.array([n], np.int64))
        x, y = bytearray(n), bytearray(n)
        try:
            a.readinto(off, memoryview(x))
            b.readinto(off, memoryview(y))
        except (CorruptData, BrokenChain, ObjectNotFound):
            out.append(one.blocks(block))
            continue
        ne = np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))
        if ne.size:
            out.append(np.unique((off + ne) // block))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def disk_fingerprint(reader: Readable) -> str:
    """A fingerprint of a whole disk: xxh3-128 over its 64 KiB block digests and its size
    (holes are not read). Two disks with equal fingerprints hold equal bytes; used to prove
    across hosts that a replica equals a stopped source disk (planned failover)."""
    import xxhash

    d = block_digests(reader)
    if d.bad.any():
        raise InvalidReplicaState(f"{int(d.bad.sum())} block(s) could not be read intact",
                                  hint="Resync the item, then try again.")
    h = xxhash.xxh3_128()
    h.update(str(reader.size).encode())
    h.update(np.ascontiguousarray(d.digests).tobytes())
    return str(h.hexdigest())


def verify_image_against_point(repo: Repository, point_id: str, disk_id: str, image: Path,
                               size: int) -> None:
    """Raise ``InvalidReplicaState`` unless ``image`` equals disk ``disk_id`` of the point."""
    with RawImageReader(image, size) as r:
        pr = repo.reader(point_id, disk_id)
        try:
            bad = blocks_differ(r, pr)
        finally:
            pr.close()
    if bad:
        raise InvalidReplicaState(f"image {image} differs from point {point_id} disk {disk_id} "
                                  f"in {bad} block(s)",
                                  hint="Restore the point from the store (choose the point "
                                       "explicitly) or resync the item.")


def timed(timings: dict[str, float], name: str) -> Callable[[], None]:
    """Start a stopwatch; calling the returned function stores the seconds under ``name``."""
    t0 = time.monotonic()

    def stop() -> None:
        timings[name] = round(timings.get(name, 0.0) + time.monotonic() - t0, 6)

    return stop
