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

from drsite.core.errors import (
    InvalidReplicaState,
    classify_os_error,
)
from drsite.imagefile import RawImageReader, copy_sparse, pwrite_all
from drsite.replication.resync import Readable, block_digests
from drsite.store.compare import blocks_differ
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
