"""Extent lists: sorted, non-overlapping ``(offset, length)`` byte ranges held in numpy arrays.

Invariant of an :class:`ExtentList` built by :func:`coalesce`: ``starts`` strictly increasing,
every ``length > 0``, and ``starts[i] + lengths[i] < starts[i + 1]`` (touching ranges merge).
All operations are vectorised; nothing loops per extent in Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class ExtentList:
    starts: I64
    lengths: I64

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExtentList):
            return NotImplemented
        return bool(np.array_equal(self.starts, other.starts)
                    and np.array_equal(self.lengths, other.lengths))

    def __hash__(self) -> int:
        return hash((self.starts.tobytes(), self.lengths.tobytes()))

    @staticmethod
    def empty() -> ExtentList:
        return ExtentList(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @staticmethod
    def of(pairs: list[tuple[int, int]]) -> ExtentList:
        if not pairs:
            return ExtentList.empty()
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        return coalesce(arr[:, 0], arr[:, 1])

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for s, n in zip(self.starts.tolist(), self.lengths.tolist(), strict=True):
            yield int(s), int(n)

    @property
    def total(self) -> int:
        return int(self.lengths.sum())

    @property
    def ends(self) -> I64:
        return self.starts + self.lengths

    def to_pairs(self) -> list[tuple[int, int]]:
        return list(self)

    def union(self, other: ExtentList) -> ExtentList:
        return coalesce(np.concatenate([self.starts, other.starts]),
                        np.concatenate([self.lengths, other.lengths]))

    def clip(self, size: int) -> ExtentList:
        """Restrict to ``[0, size)``."""
        ends = np.minimum(self.ends, size)
        starts = np.minimum(self.starts, size)
        keep = ends > starts
        return ExtentList(starts[keep], (ends - starts)[keep])

    def split(self, max_len: int) -> ExtentList:
        """Cut extents so that none is longer than ``max_len`` (the list stays sorted)."""
        if len(self) == 0 or int(self.lengths.max()) <= max_len:
            return self
        pieces = (self.lengths + max_len - 1) // max_len
        idx = np.repeat(np.arange(len(self)), pieces)
        first = np.cumsum(pieces) - pieces
        k = np.arange(int(pieces.sum())) - np.repeat(first, pieces)
        starts = self.starts[idx] + k * max_len
        ends = np.minimum(starts + max_len, self.ends[idx])
        return ExtentList(starts.astype(np.int64), (ends - starts).astype(np.int64))

    def align(self, block: int, size: int) -> ExtentList:
        """Widen every extent to ``block`` boundaries, clipped to ``size``, and coalesce."""
        starts = (self.starts // block) * block
        ends = np.minimum(((self.ends + block - 1) // block) * block, size)
        return coalesce(starts, ends - starts)

    def subtract(self, other: ExtentList) -> ExtentList:
        """The parts of ``self`` not covered by ``other``."""
        if len(self) == 0 or len(other) == 0:
            return self
        out: list[tuple[int, int]] = []
        # Both lists are sorted and disjoint; a merge walk is O(n + m) and rare (resync planning).
        o_s, o_e = other.starts.tolist(), other.ends.tolist()
        j = 0
        for s, e in zip(self.starts.tolist(), self.ends.tolist(), strict=True):
            cur = s
            while j < len(o_s) and o_e[j] <= cur:
                j += 1
            k = j
            while k < len(o_s) and o_s[k] < e:
                if o_s[k] > cur:
                    out.append((cur, o_s[k] - cur))
                cur = max(cur, o_e[k])
                k += 1
            if cur < e:
                out.append((cur, e - cur))
        return ExtentList.of(out)

    def intersect(self, other: ExtentList) -> ExtentList:
        """The parts of ``self`` also covered by ``other``."""
        return self.subtract(self.subtract(other))

    def blocks(self, block: int) -> npt.NDArray[np.int64]:
        """Indexes of the ``block``-sized blocks that these extents touch, sorted and unique."""
        if len(self) == 0:
            return np.zeros(0, np.int64)
        first = self.starts // block
        last = (self.ends - 1) // block
        counts = last - first + 1
        idx = np.repeat(first, counts) + (np.arange(int(counts.sum()))
                                          - np.repeat(np.cumsum(counts) - counts, counts))
        return np.unique(idx)


def coalesce(starts: npt.ArrayLike, lengths: npt.ArrayLike) -> ExtentList:
    """Sort, drop empty ranges, and merge overlapping or touching ranges."""
    s = np.asarray(starts, dtype=np.int64)
    n = np.asarray(lengths, dtype=np.int64)
    keep = n > 0
    s, n = s[keep], n[keep]
    if s.size == 0:
        return ExtentList.empty()
    if s.size > 1 and bool((s[1:] < s[:-1]).any()):
        order = np.argsort(s, kind="stable")
        s, e = s[order], (s + n)[order]
    else:  # already in order (a cycle's writes in disk order): no sort, no gather
        e = s + n
    run_end = np.maximum.accumulate(e)
    # a new run starts where the extent begins after everything before it has ended
    new_run = np.empty(s.size, dtype=bool)
    new_run[0] = True
    new_run[1:] = s[1:] > run_end[:-1]
    run_ids = np.cumsum(new_run) - 1
    out_s = s[new_run]
    out_e = np.zeros(out_s.size, np.int64)
    np.maximum.at(out_e, run_ids, e)
    return ExtentList(out_s, out_e - out_s)


def blocks_to_extents(block_idx: npt.ArrayLike, block: int, size: int) -> ExtentList:
    """Turn sorted block indexes into byte extents, merging neighbours, clipped to ``size``."""
    b = np.asarray(block_idx, dtype=np.int64)
    if b.size == 0:
        return ExtentList.empty()
    return coalesce(b * block, np.full(b.size, block, np.int64)).clip(size)
