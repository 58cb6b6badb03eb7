"""The allocator settings of the processes that ship data (drsite/memtune.py), in a child
process each (they change the process's allocator for good)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("from drsite.memtune import tune_malloc\n"
         "import numpy as np\n"
         "print(tune_malloc())\n"
         "for _ in range(50):\n"   # big buffers come and go: the threshold must not move
         "    a = np.ones(4 << 20, np.uint8); del a\n"
         "b = np.ones(4 << 20, np.uint8)\n"
         "maps = open('/proc/self/maps').read()\n"
         "addr = b.ctypes.data\n"
         "print(any(int(l.split('-')[0], 16) <= addr < int(l.split()[0].split('-')[1], 16)\n"
         "          and len(l.split()) == 5 for l in maps.splitlines()))\n")


def run(env: dict[str, str]) -> list[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "DRSITE_MALLOC_TUNE")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_big_buffers_stay_mmapped_after_others_were_freed() -> None:
    """glibc raises its mmap threshold to the size of a freed mmapped buffer; tuned, a 4 MiB
    buffer allocated after fifty others were freed is still its own anonymous mapping."""
    applied, own_mapping = run({})
    assert applied == "True" and own_mapping == "True"
    assert run({"DRSITE_MALLOC_TUNE": "0"}) == ["False", "False"]   # untuned: in the heap


def test_the_operators_settings_win() -> None:
    assert run({"MALLOC_ARENA_MAX": "4"})[0] == "False"
    assert run({"DRSITE_MALLOC_TUNE": "0"})[0] == "False"
