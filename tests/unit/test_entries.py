"""``store.entries.resolve`` (a segment map from overlaid index rows) against a byte-by-byte
model: every byte of ``[lo, hi)`` names the last row covering it (zero rows: nothing); and
``overlay`` (a base map + a cycle's pieces, the commit's path) against ``resolve``, byte for byte,
on its fast path and off it; ``classify_many`` (zero/data runs of written pieces) against a
block-by-block model."""

from __future__ import annotations

import numpy as np
import pytest

from drsite.store import entries
from drsite.store.entries import classify_many, overlay, resolve
from drsite.store.format import BLOCK, ENTRY_DT, ZERO


def _model(e: np.ndarray, lo: int, hi: int) -> dict[int, tuple[int, int, int, int]]:
    """byte -> (pack, foff, codec, raw offset) of the row that wins it (later rows win)."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for r in e:
        for x in range(max(int(r["offset"]), lo), min(int(r["offset"] + r["length"]), hi)):
            out[x] = (int(r["pack"]), int(r["foff"]), int(r["codec"]),
                      int(r["roff"]) + x - int(r["offset"]))
    return {x: v for x, v in out.items() if v[2] != ZERO}


def _expand(res: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    out: dict[int, tuple[int, int, int, int]] = {}
    for r in res:
        for k in range(int(r["length"])):
            x = int(r["offset"]) + k
            assert x not in out, "resolved rows overlap"
            out[x] = (int(r["pack"]), int(r["foff"]), int(r["codec"]), int(r["roff"]) + k)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_resolve_matches_a_byte_model(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    e = np.zeros(n, ENTRY_DT)
    e["offset"] = rng.integers(0, 300, n)
    e["length"] = rng.integers(1, 60, n)
    e["codec"] = rng.choice([1, 2, ZERO], n)
    e["roff"] = rng.integers(0, 1000, n)
    e["pack"] = rng.integers(0, 5, n)
    e["foff"] = rng.integers(0, 99, n)
    if seed % 4 == 0:  # two sorted, disjoint layers: a base map, then a cycle's writes
        e = np.concatenate([resolve(e, 0, 400), resolve(e[::-1].copy(), 0, 400)])
    before = e.copy()
    lo = int(rng.integers(0, 100))
    hi = lo + int(rng.integers(0, 300))
    res = resolve(e, lo, hi)
    assert e.tobytes() == before.tobytes()  # the caller's rows are not changed
    assert np.all(np.diff(res["offset"]) > 0) and np.all(res["codec"] != ZERO)
    assert np.all(res["length"] > 0)
    assert _expand(res) == _model(e, lo, hi)


def _rows(rng: np.random.Generator, n: int, span: int, maxlen: int) -> np.ndarray:
    e = np.zeros(n, ENTRY_DT)
    e["offset"] = rng.integers(0, span, n)
    e["length"] = rng.integers(1, maxlen, n)
    e["codec"] = rng.choice([1, 2, ZERO], n)
    e["roff"] = rng.integers(0, 1000, n)
    e["pack"] = rng.integers(0, 5, n)
    e["foff"] = rng.integers(0, 99, n)
    if n:
        e["hash"] = np.frombuffer(rng.bytes(16 * n), "V16")
    return e


def _disjoint_sorted(rng: np.random.Generator, n: int, span: int) -> np.ndarray:
    """Sorted, disjoint rows (touching neighbours allowed) with zero rows among them: a cycle's
    writes of one segment in disk order."""
    starts = np.unique(rng.integers(0, span, n))
    ends = np.append(starts[1:], span)
    lens = np.minimum(rng.integers(1, 40, starts.size), ends - starts)
    e = _rows(rng, starts.size, span, 2)
    e["offset"], e["length"] = starts, lens
    return e


@pytest.mark.parametrize("seed", range(300))
def test_overlay_equals_resolve(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1000 + seed)
    lo, hi = 100, 100 + int(rng.integers(1, 600))
    kind = seed % 5
    base = resolve(_rows(rng, int(rng.integers(0, 60)), 800, 80), lo, hi)
    if kind == 0:    # the fast path: a resolved base, a sorted disjoint cycle inside [lo, hi)
        new = _disjoint_sorted(rng, int(rng.integers(0, 60)), hi - lo)
        new["offset"] += lo
    elif kind == 1:  # dense small writes over a fragmented base (4 KiB churn in miniature)
        base = resolve(np.concatenate([base, _disjoint_sorted(rng, 200, hi - lo)]), 0, hi)
        base = base[base["offset"] >= lo] if base.size else base
        new = _disjoint_sorted(rng, 150, hi - lo)
        new["offset"] += lo
    elif kind == 2:  # overlapping writes within the cycle: resolve's general path
        new = _rows(rng, int(rng.integers(0, 40)), hi, 60)
    elif kind == 3:  # rows passing the segment's end (a shrunk disk): clipped
        new = _disjoint_sorted(rng, 30, 900)
        base = resolve(_rows(rng, 30, 900, 80), 0, 900)
    else:            # an empty side
        new = _disjoint_sorted(rng, 20, hi - lo) if seed % 2 else _rows(rng, 0, 1, 2)
        new["offset"] += lo
        if seed % 2:
            base = base[:0]
    shift = int(rng.integers(0, 4))
    b0, n0 = base.copy(), new.copy()
    if kind in (0, 1, 4):  # must take the fast path, not fall back on resolve
        with monkeypatch.context() as m:
            m.setattr(entries, "resolve", lambda *a: pytest.fail("overlay fell back"))
            got = overlay(base, new, lo, hi, shift)
    else:
        got = overlay(base, new, lo, hi, shift)
    assert base.tobytes() == b0.tobytes() and new.tobytes() == n0.tobytes()  # inputs unchanged
    want_in = new.copy()
    want_in["pack"] += np.uint32(shift)
    stack = np.concatenate([base, want_in])
    want = resolve(stack, lo, hi)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert _expand(got) == _model(stack, lo, hi)


@pytest.mark.parametrize("seed", range(30))
def test_classify_many_matches_a_block_model(seed: int) -> None:
    """A piece's part of a 4 KiB block of the disk grid is data iff one of its bytes is not
    zero, wherever that byte is (first word, last byte, middle); data runs index the returned
    bytes in order. Whole aligned blocks (the fast path, which looks at a block's
    first word before scanning it) and odd pieces alike."""
    rng = np.random.default_rng(seed)
    aligned = seed % 2 == 0
    nblk = int(rng.integers(1, 40))
    if aligned:
        starts = np.sort(rng.choice(200, nblk, replace=False)).astype(np.int64) * BLOCK
        offs, lens = starts, np.full(nblk, BLOCK, np.int64)
    else:
        cuts = np.sort(rng.choice(200 * BLOCK, 2 * nblk, replace=False)).astype(np.int64)
        offs, lens = cuts[0::2], cuts[1::2] - cuts[0::2]
    n = int(lens.sum())
    buf = np.zeros(n, np.uint8)
    pos = 0
    for ln in lens.tolist():  # per piece: some zero, some data in one odd place
        kind = int(rng.integers(0, 5))
        if kind == 1:
            buf[pos] = 7                                     # first byte only
        elif kind == 2:
            buf[pos + ln - 1] = 9                            # last byte only
        elif kind == 3:
            buf[pos + int(rng.integers(0, ln))] = 1          # somewhere inside
        elif kind == 4:
            buf[pos:pos + ln] = rng.integers(0, 256, ln, dtype=np.uint8)
        pos += ln
    e, raw = classify_many(memoryview(buf.tobytes()), offs, lens)
    # the model, per byte of the disk: its value (-2: not written) and its granule (a piece's
    # part of one disk block), which is data iff one of its bytes is not zero
    span = 200 * BLOCK
    value = np.full(span, -2, np.int64)
    gran = np.full(span, -1, np.int64)
    pos = 0
    for i, (o, ln) in enumerate(zip(offs.tolist(), lens.tolist(), strict=True)):
        value[o:o + ln] = buf[pos:pos + ln]
        gran[o:o + ln] = i * 1000 + np.arange(o, o + ln) // BLOCK
        pos += ln
    written = value > -2
    nonzero_gran = np.unique(gran[written & (value > 0)])
    want = np.where(np.isin(gran, nonzero_gran), value, -1)
    want[~written] = -2
    got = np.full(span, -2, np.int64)
    rawa = np.frombuffer(bytes(raw), np.uint8) if len(raw) else np.zeros(0, np.uint8)
    for r in e:
        o, ln = int(r["offset"]), int(r["length"])
        assert (got[o:o + ln] == -2).all(), "runs overlap"
        if r["codec"] == ZERO:
            got[o:o + ln] = -1
        else:
            got[o:o + ln] = rawa[int(r["roff"]):int(r["roff"]) + ln]
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"byte {bad[:1]}: got {got[bad[:1]]}, want {want[bad[:1]]}"
