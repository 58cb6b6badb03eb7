"""Reading a committed point: :class:`PointReader` (verified random access to one disk).

What a segment map does not list reads as zeros; every frame is checked against the blake3-128
its entry carries before a byte of it is returned, so damage raises ``CorruptData`` (or
``BrokenChain`` for a missing object) and never yields a silently wrong disk.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from drsite.core.errors import BrokenChain, CorruptData, InvalidInput
from drsite.core.extents import ExtentList, coalesce
from drsite.store.catalog import Catalog
from drsite.store.entries import diff_entries
from drsite.store.format import Entries, SegMap, empty_entries


class PointReader:
    """Random-access verified reads of one disk of one point; holes read as zeros.

    Holds a small cache of decompressed frames; frames needed by one ``readinto`` are fetched in
    parallel. Not responsible for retries (wrap the store) or repairs.
    """

    def __init__(self, repo: Catalog, point_id: str, disk_id: str, disk: dict[str, Any]) -> None:
        self.repo = repo
        self.point_id = point_id
        self.disk_id = disk_id
        self._disk = disk
        self.size = int(disk["size"])
        self.segment_size = int(disk["segment_size"])
        self._keys = repo._map_keys(disk, tolerant=True)
        self._frames: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._cache_cap = 16

    def _frame(self, spec: tuple[str, int, int, int, int, bytes]) -> bytes:
        pk, foff, flen, codec, rlen, h = spec
        try:
            return self.repo.read_frame(pk, foff, flen, codec, rlen, h)
        except CorruptData as exc:
            raise CorruptData(f"{exc} (point {self.point_id}, disk {self.disk_id})") from exc

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``[offset, offset + len(buf))``; verified; ``CorruptData`` on damage."""
        out = np.frombuffer(buf.cast("B") if buf.format != "B" else buf, np.uint8)
        n = out.size
        if offset < 0 or offset + n > self.size:
            raise InvalidInput(f"read {offset}+{n} passes the end of disk {self.disk_id} "
                               f"({self.size} bytes)")
        out[:] = 0
        if n == 0:
            return
        end = offset + n
        seg = self.segment_size
        picks: list[tuple[SegMap, Entries]] = []
        for s in range(offset // seg, (end - 1) // seg + 1):
            mk = self._keys[s]
            if mk is None:
                continue
            m = self.repo._get_map(mk)
            e = m.entries
            a = int(np.searchsorted(e["offset"] + e["length"], offset, "right"))
            b = int(np.searchsorted(e["offset"], end, "left"))
            if b > a:
                picks.append((m, e[a:b]))
        want: dict[tuple[str, int], tuple[str, int, int, int, int, bytes]] = {}
        for m, e in picks:
            for pk, foff, flen, codec, rlen, h in zip(
                    e["pack"].tolist(), e["foff"].tolist(), e["flen"].tolist(),
                    e["codec"].tolist(), e["rlen"].tolist(), e["hash"].tolist(), strict=True):
                k = (m.packs[pk], foff)
                if k not in self._frames and k not in want:
                    want[k] = (m.packs[pk], foff, flen, codec, rlen, bytes(h))
        if len(want) > 1:
            got = dict(zip(want, self.repo._pool().map(self._frame, want.values()), strict=True))
        else:
            got = {k: self._frame(v) for k, v in want.items()}
        frames: dict[tuple[str, int], bytes] = {}
        for m, e in picks:
            for pk, foff, eo, el, ro in zip(e["pack"].tolist(), e["foff"].tolist(),
                                            e["offset"].tolist(), e["length"].tolist(),
                                            e["roff"].tolist(), strict=True):
                k = (m.packs[pk], foff)
                raw = frames.get(k)
                if raw is None:
                    raw = got.get(k) or self._frames[k]
                    frames[k] = raw
                s, t = max(eo, offset), min(eo + el, end)
                src = ro + (s - eo)
                out[s - offset:t - offset] = np.frombuffer(raw, np.uint8, t - s, src)
        for k, raw in got.items():
            self._frames[k] = raw
        for k in frames:
            self._frames.move_to_end(k)
        while len(self._frames) > self._cache_cap:
            self._frames.popitem(last=False)

    def data_extents(self) -> ExtentList:
        """Ranges that hold stored data (everything else reads as zeros)."""
        st: list[npt.NDArray[np.int64]] = []
        ln: list[npt.NDArray[np.int64]] = []
        seg = self.segment_size
        for i, mk in enumerate(self._keys):
            if mk is not None:
                try:
                    e = self.repo._get_map(mk).entries
                except (CorruptData, BrokenChain):
                    # unreadable map: report its whole segment (over-approximation is allowed);
                    # reading it then fails, which a resync counts as "differs"
                    st.append(np.array([i * seg], np.int64))
                    ln.append(np.array([max(0, min(seg, self.size - i * seg))], np.int64))
                    continue
                st.append(e["offset"])
                ln.append(e["length"])
        if not st:
            return ExtentList.empty()
        return coalesce(np.concatenate(st), np.concatenate(ln))

    def changed_extents(self) -> ExtentList:
        """What this point's cycle wrote (data and zeros), relative to its base."""
        return self.repo._changed(self._disk)

    def close(self) -> None:
        self._frames.clear()


def diff_points(repo: Catalog, a: str | None, b: str, disk_id: str) -> ExtentList:
    """Ranges of disk ``disk_id`` that may differ between points ``a`` and ``b`` (reading
    ``b`` over them turns an image of ``a`` into ``b``; an image must also be resized to
    ``b``'s size). ``a=None`` (or ``a`` without the disk) gives every data extent of ``b``.
    Compares segment maps only: shared segments cost nothing, no data is read."""
    bd = repo._disk(repo._load_manifest(b), disk_id)
    if a is None or disk_id not in repo._load_manifest(a)["disks"]:
        return PointReader(repo, b, disk_id, bd).data_extents()
    ad = repo._disk(repo._load_manifest(a), disk_id)
    size = int(bd["size"])
    if int(ad["segment_size"]) != int(bd["segment_size"]):
        # different grids (repository re-created with another segment size): be safe
        return ExtentList.of([(0, size)]) if size else ExtentList.empty()
    seg = int(bd["segment_size"])
    ka, kb = repo._map_keys(ad), repo._map_keys(bd)
    parts: list[ExtentList] = []
    for i, k in enumerate(kb):
        old = ka[i] if i < len(ka) else None
        if k == old:
            continue
        lo, hi = i * seg, min((i + 1) * seg, size)
        ma = repo._get_map(old) if old else SegMap(empty_entries(), [])
        mb = repo._get_map(k) if k else SegMap(empty_entries(), [])
        parts.append(diff_entries(ma.entries, ma.packs, mb.entries, mb.packs, lo, hi))
    if not parts:
        return ExtentList.empty()
    return coalesce(np.concatenate([p.starts for p in parts]),
                    np.concatenate([p.lengths for p in parts])).clip(size)


def iter_pieces(ext: Iterable[tuple[int, int]], piece: int) -> Iterable[tuple[int, int]]:
    """Cut ``(offset, length)`` ranges into pieces of at most ``piece`` bytes."""
    for off, n in ext:
        pos = 0
        while pos < n:
            step = min(piece, n - pos)
            yield off + pos, step
            pos += step
