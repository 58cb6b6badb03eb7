"""``ReplicaHydrator``: a raw sparse image per disk kept equal to the latest committed point, so
that failover to "latest" boots at once instead of waiting for a full restore.

State lives in ``replica_dir/state.json`` (written atomically: temp file, fsync, rename, fsync
directory)::

    {"point_id": P, "cycle_id": C, "applying": null | {"to": Q, "to_cycle": D, "from": P}}

Invariants:
- ``point_id`` is set only after every image was fsynced holding exactly that point;
- while ``applying`` is set the images are a mix of ``from`` and ``to``; the next
  :meth:`ReplicaHydrator.catch_up` re-applies the same ranges (writes are idempotent: each sets a
  range to ``to``'s bytes), or, if ``to``/``from`` vanished meanwhile, rebuilds from the latest
  point in full;
- a cycle *streamed* into the replica while it is shipped (:meth:`ReplicaHydrator.stream`) is
  marked ``applying`` with ``to: null`` and its cycle id before its first byte is written; its
  point id is known only at commit. ``catch_up`` finds that point by its cycle
  (``committed_cycle``) and re-applies it from the store; a cycle that never committed leaves an
  unknown mix, rebuilt in full.
- ``verified`` (``{"point_id", "cycle_id"}`` or null) names a point V the images were once
  proven equal to, byte for byte, by comparison with the store; since then only ranges of
  ``diff(V, current)`` were written (deltas write a point's changed ranges, and ``diff``
  covers every range whose recorded content changed). So comparing those ranges alone proves
  the images equal the current point (:meth:`ReplicaHydrator.check`). A full write (a
  rebuild, a new disk, a streamed full cycle) clears it and changes ``epoch`` first, in the
  marker saved before its first byte. It is advanced in the background
  (:meth:`ReplicaHydrator.verify_step`, a batch at a time under the caller's lock), so a
  failover usually finds ``verified`` equal to the point it boots and compares nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from drsite import failpoints
from drsite.core.errors import (
    BrokenChain,
    CorruptData,
    InvalidReplicaState,
    ObjectNotFound,
    classify_os_error,
)
from drsite.core.extents import ExtentList
from drsite.core.model import validate_name
from drsite.imagefile import RawImageReader
from drsite.store.compare import COMPARE_BYTES, COMPARE_EXTENTS, ranges_differ
from drsite.store.digest import file_digest, image_digest
from drsite.store.format import ZERO, Entries, PointInfo
from drsite.store.reader import PointReader, iter_pieces
from drsite.store.repository import Repository

PIECE = 4 << 20
BATCH_EXTENTS = 4096  # extents read from the store in one batch
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SYNC_FILE_RANGE_WRITE = 0x02
WRITEBACK_EVERY_S = 0.5  # a streaming replica starts writing its dirty pages back this often
DIRECT_ALIGN = 4096      # offset, length and memory alignment of a direct write
DIRECT_MIN = 256 << 10   # runs at least this large bypass the page cache when they can

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                    ctypes.c_longlong]
        if hasattr(_libc, "sync_file_range"):
            _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong,
                                              ctypes.c_longlong, ctypes.c_uint]
    return _libc


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages back now, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that a later fsync finds little left. Not
    a durability guarantee; a no-op where unsupported."""
    lib = _c()
    if hasattr(lib, "sync_file_range"):
        lib.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` (reads back as zeros). False if unsupported."""
    lib = _c()
    rc = lib.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _drop_cache(fd: int) -> None:
    """Drop an image's (clean, just fsynced) pages from the page cache: nobody reads a replica
    until failover, and the large folios its big writes left would make the next cycle's
    small writes dirty (and write back) whole folios."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make a file range read as zeros: punch a hole, or write zeros where that is unsupported."""
    if length <= 0 or punch_hole(fd, offset, length):
        return
    zeros = bytes(min(PIECE, length))
    for off, n in iter_pieces([(offset, length)], PIECE):
        os.pwrite(fd, zeros[:n], off)


def proven_current(replica_dir: Path, full_every_s: float | None = None) -> bool:
    """Whether the replica in ``replica_dir`` has nothing to verify now: its verified point is
    the point it holds, and (with ``full_every_s``) its last full comparison is recent enough
    (or it holds no point, or one is being applied). Reads the state file only (no
    repository, no lock): a hint for a background pass, never a proof."""
    try:
        st = json.loads((Path(replica_dir) / "state.json").read_bytes())
    except (OSError, ValueError):
        return False
    if not isinstance(st, dict) or st.get("applying") or not st.get("point_id"):
        return True
    ver = st.get("verified")
    if not (isinstance(ver, dict) and ver.get("point_id") == st["point_id"]):
        return False
    full_at = st.get("proven_full_at")
    return full_every_s is None or (isinstance(full_at, int | float)
                                    and time.time() - full_at < full_every_s)


def _new_epoch() -> str:
    """A token that changes whenever the images are rewritten in full (or forgotten)."""
    return os.urandom(8).hex()


def _kept_proof(st: dict[str, Any]) -> dict[str, Any]:
    """The state's proof fields, carried unchanged into a state a delta writes."""
    return {"verified": st["verified"], "epoch": st["epoch"],
            "proven_full_at": st["proven_full_at"]}


def _no_proof() -> dict[str, Any]:
    """The proof fields of images rewritten in full (or forgotten): nothing proven, a new
    epoch."""
    return {"verified": None, "epoch": _new_epoch(), "proven_full_at": None}


@dataclass(frozen=True)
class VerifyScope:
    """What :meth:`ReplicaHydrator.check` compared: ``how`` is ``pre-verified`` (nothing: the
    background verification had proven this point), ``incremental`` (the ranges changed since
    point ``since``) or ``full``; ``bytes`` compared per side."""

    how: str
    bytes: int
    since: str | None


@dataclass
class VerifyProgress:
    """A background verification under way: the point it proves (``target``), the ranges per
    disk still to compare, and the verified point and state epoch it started from."""

    target: PointInfo
    todo: dict[str, ExtentList]
    since: str | None
    epoch: str | None    # the state's epoch: a full rewrite of the images changes it
    full: bool = False   # every range with data is compared (not only what changed)
    compared: int = 0

    def retarget(self, repo: Repository, to: PointInfo) -> None:
        """The replica moved on from ``target`` to ``to`` by deltas: the ranges that changed
        are compared too (against ``to``); disks ``to`` lacks are dropped."""
        todo: dict[str, ExtentList] = {}
        for disk_id in to.disk_sizes:
            changed = repo.diff(self.target.point_id, to.point_id, disk_id)
            left = self.todo.get(disk_id)
            todo[disk_id] = changed if left is None else left.union(changed)
        self.target, self.todo = to, todo

    def next_batch(self) -> tuple[str, ExtentList] | None:
        """The next ranges to compare (at most ``COMPARE_BYTES`` of one disk), taken out of
        ``todo``; None when nothing is left."""
        for disk_id in sorted(self.todo):
            ext = self.todo[disk_id]
            if len(ext) == 0:
                continue
            pieces = ext.split(COMPARE_BYTES)
            ends = np.cumsum(pieces.lengths)
            k = max(1, min(int(np.searchsorted(ends, COMPARE_BYTES, "right")), COMPARE_EXTENTS))
            self.todo[disk_id] = ExtentList(pieces.starts[k:], pieces.lengths[k:])
            return disk_id, ExtentList(pieces.starts[:k], pieces.lengths[:k])
        return None


class ReplicaHydrator:
    """Keeps ``replica_dir/<disk_id>.img`` equal to the latest committed point.

    Responsible for: applying points in order (each point's changed extents, or a map diff when
    points in between were pruned), crash safety of that, and verifying the replica. Not
    responsible for booting VMs or for retention (pass :meth:`pinned` to retention so the point
    the replica holds is not pruned while it lags).
    """

    def __init__(self, repo: Repository, replica_dir: Path) -> None:
        self.repo = repo
        self.dir = Path(replica_dir)
        self._state_path = self.dir / "state.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise classify_os_error(exc, f"replica directory {self.dir}") from exc

    # -- state -------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            data = self._state_path.read_bytes()
        except FileNotFoundError:
            return {"point_id": None, "cycle_id": None, "applying": None, "verified": None,
                    "epoch": None, "proven_full_at": None}
        except OSError as exc:
            raise classify_os_error(exc, f"replica state {self._state_path}") from exc
        try:
            st = json.loads(data)
            ver = st.get("verified")
            return {"point_id": st.get("point_id"), "cycle_id": st.get("cycle_id"),
                    "applying": st.get("applying"),
                    "verified": ver if isinstance(ver, dict) and ver.get("point_id") else None,
                    "epoch": st.get("epoch"), "proven_full_at": st.get("proven_full_at")}
        except (ValueError, AttributeError) as exc:
            raise CorruptData(f"replica state {self._state_path} is damaged: {exc}") from exc

    def _save(self, st: dict[str, Any]) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(st, sort_keys=True).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._state_path)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise classify_os_error(exc, f"replica state {self._state_path}") from exc

    def state(self) -> tuple[str | None, str | None]:
        """(point the replica holds or None, point being applied or None). While a cycle
        streams in before its commit, the second item is ``"cycle:<cycle id>"``."""
        st = self._load()
        ap = st["applying"]
        if not ap:
            return st["point_id"], None
        return st["point_id"], ap.get("to") or f"cycle:{ap.get('to_cycle')}"

    def pinned(self) -> set[str]:
        """Points retention must keep for this replica to catch up cheaply."""
        st = self._load()
        ap = st["applying"] or {}
        return {p for p in (st["point_id"], ap.get("to"), ap.get("from")) if p}

    def disk_path(self, disk_id: str) -> Path:
        return self.dir / f"{validate_name('disk', disk_id)}.img"

    def _has_images(self, point: PointInfo) -> bool:
        return all(self.disk_path(d).exists() for d in point.disk_sizes)

    # -- applying ----------------------------------------------------------------------------

    def _exists(self, point_id: str | None, cycle_id: str | None) -> PointInfo | None:
        """The point if it exists and is the same one we recorded (ids are never reused, the
        cycle check guards against a repository rebuilt from scratch)."""
        if point_id is None:
            return None
        try:
            p = self.repo.point(point_id)
        except ObjectNotFound:
            return None
        return p if cycle_id is None or p.cycle_id == cycle_id else None

    def _plan(self, cur: PointInfo | None, to: PointInfo) -> dict[str, tuple[ExtentList, bool]]:
        """Per disk of ``to``: (ranges to set from ``to``, full) — full means every range not
        listed must be zeroed too (the image's old content is not trusted)."""
        plan: dict[str, tuple[ExtentList, bool]] = {}
        for disk_id in to.disk_sizes:
            reader = self.repo.reader(to.point_id, disk_id)
            if cur is None or disk_id not in cur.disk_sizes:
                plan[disk_id] = (reader.data_extents(), True)
            elif to.base_point_id == cur.point_id:
                plan[disk_id] = (reader.changed_extents(), False)
            else:
                plan[disk_id] = (self.repo.diff(cur.point_id, to.point_id, disk_id), False)
        return plan

    def _write_batch(self, fd: int, reader: PointReader, offs: npt.NDArray[np.int64],
                     lens: npt.NDArray[np.int64], buf: memoryview) -> None:
        """Set the extents ``(offs[i], lens[i])`` of the image to the point's bytes, read in one
        batch (all-zero extents → holes)."""
        total = int(lens.sum())
        view = buf[:total]
        reader.readv(offs, lens, view)
        arr = np.frombuffer(view, np.uint8)
        pos = np.cumsum(lens) - lens
        nonzero = (np.maximum.reduceat(arr, pos) != 0).tolist()
        for off, n, at, nz in zip(offs.tolist(), lens.tolist(), pos.tolist(), nonzero,
                                  strict=True):
            if not nz:
                zero_range(fd, off, n)
                continue
            done = 0
            while done < n:
                done += os.pwrite(fd, view[at + done:at + n], off + done)

    def _apply(self, to: PointInfo, plan: dict[str, tuple[ExtentList, bool]]) -> None:
        buf = memoryview(bytearray(PIECE))
        for disk_id, (ranges, full) in plan.items():
            size = to.disk_sizes[disk_id]
            reader = self.repo.reader(to.point_id, disk_id)
            path = self.disk_path(disk_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise classify_os_error(exc, f"replica image {path}") from exc
            try:
                os.ftruncate(fd, size)
                ranges = ranges.clip(size)
                if full:
                    holes = ExtentList.of([(0, size)]).subtract(ranges) if size else ranges
                    for off, n in holes:
                        zero_range(fd, off, n)
                pieces = ranges.split(PIECE)
                starts, lengths = pieces.starts, pieces.lengths
                ends = np.cumsum(lengths)
                i = 0
                while i < starts.size:  # batches of up to PIECE bytes / BATCH_EXTENTS extents
                    base = int(ends[i - 1]) if i else 0
                    j = int(np.searchsorted(ends, base + PIECE, "right"))
                    j = min(max(j, i + 1), i + BATCH_EXTENTS)
                    self._write_batch(fd, reader, starts[i:j], lengths[i:j], buf)
                    i = j
                os.fsync(fd)
                _drop_cache(fd)
            except OSError as exc:
                raise classify_os_error(exc, f"replica image {path}") from exc
            finally:
                os.close(fd)
                reader.close()
        for stale in self.dir.glob("*.img"):
            if stale.stem not in to.disk_sizes:
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _step(self, cur: PointInfo | None, to: PointInfo) -> None:
        """Apply one point: marker first, then the ranges, then the new state. A full write
        of any disk forgets the verified point (in the marker, before the first byte)."""
        plan = self._plan(cur, to)
        proof = _no_proof() if any(full for _, full in plan.values()) \
            else _kept_proof(self._load())
        self._save({"point_id": cur.point_id if cur else None,
                    "cycle_id": cur.cycle_id if cur else None,
                    "applying": {"to": to.point_id, "to_cycle": to.cycle_id,
                                 "from": cur.point_id if cur else None,
                                 "from_cycle": cur.cycle_id if cur else None},
                    **proof})
        self._apply(to, plan)
        self._save({"point_id": to.point_id, "cycle_id": to.cycle_id, "applying": None,
                    **proof})

    def catch_up(self) -> list[str]:
        """Bring the replica to the latest committed point; returns the point ids applied, in
        order. Re-applies an interrupted point first. Idempotent; safe after any crash."""
        applied: list[str] = []
        st = self._load()
        cur = self._exists(st["point_id"], st["cycle_id"])
        if cur is not None and not self._has_images(cur):
            # its images were moved out (a failover killed mid-way, or a hand): the state
            # names a point the directory does not hold; rebuild in full
            cur = None
        ap = st["applying"]
        if ap:
            frm = self._exists(ap.get("from"), ap.get("from_cycle"))
            if ap.get("to"):
                to = self._exists(ap.get("to"), ap.get("to_cycle"))
            else:  # a streamed cycle: its point, if it was committed
                to = self.repo.committed_cycle(ap["to_cycle"]) if ap.get("to_cycle") else None
            if to is not None:
                # the images mix ``from`` and ``to``: same plan again (or full if ``from`` left)
                cur = self._step_or_jump(frm, to)
                applied.append(cur.point_id)
            else:
                cur = None  # unknown mix: rebuild from the latest in full
        # cur is None also when the point the replica held was pruned: full rebuild from latest
        while True:
            pts = self.repo.points()
            if not pts:
                break
            if cur is None:
                nxt = pts[-1]  # jump straight to the latest: one full apply, not a chain
            else:
                later = [p for p in pts if p.seq > cur.seq]
                if not later:
                    break
                nxt = later[0]
            cur = self._step_or_jump(cur, nxt)
            applied.append(cur.point_id)
        return applied

    def _step_or_jump(self, cur: PointInfo | None, to: PointInfo) -> PointInfo:
        """Apply ``to``; if its data is damaged and a later point exists (a resync that repaired
        the damage), jump from ``cur`` straight to the latest point instead. ``diff(cur,
        latest)`` covers every range ``to`` touched, so a half-applied ``to`` is overwritten."""
        try:
            self._step(cur, to)
            return to
        except (CorruptData, BrokenChain):
            latest = self.repo.latest()
            if latest is None or latest.seq <= to.seq:
                raise
            self._step(cur, latest)
            return latest

    # -- verification ------------------------------------------------------------------------

    def verified(self) -> str | None:
        """The point the images were last proven equal to (see the module doc), or None."""
        ver = self._load()["verified"]
        return str(ver["point_id"]) if ver else None

    def _settled(self, st: dict[str, Any]) -> PointInfo | None:
        """The point the replica holds when nothing is being applied and its images exist."""
        if st["applying"] or st["point_id"] is None:
            return None
        p = self._exists(st["point_id"], st["cycle_id"])
        return p if p is not None and self._has_images(p) else None

    def _scope(self, verified: dict[str, Any] | None,
               point: PointInfo) -> tuple[dict[str, ExtentList], bool]:
        """Per disk of ``point``: the ranges whose comparison proves the images equal it —
        ``diff(verified, point)`` when the verified point still exists, else every range
        either side holds data in; and whether that is a full comparison (no verified point
        left to start from)."""
        base = self._exists(verified["point_id"], verified.get("cycle_id")) if verified else None
        out: dict[str, ExtentList] = {}
        for disk_id, size in point.disk_sizes.items():
            if base is not None and disk_id in base.disk_sizes:
                out[disk_id] = self.repo.diff(base.point_id, point.point_id, disk_id)
                continue
            reader = self.repo.reader(point.point_id, disk_id)
            try:
                with RawImageReader(self.disk_path(disk_id), size) as img:
                    out[disk_id] = reader.data_extents().union(img.data_extents()).clip(size)
            finally:
                reader.close()
        return out, base is None

    def _differ(self, point: PointInfo, disk_id: str, ranges: ExtentList) -> int:
        """Blocks of ``ranges`` in which the image of ``disk_id`` differs from ``point``."""
        size = point.disk_sizes[disk_id]
        path = self.disk_path(disk_id)
        if not path.exists() or path.stat().st_size != size:
            return max(1, len(ranges))
        reader = self.repo.reader(point.point_id, disk_id)
        try:
            with RawImageReader(path, size) as img:
                return ranges_differ(img, reader, ranges)
        finally:
            reader.close()

    def _forget(self, why: str) -> NoReturn:
        """The images are not what the state says: forget the point (the next
        :meth:`catch_up` rebuilds them in full from the latest point)."""
        self._save({"point_id": None, "cycle_id": None, "applying": None, **_no_proof()})
        raise InvalidReplicaState(f"the replica in {self.dir} {why}; it is rebuilt from the "
                                  "store", hint="Nothing to do: the next hydration rebuilds it; "
                                  "a failover meanwhile restores the point from the store.")

    def check(self, point: PointInfo) -> VerifyScope:
        """Prove the images equal ``point`` (the point the replica holds; the caller holds the
        replica's lock), comparing only what the verified point leaves unproven: nothing when
        it is ``point``, ``diff(verified, point)`` when it is older, everything otherwise. On
        success ``point`` becomes the verified point; a difference forgets the replica's
        state and raises ``InvalidReplicaState``."""
        st = self._load()
        if self._settled(st) is None or st["point_id"] != point.point_id:
            raise InvalidReplicaState(f"the replica in {self.dir} does not hold point "
                                      f"{point.point_id}")
        ver = st["verified"]
        if ver is not None and ver["point_id"] == point.point_id:
            return VerifyScope("pre-verified", 0, ver["point_id"])
        scope, full = self._scope(ver, point)
        how = "full" if full else "incremental"
        nbytes = 0
        for disk_id, ranges in scope.items():
            nbytes += int(ranges.lengths.sum())
            bad = self._differ(point, disk_id, ranges)
            if bad:
                self._forget(f"differs from point {point.point_id} in {bad} block(s) of disk "
                             f"{disk_id}")
        self._save({**st, "verified": {"point_id": point.point_id, "cycle_id": point.cycle_id},
                    "proven_full_at": time.time() if how == "full" else st["proven_full_at"]})
        return VerifyScope(how, nbytes, ver["point_id"] if ver else None)

    def verify_step(self, lock: Callable[[], AbstractContextManager[Any]],
                    progress: VerifyProgress | None, *, budget_s: float,
                    full_every_s: float | None = None) -> VerifyProgress | None:
        """Advance the background verification for at most ``budget_s`` seconds, a batch at a
        time, each under ``lock()`` (the replica's lock: a failover or hydration waits one
        batch at most). Returns the progress to pass to the next call (also while a point is
        being applied: it goes on after it), or None when there is nothing to do (the verified
        point is the held one, or the replica holds none).
        If hydration moved the replica on from the point being verified by deltas, the ranges
        that changed are added and the target moves with it; a full rewrite (the verified
        point forgotten) starts over. ``full_every_s``: a replica proven current is compared
        in full again when its last full comparison is older than this (damage done to the
        image behind the hydrator's back, in ranges no cycle rewrote, is found before a
        failover needs it). A difference forgets the replica's state (it is rebuilt) and
        raises ``InvalidReplicaState``."""
        deadline = time.monotonic() + budget_s
        with lock():
            st = self._load()
            held = self._settled(st)
            if held is None:   # a point being applied: go on after it (progress follows it)
                return progress if st["applying"] else None
            ver = st["verified"]
            ver_id = (ver or {}).get("point_id")
            if progress is None or progress.since != ver_id or progress.epoch != st["epoch"]:
                if ver_id == held.point_id:
                    full_at = st["proven_full_at"]
                    if full_every_s is None or (full_at is not None
                                                and time.time() - float(full_at) < full_every_s):
                        return None
                    todo, full = self._scope(None, held)
                else:
                    todo, full = self._scope(ver, held)
                progress = VerifyProgress(held, todo, ver_id, st["epoch"], full=full)
        while True:
            if time.monotonic() >= deadline:
                return progress
            with lock():
                st = self._load()
                held = self._settled(st)
                ver_id = (st["verified"] or {}).get("point_id")
                if held is None:
                    return progress if st["applying"] else None
                if ver_id == held.point_id and ver_id != progress.since:
                    return None   # a failover's check proved it meanwhile
                if ver_id != progress.since or st["epoch"] != progress.epoch:
                    # rewritten in full (or proven otherwise) meanwhile: start over
                    return self.verify_step(lock, None, budget_s=max(0.0, deadline
                                                                     - time.monotonic()),
                                            full_every_s=full_every_s)
                if held.point_id != progress.target.point_id:
                    progress.retarget(self.repo, held)
                batch = progress.next_batch()
                if batch is None:
                    failpoints.hit("replica.verify-proving")
                    self._save({**st, "verified": {"point_id": held.point_id,
                                                   "cycle_id": held.cycle_id},
                                "proven_full_at": time.time() if progress.full
                                else st["proven_full_at"]})
                    return None
                disk_id, ranges = batch
                bad = self._differ(held, disk_id, ranges)
                if bad:
                    self._forget(f"differs from point {held.point_id} in {bad} block(s) of "
                                 f"disk {disk_id}")
                progress.compared += int(ranges.lengths.sum())
                failpoints.hit("replica.verify-batch")   # a kill here loses only progress

    # -- streaming a cycle while it is shipped ------------------------------------------------

    def stream(self, cycle_id: str, base_point_id: str | None,
               disk_sizes: dict[str, int]) -> ReplicaStream | None:
        """Start writing cycle ``cycle_id`` into the images while it is shipped (from the same
        buffers the point writer gets, see :attr:`PointWriter.tee`), or None when the replica
        cannot take it: a delta streams only onto a replica that holds exactly
        ``base_point_id`` (or is re-streaming this same cycle onto it); a full cycle (``base``
        None) always streams, over fresh images. The applying marker is saved before this
        returns; :meth:`ReplicaStream.finish` records the point once it is committed."""
        validate_name("cycle", cycle_id)
        st = self._load()
        ap = st["applying"]
        if base_point_id is not None:
            clean = ap is None and st["point_id"] == base_point_id
            again = ap is not None and ap.get("to") is None and ap.get("to_cycle") == cycle_id \
                and ap.get("from") == base_point_id
            if not (clean or again):
                return None
            try:
                base = self.repo.point(base_point_id)
            except ObjectNotFound:
                return None
            if not self._has_images(base):
                return None  # a delta onto missing images would leave zeros where base had data
        else:
            base = None
        self._save({"point_id": st["point_id"] if ap is None else ap.get("from"),
                    "cycle_id": st["cycle_id"] if ap is None else ap.get("from_cycle"),
                    "applying": {"to": None, "to_cycle": cycle_id,
                                 "from": base.point_id if base else None,
                                 "from_cycle": base.cycle_id if base else None},
                    # a delta writes its changed ranges only; a full cycle rewrites the images
                    **(_kept_proof(st) if base is not None else _no_proof())})
        return ReplicaStream(self, cycle_id, base, disk_sizes)

    def verify(self, point_id: str | None = None) -> bool:
        """True if every image equals ``point_id`` (default: the point the replica holds),
        compared by digest of the full logical image."""
        cur, applying = self.state()
        pid = point_id or cur
        if pid is None or (applying is not None and point_id is None):
            return False
        p = self.repo.point(pid)
        for disk_id, size in p.disk_sizes.items():
            path = self.disk_path(disk_id)
            if not path.exists() or path.stat().st_size != size:
                return False
            if file_digest(path, size) != image_digest(self.repo.reader(pid, disk_id)):
                return False
        return True


class ReplicaStream:
    """One cycle being written into the replica images as it is shipped.

    :meth:`write_runs` is :attr:`PointWriter.tee`: it gets every frame's zero/data runs from the
    writer's worker threads, in any order across frames (a cycle writes each range at most once,
    so order does not matter). Not responsible for deciding whether to stream (the hydrator) or
    for data that reaches the point some other way (a resumed cycle does not stream).
    """

    def __init__(self, hydrator: ReplicaHydrator, cycle_id: str, base: PointInfo | None,
                 disk_sizes: dict[str, int]) -> None:
        self.hydrator = hydrator
        self.cycle_id = cycle_id
        self.base = base
        self.disk_sizes = dict(disk_sizes)
        self._fds: dict[str, int] = {}
        self._direct: dict[str, int] = {}  # O_DIRECT descriptors (absent: not supported here)
        self._no_direct: set[str] = set()  # disks whose direct writes were refused
        self._fresh: dict[str, bool] = {}
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        try:
            for disk_id, size in self.disk_sizes.items():
                path = hydrator.disk_path(disk_id)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                self._fds[disk_id] = fd
                fresh = base is None or disk_id not in base.disk_sizes
                if fresh:
                    os.ftruncate(fd, 0)  # every range not written reads as zeros
                os.ftruncate(fd, size)
                self._fresh[disk_id] = fresh
                with contextlib.suppress(OSError, AttributeError):  # tmpfs: no O_DIRECT
                    self._direct[disk_id] = os.open(path, os.O_WRONLY | os.O_DIRECT
                                                    | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            raise classify_os_error(exc, f"replica images in {hydrator.dir}") from exc
        # the images' writeback overlaps with shipping: finish() then fsyncs what is left
        self._flusher = threading.Thread(target=self._writeback, daemon=True,
                                         name=f"drsite-replica-{cycle_id}")
        self._flusher.start()

    def _writeback(self) -> None:
        while not self._stop.wait(WRITEBACK_EVERY_S):
            for fd in list(self._fds.values()):
                with contextlib.suppress(OSError):
                    start_writeback(fd)

    def write_runs(self, disk_id: str, runs: Entries, raw: bytes | memoryview) -> None:
        """Set the ranges of ``runs`` (zero runs: codec ZERO; data runs: ``roff`` into ``raw``)."""
        fd = self._fds[disk_id]
        mv = memoryview(raw)
        zero = runs["codec"] == ZERO
        try:
            if zero.any() and not self._fresh[disk_id]:
                for off, n in zip(runs["offset"][zero].tolist(), runs["length"][zero].tolist(),
                                  strict=True):
                    zero_range(fd, off, n)
            data = runs[~zero]
            dfd = -1 if disk_id in self._no_direct else self._direct.get(disk_id, -1)
            addr = np.frombuffer(mv, np.uint8).ctypes.data if dfd >= 0 and len(mv) else 0
            for off, n, ro in zip(data["offset"].tolist(), data["length"].tolist(),
                                  data["roff"].tolist(), strict=True):
                if n >= DIRECT_MIN and dfd >= 0 and not (off | n | (addr + ro)) % DIRECT_ALIGN:
                    # large aligned runs (an initial copy's) skip the page cache: no copy
                    # into it and nothing left for the final fsync to write
                    try:
                        if os.pwrite(dfd, mv[ro:ro + n], off) == n:
                            continue
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        # refused here: buffered from now on (the descriptor stays open until
                        # close(): other worker threads may be using it)
                        self._no_direct.add(disk_id)
                        dfd = -1
                done = os.pwrite(fd, mv[ro:ro + n], off)
                while done < n:
                    done += os.pwrite(fd, mv[ro + done:ro + n], off + done)
        except OSError as exc:
            raise classify_os_error(exc, f"replica image {self.hydrator.disk_path(disk_id)}") \
                from exc

    def finish(self, point: PointInfo) -> None:
        """The cycle committed as ``point``: fsync the images, then record the point."""
        if point.cycle_id != self.cycle_id:
            raise CorruptData(f"point {point.point_id} is not cycle {self.cycle_id}")
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            for fd in self._fds.values():
                os.fsync(fd)
                _drop_cache(fd)
        except OSError as exc:
            raise classify_os_error(exc, f"replica images in {self.hydrator.dir}") from exc
        finally:
            self.close()
        st = self.hydrator._load()
        ap = st["applying"]
        if ap is None or ap.get("to") is not None or ap.get("to_cycle") != self.cycle_id:
            # settled by someone else meanwhile (a catch-up from the store while this stream's
            # settling was deferred, LocalTarget.after_commit): theirs is the state
            return
        for stale in self.hydrator.dir.glob("*.img"):
            if stale.stem not in point.disk_sizes:
                with contextlib.suppress(OSError):
                    stale.unlink()
        self.hydrator._save({"point_id": point.point_id, "cycle_id": point.cycle_id,
                             "applying": None, **_kept_proof(st)})

    def close(self) -> None:
        """Close the images; the applying marker stays (``catch_up`` settles it)."""
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join()
        fds, self._fds = self._fds, {}
        direct, self._direct = self._direct, {}
        for fd in [*fds.values(), *direct.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
