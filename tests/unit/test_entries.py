"""``store.entries.resolve`` (a segment map from overlaid index rows) against a byte-by-byte
model: every byte of ``[lo, hi)`` names the last row covering it (zero rows: nothing)."""

from __future__ import annotations

import numpy as np
import pytest

from drsite.store.entries import resolve
from drsite.store.format import ENTRY_DT, ZERO


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
