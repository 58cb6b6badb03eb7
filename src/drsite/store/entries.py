"""Entry arrays (:data:`~drsite.store.format.ENTRY_DT`): pure numpy algorithms, no I/O.

- :func:`classify` cuts written bytes into zero and data runs on the 4 KiB grid;
- :func:`split_segments` cuts entries at segment boundaries;
- :func:`resolve` overlays entries (later rows win; zero runs win and then vanish), which is how a
  segment map is built from its base map and a cycle's writes;
- :func:`diff_entries` compares two resolved maps without reading data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from drsite.core.extents import ExtentList, coalesce
from drsite.store.format import BLOCK, ENTRY_DT, ZERO, ZSTD, Entries, empty_entries


def classify(view: memoryview, disk_off: int) -> tuple[Entries, bytes | memoryview]:
    """Split one piece (≤ FRAME_MAX) into zero and data runs on the disk's 4 KiB grid.

    Returns the run entries in disk order (zero runs with codec ZERO; data runs with ``roff``
    into the returned raw bytes, the concatenation of the data runs) and those raw bytes.
    """
    return classify_many(view, np.array([disk_off], np.int64), np.array([len(view)], np.int64))


def classify_many(view: memoryview, offsets: npt.NDArray[np.int64],
                  lengths: npt.NDArray[np.int64]) -> tuple[Entries, bytes | memoryview]:
    """:func:`classify` for several pieces at once: ``view`` holds the pieces concatenated, piece
    ``i`` being ``lengths[i]`` bytes of the disk at ``offsets[i]`` (pieces must not overlap).

    One frame's worth of scattered writes is classified with a few numpy operations (no Python
    work per piece or per block). Runs never cross a piece boundary unless the pieces touch on
    the disk; data runs index the returned raw bytes in order (``view`` itself when every run
    holds data).
    """
    n = len(view)
    po = np.asarray(offsets, np.int64)
    pl = np.asarray(lengths, np.int64)
    keep = pl > 0
    if not keep.all():
        po, pl = po[keep], pl[keep]
    if int(pl.sum()) != n:
        raise ValueError(f"pieces hold {int(pl.sum())} bytes, the buffer {n}")
    if n == 0:
        return empty_entries(), b""
    arr = np.frombuffer(view, np.uint8)
    pbuf = np.cumsum(pl) - pl                       # where each piece starts in ``view``
    # cut every piece at the 4 KiB disk grid: sub-pieces [ss, se) at buffer position sb
    first = po // BLOCK
    cnt = (po + pl - 1) // BLOCK - first + 1
    if int(cnt.max()) == 1:
        ss, se, sb = po, po + pl, pbuf
    else:
        idx = np.repeat(np.arange(po.size), cnt)
        k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        g = (first[idx] + k) * BLOCK
        ss = np.maximum(po[idx], g)
        se = np.minimum(po[idx] + pl[idx], g + BLOCK)
        sb = pbuf[idx] + (ss - po[idx])
    sl = se - ss
    # non-zero flag per sub-piece
    if bool((sl == BLOCK).all()):
        # whole aligned blocks, laid end to end in the buffer
        # a block whose first word is not zero holds data (most blocks of written data): only
        # the others are scanned whole (``any`` over every word cost a pass over all the data)
        words = np.frombuffer(view, np.uint64).reshape(-1, BLOCK // 8)
        m = words[:, 0] != 0
        maybe = np.flatnonzero(~m)
        if maybe.size:
            m[maybe] = words[maybe].any(axis=1)
    elif not (bool((sb % 8).any()) or bool((sl % 8).any())):
        m = np.maximum.reduceat(np.frombuffer(view, np.uint64), sb // 8) != 0
    else:
        m = np.maximum.reduceat(arr, sb) != 0
    # runs: consecutive sub-pieces of the same kind that touch on the disk
    brk = np.ones(ss.size, bool)
    brk[1:] = (m[1:] != m[:-1]) | (ss[1:] != se[:-1])
    rfirst = np.flatnonzero(brk)
    rlast = np.concatenate([rfirst[1:], [ss.size]]) - 1
    rs, re_, rnz = ss[rfirst], se[rlast], m[rfirst]
    out = np.zeros(rs.size, ENTRY_DT)
    out["offset"] = rs
    out["length"] = re_ - rs
    if not rnz.any():
        return out, b""
    if rnz.all():
        raw: bytes | memoryview = view  # no copy: the caller keeps ``view`` alive
    else:
        raw = arr[np.repeat(m, sl)].tobytes()
    dl = np.where(rnz, re_ - rs, 0)
    out["roff"] = np.cumsum(dl) - dl
    out["rlen"] = len(raw)
    out["codec"] = np.where(rnz, ZSTD, ZERO)  # data codec is fixed once the frame is compressed
    return out, raw


def split_segments(e: Entries, seg: int) -> tuple[npt.NDArray[np.int64], Entries]:
    """Cut entries at segment boundaries; returns (segment index per piece, pieces), pieces in
    the original order within each segment (order = priority: later writes win)."""
    if e.size == 0:
        return np.zeros(0, np.int64), e
    s0 = e["offset"] // seg
    s1 = (e["offset"] + e["length"] - 1) // seg
    cnt = s1 - s0 + 1
    if int(cnt.max()) == 1:
        return s0.astype(np.int64), e
    idx = np.repeat(np.arange(e.size), cnt)
    k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    segs = (s0[idx] + k).astype(np.int64)
    out = e[idx].copy()
    lo = np.maximum(out["offset"], segs * seg)
    hi = np.minimum(out["offset"] + out["length"], (segs + 1) * seg)
    out["roff"] = out["roff"] + (lo - out["offset"]).astype(np.uint32)
    out["offset"] = lo
    out["length"] = hi - lo
    return segs, out


def resolve(e: Entries, lo: int, hi: int) -> Entries:
    """Overlay entries (later rows win) clipped to ``[lo, hi)``; returns sorted, non-overlapping
    data entries (zero runs win over earlier data and then vanish: unlisted bytes read as zero)."""
    off = e["offset"]
    end = off + e["length"]
    cs = np.maximum(off, lo)
    ce = np.minimum(end, hi)
    keep = ce > cs
    if not keep.any():
        return empty_entries()
    if keep.all():
        e = e.copy()  # changed below: never the caller's rows
    else:
        e, cs, ce = e[keep], cs[keep], ce[keep]  # boolean indexing copies
    e["roff"] = e["roff"] + (cs - e["offset"]).astype(np.uint32)
    e["offset"] = cs
    e["length"] = ce - cs
    # the bounds are a few sorted runs (a base map, then a cycle's writes): a stable sort
    # merges them (timsort), where np.unique's sort started from scratch (the commit of a
    # 4 KiB-random cycle spent most of its resolve time there)
    bounds = np.concatenate([cs, ce])
    bounds.sort(kind="stable")
    bounds = bounds[np.concatenate([[True], bounds[1:] != bounds[:-1]])]
    i0 = np.searchsorted(bounds, cs)
    i1 = np.searchsorted(bounds, ce)
    cnt = i1 - i0
    elem = np.repeat(i0, cnt) + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    owner = np.full(bounds.size - 1, -1, np.int64)
    np.maximum.at(owner, elem, np.repeat(np.arange(e.size), cnt))
    xs, xe = bounds[:-1], bounds[1:]
    valid = owner >= 0
    xs, xe, owner = xs[valid], xe[valid], owner[valid]
    if owner.size == 0:
        return empty_entries()
    run = np.ones(owner.size, bool)
    run[1:] = (owner[1:] != owner[:-1]) | (xs[1:] != xe[:-1])
    first = np.flatnonzero(run)
    last = np.concatenate([first[1:], [owner.size]]) - 1
    own = owner[first]
    out = e[own]  # fancy indexing copies
    out["roff"] = out["roff"] + (xs[first] - out["offset"]).astype(np.uint32)
    out["offset"] = xs[first]
    out["length"] = xe[last] - xs[first]
    zero = out["codec"] == ZERO
    res: Entries = out[~zero] if zero.any() else out
    return res


def _sorted_disjoint(off: npt.NDArray[np.int64], end: npt.NDArray[np.int64]) -> bool:
    return off.size < 2 or bool((off[1:] >= end[:-1]).all())


def overlay(base: Entries, new: Entries, lo: int, hi: int, pack_shift: int = 0) -> Entries:
    """``resolve(concatenate([base, new']), lo, hi)`` where ``new'`` is ``new`` with
    ``pack_shift`` added to its ``pack`` column: a segment's new map from its base map and a
    cycle's pieces of it. Neither input is changed.

    When ``base`` is a resolved map inside ``[lo, hi)`` (sorted, disjoint, data only) and
    ``new`` is sorted and disjoint inside ``[lo, hi)`` (a cycle's writes in disk order, as the
    engine ships them), the base rows no new row touches are kept as they are and only the
    touched ones are cut: no sort of every bound, no elementary intervals. Otherwise this is
    :func:`resolve`. Both give the same rows (tests/unit/test_entries.py checks it).
    """
    bo = base["offset"]
    be = bo + base["length"]
    no = new["offset"]
    ne = no + new["length"]
    fast = (
        _sorted_disjoint(bo, be) and _sorted_disjoint(no, ne)
        and (base.size == 0 or (int(bo[0]) >= lo and int(be[-1]) <= hi
                                and bool((base["length"] > 0).all())
                                and not bool((base["codec"] == ZERO).any())))
        and (new.size == 0 or (int(no[0]) >= lo and int(ne[-1]) <= hi
                               and bool((new["length"] > 0).all())))
    )
    if not fast:
        shifted = new.copy()
        shifted["pack"] += np.uint32(pack_shift)
        return resolve(np.concatenate([base, shifted]), lo, hi)
    data = new["codec"] != ZERO
    # base row b meets the new rows j0[b] .. j1[b]-1 (sorted, disjoint: a contiguous range)
    j0 = np.searchsorted(ne, bo, "right")
    j1 = np.searchsorted(no, be, "left")
    k = np.maximum(j1 - j0, 0)
    # what is left of b: the k+1 gaps between b's start, its new rows and its end (some empty)
    cnt = k + 1
    row = np.repeat(np.arange(base.size), cnt)
    pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    j = j0[row] + pos
    kr = k[row]
    gs = bo[row]
    ge = be[row]
    cut = pos > 0
    gs[cut] = np.maximum(gs[cut], ne[j[cut] - 1])
    inner = pos < kr
    ge[inner] = np.minimum(ge[inner], no[j[inner]])
    left = ge > gs
    row, gs, ge = row[left], gs[left], ge[left]
    nd = int(np.count_nonzero(data))
    out = np.empty(row.size + nd, ENTRY_DT)
    # merge the two sorted, disjoint sequences by offset
    nsel = new[data] if nd != new.size else new
    at_new = np.searchsorted(gs, nsel["offset"]) + np.arange(nd)
    is_new = np.zeros(out.size, bool)
    is_new[at_new] = True
    piece = base[row]
    piece["roff"] = piece["roff"] + (gs - piece["offset"]).astype(np.uint32)
    piece["offset"] = gs
    piece["length"] = ge - gs
    out[~is_new] = piece
    out[at_new] = nsel
    if nd and pack_shift:
        out["pack"][at_new] += np.uint32(pack_shift)
    return out


def diff_entries(a: Entries, pa: list[str], b: Entries, pb: list[str], lo: int,
                  hi: int) -> ExtentList:
    """Ranges of ``[lo, hi)`` where two resolved maps name different bytes (or data vs hole)."""
    ids: dict[str, int] = {}
    ga = np.array([ids.setdefault(k, len(ids)) for k in pa], np.int64)[a["pack"]] if a.size else \
        np.zeros(0, np.int64)
    gb = np.array([ids.setdefault(k, len(ids)) for k in pb], np.int64)[b["pack"]] if b.size else \
        np.zeros(0, np.int64)
    bounds = np.unique(np.concatenate([[lo, hi], a["offset"], a["offset"] + a["length"],
                                       b["offset"], b["offset"] + b["length"]]))
    bounds = bounds[(bounds >= lo) & (bounds <= hi)]
    xs, ln = bounds[:-1], np.diff(bounds)

    def ident(e: Entries, g: npt.NDArray[np.int64]) -> tuple[npt.NDArray[Any], ...]:
        if e.size == 0:
            z = np.zeros(xs.size, np.int64)
            return np.zeros(xs.size, bool), z, z, z
        i = np.searchsorted(e["offset"], xs, "right") - 1
        ic = np.clip(i, 0, None)
        ok = (i >= 0) & (xs < e["offset"][ic] + e["length"][ic])
        return ok, g[ic], e["foff"][ic], e["roff"][ic].astype(np.int64) - e["offset"][ic]

    oa, ka, fa, ra = ident(a, ga)
    ob, kb, fb, rb = ident(b, gb)
    differ = (oa != ob) | (oa & ob & ((ka != kb) | (fa != fb) | (ra != rb)))
    return coalesce(xs[differ], ln[differ])

