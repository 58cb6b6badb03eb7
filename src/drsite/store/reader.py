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
from drsite.store.catalog import MAP_PREFETCH, Catalog
from drsite.store.entries import diff_entries
from drsite.store.format import Entries, SegMap, empty_entries

FRAMES_AT_ONCE = 16  # frames a batched read holds at once (up to 16 MiB decompressed)


def _touched_segments(s0: npt.NDArray[np.int64], s1: npt.NDArray[np.int64]
                      ) -> npt.NDArray[np.int64]:
    """Every segment index in ``[s0[i], s1[i]]`` for some ``i``, sorted, unique."""
    cnt = s1 - s0 + 1
    if int(cnt.max()) == 1:
        return np.unique(s0)
    return np.unique(np.repeat(s0, cnt) + (np.arange(int(cnt.sum()))
                                           - np.repeat(np.cumsum(cnt) - cnt, cnt)))


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
        n = len(buf.cast("B") if buf.format != "B" else buf)
        if offset < 0 or offset + n > self.size:
            raise InvalidInput(f"read {offset}+{n} passes the end of disk {self.disk_id} "
                               f"({self.size} bytes)")
        self.readv(np.array([offset], np.int64), np.array([n], np.int64), buf)

    def readv(self, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              buf: memoryview) -> None:
        """Fill ``buf`` with many extents (their bytes concatenated, in order); verified like
        :meth:`readinto`. The map lookups of a whole batch are numpy operations over the
        batch (:meth:`_lookup`); frames are fetched in parallel, ``FRAMES_AT_ONCE`` at a time
        (memory stays bounded however scattered the batch), each decompressed and checked once."""
        out = np.frombuffer(buf.cast("B") if buf.format != "B" else buf, np.uint8)
        offs = np.asarray(offsets, np.int64)
        lens = np.asarray(lengths, np.int64)
        if offs.size == 0:
            return
        ends = offs + lens
        if int(offs.min()) < 0 or int(ends.max()) > self.size or bool((lens < 0).any()):
            raise InvalidInput(f"a read passes the end of disk {self.disk_id} "
                               f"({self.size} bytes)")
        if int(lens.sum()) != out.size:
            raise InvalidInput("readv: the extents do not fill the buffer")
        out[:] = 0
        found = self._lookup(offs, lens, ends)
        if found is None:
            return
        specs, d_all, l_all, f_all, s_all = found
        order = np.argsort(f_all, kind="stable")
        d_all, l_all, f_all, s_all = d_all[order], l_all[order], f_all[order], s_all[order]
        cuts = np.searchsorted(f_all, np.arange(0, len(specs) + 1))
        pool = self.repo._pool()
        for g in range(0, len(specs), FRAMES_AT_ONCE):
            group = specs[g:g + FRAMES_AT_ONCE]
            frames: list[bytes | None] = [self._frames.get((sp[0], sp[1])) for sp in group]
            missing = [q for q, f in enumerate(frames) if f is None]
            if len(missing) > 1:
                for q, fetched in zip(missing, pool.map(self._frame, [group[q] for q in missing]),
                                  strict=True):
                    frames[q] = fetched
            elif missing:
                frames[missing[0]] = self._frame(group[missing[0]])
            for q, maybe in enumerate(frames):
                assert maybe is not None
                raw = maybe
                fa = np.frombuffer(raw, np.uint8)
                c0, c1 = int(cuts[g + q]), int(cuts[g + q + 1])
                for d, size, so in zip(d_all[c0:c1].tolist(), l_all[c0:c1].tolist(),
                                       s_all[c0:c1].tolist(), strict=True):
                    out[d:d + size] = fa[so:so + size]
                # batches read in disk order share their boundary frames: keep the last ones
                self._frames[(group[q][0], group[q][1])] = raw
                self._frames.move_to_end((group[q][0], group[q][1]))
            while len(self._frames) > self._cache_cap:
                self._frames.popitem(last=False)

    def _lookup(self, offs: npt.NDArray[np.int64], lens: npt.NDArray[np.int64],
                ends: npt.NDArray[np.int64]
                ) -> tuple[list[tuple[str, int, int, int, int, bytes]], npt.NDArray[np.int64],
                           npt.NDArray[np.int64], npt.NDArray[np.int64],
                           npt.NDArray[np.int64]] | None:
        """Where the bytes of a batch of extents are: (frame specs, and per piece: destination
        in the batch's buffer, length, frame index, offset in the frame), or None when the
        batch holds no stored data. Per touched segment only the slice of its map that the
        batch's range there can overlap is taken (two binary searches); the pieces are then
        found for the whole batch at once over the concatenated slices (sorted and disjoint:
        segments are), so the numpy work does not grow with the number of segments a
        scattered batch touches."""
        seg = self.segment_size
        live = np.flatnonzero(lens > 0)
        if live.size == 0:
            return None
        lo_o, hi_o = offs[live], ends[live]
        s0, s1 = lo_o // seg, (hi_o - 1) // seg
        touched = _touched_segments(s0, s1)
        # the batch's lowest offset and highest end inside each touched segment
        k0, k1 = np.searchsorted(touched, s0), np.searchsorted(touched, s1)
        seg_lo = touched * seg
        seg_hi = np.minimum(seg_lo + seg, self.size)
        lo_b, hi_b = seg_hi.copy(), seg_lo.copy()
        np.minimum.at(lo_b, k0, lo_o)
        np.maximum.at(hi_b, k1, hi_o)
        span = np.flatnonzero(k1 > k0)   # extents crossing a segment boundary (few)
        for x in span.tolist():
            lo_b[k0[x] + 1:k1[x] + 1] = seg_lo[k0[x] + 1:k1[x] + 1]
            hi_b[k0[x]:k1[x]] = seg_hi[k0[x]:k1[x]]
        parts: list[Entries] = []
        gpack: list[npt.NDArray[np.int64]] = []
        packs: list[str] = []
        for t, s in enumerate(touched.tolist()):
            mk = self._keys[s]
            if mk is None:
                continue
            m = self.repo._get_map(mk)
            e = m.entries
            if e.size == 0:
                continue
            eo = e["offset"]
            a = max(int(np.searchsorted(eo, lo_b[t], "right")) - 1, 0)
            b = int(np.searchsorted(eo, hi_b[t], "left"))
            if b <= a:
                continue
            parts.append(e[a:b])
            gpack.append(e["pack"][a:b].astype(np.int64) + len(packs))
            packs.extend(m.packs)
        if not parts:
            return None
        e = np.concatenate(parts)
        gp = np.concatenate(gpack)
        eo = e["offset"]
        ee = eo + e["length"]
        lo_i = np.searchsorted(ee, lo_o, "right")
        hi_i = np.searchsorted(eo, hi_o, "left")
        cnt = np.maximum(hi_i - lo_i, 0)
        total = int(cnt.sum())
        if total == 0:
            return None
        j = np.repeat(live, cnt)
        i = np.repeat(lo_i, cnt) + (np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        lo = np.maximum(eo[i], offs[j])
        hi = np.minimum(ee[i], ends[j])
        # one frame per distinct (pack, frame offset); a pack named by several maps is one
        keys = gp[i] * (1 << 40) + e["foff"][i]
        uk, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        ids = np.empty(uk.size, np.int64)
        specs: list[tuple[str, int, int, int, int, bytes]] = []
        index: dict[tuple[str, int], int] = {}
        for n, f in enumerate(first.tolist()):
            r = int(i[f])
            fk = (packs[int(gp[r])], int(e["foff"][r]))
            got = index.get(fk)
            if got is None:
                got = index[fk] = len(specs)
                specs.append((fk[0], fk[1], int(e["flen"][r]), int(e["codec"][r]),
                              int(e["rlen"][r]), bytes(e["hash"][r])))
            ids[n] = got
        pos = np.cumsum(lens) - lens
        return (specs, pos[j] + (lo - offs[j]), hi - lo, ids[inv.reshape(-1)],
                e["roff"][i].astype(np.int64) + (lo - eo[i]))

    def data_extents(self) -> ExtentList:
        """Ranges that hold stored data (everything else reads as zeros)."""
        st: list[npt.NDArray[np.int64]] = []
        ln: list[npt.NDArray[np.int64]] = []
        seg = self.segment_size
        for i, mk in enumerate(self._keys):
            if i % MAP_PREFETCH == 0:
                self.repo._prefetch_maps(self._keys[i:i + MAP_PREFETCH])
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
