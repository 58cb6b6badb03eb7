"""The C allocator's settings for processes that ship data (an agent, ``drsite replicate``).

A cycle allocates and frees buffers of 1–8 MiB at a high rate from several threads (read
slabs, compressed frames, pack buffers). glibc serves such a buffer with ``mmap`` at first,
but after the first one is freed it raises its mmap threshold to that size, and from then on
serves them from per-thread heaps that return memory to the system only from their top: the
engine kept tens of MiB it no longer used between cycles (bench/RESULTS.md, 2026-12-08). A
fixed threshold keeps big buffers mmapped (returned on free; the buffers that are reused —
slabs, pack buffers — are pooled by their owners) and fewer arenas bound the per-thread heaps.
Measured: the same initial-copy speed and CPU (bench/initial.py, RESULTS 2026-12-08).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3   # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20
# glibc's default is 8 per core; one per core, at least 2 and at most 8, bounds what idle heaps
# keep while threads on a many-core host do not all queue on one arena's lock (measured: 2)
ARENA_MAX = min(8, max(2, os.cpu_count() or 2))


def tune_malloc() -> bool:
    """Apply the settings above to this process if its C library is glibc and the operator
    set neither ``MALLOC_MMAP_THRESHOLD_`` nor ``MALLOC_ARENA_MAX`` (theirs win) nor
    ``DRSITE_MALLOC_TUNE=0``. Returns whether they were applied; never raises."""
    if os.environ.get("DRSITE_MALLOC_TUNE") == "0" or \
            {"MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)   # this process's own symbols: its C library's among them
        if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
            return False
        ok = int(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) == 1
        ok = int(libc.mallopt(M_ARENA_MAX, ARENA_MAX)) == 1 and ok
    except (OSError, AttributeError) as e:
        log.debug("malloc settings not applied: %s", e)
        return False
    return bool(ok)
