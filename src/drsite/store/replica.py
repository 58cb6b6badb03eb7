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
  point in full.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from drsite.core.errors import BrokenChain, CorruptData, ObjectNotFound, classify_os_error
from drsite.core.extents import ExtentList
from drsite.core.model import validate_name
from drsite.store.digest import file_digest, image_digest
from drsite.store.format import PointInfo
from drsite.store.reader import PointReader, iter_pieces
from drsite.store.repository import Repository

PIECE = 4 << 20
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc: Any = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` (reads back as zeros). False if unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                    ctypes.c_longlong]
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make a file range read as zeros: punch a hole, or write zeros where that is unsupported."""
    if length <= 0 or punch_hole(fd, offset, length):
        return
    zeros = bytes(min(PIECE, length))
    for off, n in iter_pieces([(offset, length)], PIECE):
        os.pwrite(fd, zeros[:n], off)


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
            return {"point_id": None, "cycle_id": None, "applying": None}
        except OSError as exc:
            raise classify_os_error(exc, f"replica state {self._state_path}") from exc
        try:
            st = json.loads(data)
            return {"point_id": st.get("point_id"), "cycle_id": st.get("cycle_id"),
                    "applying": st.get("applying")}
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
        """(point the replica holds or None, point being applied or None)."""
        st = self._load()
        ap = st["applying"]
        return st["point_id"], (ap["to"] if ap else None)

    def pinned(self) -> set[str]:
        """Points retention must keep for this replica to catch up cheaply."""
        cur, applying = self.state()
        return {p for p in (cur, applying) if p}

    def disk_path(self, disk_id: str) -> Path:
        return self.dir / f"{validate_name('disk', disk_id)}.img"

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

    def _write_piece(self, fd: int, reader: PointReader, off: int, n: int, buf: memoryview) -> None:
        """Set ``[off, off+n)`` of the image to the point's bytes (all-zero pieces → holes)."""
        view = buf[:n]
        reader.readinto(off, view)
        if not np.frombuffer(view, np.uint8).any():
            zero_range(fd, off, n)
            return
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:], off + done)

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
                for off, n in iter_pieces(ranges, PIECE):
                    self._write_piece(fd, reader, off, n, buf)
                os.fsync(fd)
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
        """Apply one point: marker first, then the ranges, then the new state."""
        self._save({"point_id": cur.point_id if cur else None,
                    "cycle_id": cur.cycle_id if cur else None,
                    "applying": {"to": to.point_id, "to_cycle": to.cycle_id,
                                 "from": cur.point_id if cur else None,
                                 "from_cycle": cur.cycle_id if cur else None}})
        self._apply(to, self._plan(cur, to))
        self._save({"point_id": to.point_id, "cycle_id": to.cycle_id, "applying": None})

    def catch_up(self) -> list[str]:
        """Bring the replica to the latest committed point; returns the point ids applied, in
        order. Re-applies an interrupted point first. Idempotent; safe after any crash."""
        applied: list[str] = []
        st = self._load()
        cur = self._exists(st["point_id"], st["cycle_id"])
        ap = st["applying"]
        if ap:
            frm = self._exists(ap.get("from"), ap.get("from_cycle"))
            to = self._exists(ap.get("to"), ap.get("to_cycle"))
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
