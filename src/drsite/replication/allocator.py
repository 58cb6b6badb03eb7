"""The engine process's memory allocator: give big freed buffers back to the system.

A cycle allocates and frees many large buffers (read batches, frame copies, packs, entry
arrays) from several threads. glibc's malloc raises its mmap threshold after such frees, so
later large buffers come from per-thread arenas, and what they free stays in the process: an
engine shipping 2 GiB of scattered 4 KiB writes held 160 MiB of freed memory (RSS 240 MiB
for 8 MiB in use). A fixed threshold keeps buffers of 256 KiB and more in their own mappings,
returned on free (measured: peak RSS 165 MiB, 66 MiB between cycles, same CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024

_done = False
_lock = threading.Lock()


def limit_retention() -> bool:
    """Fix glibc's mmap threshold for this process (once; later calls do nothing). Returns
    whether the allocator took it (False where there is no glibc ``mallopt``)."""
    global _done
    with _lock:
        if _done:
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
        return _done
