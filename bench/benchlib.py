"""Shared helpers of the benchmark scripts (test images, timing, machine info, engine wiring).

Not a benchmark itself. The scripts import it as a sibling module (``python bench/x.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.store.format import PointInfo
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out"


# -- work directories ------------------------------------------------------------------------------

@contextlib.contextmanager
def workdir(path: Path | None, keep: bool = False) -> Iterator[Path]:
    """A fresh work directory: ``path/bench-XXXX`` (or under ``bench/out``); removed afterwards
    unless ``keep``."""
    base = Path(path) if path is not None else DEFAULT_OUT
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    try:
        yield d
    finally:
        if keep:
            print(f"(work files kept in {d})")
        else:
            shutil.rmtree(d, ignore_errors=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle() -> None:
    """Write back everything dirty before a timed run, so no run pays for an earlier one."""
    os.sync()


def process_cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process from ``/proc`` in seconds (its reaped children not counted;
    zeros if it cannot be read), in clock ticks' resolution."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (:func:`process_cpu_times`)."""
    return sum(process_cpu_times(pid))


def try_drop_caches() -> bool:
    """Drop the page cache if this process may (root outside a container); False otherwise."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cache_note(dropped: bool) -> str:
    if dropped:
        return "page cache dropped before every timed run (cold reads)"
    return ("page cache could NOT be dropped (no permission): both sides read their input "
            "from a warm page cache")


# -- test data ---------------------------------------------------------------------------------------

class DataMaker:
    """Incompressible (random) and compressible (text-like, zstd -1 ≈ 2-3x) data, seeded."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        r = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(r.choice(letters) for _ in range(r.randint(2, 11))) for _ in range(6000)]
        weights = [1.0 / (i + 1) for i in range(len(vocab))]
        words = r.choices(vocab, weights=weights, k=(16 * MiB) // 6)
        text = " ".join(words).encode()
        # some "binary" structure too: numbers in fixed-width records
        self.corpus = np.frombuffer(text[: 16 * MiB].ljust(16 * MiB, b" "), np.uint8)

    def random(self, n: int) -> bytes:
        return self.rng.bytes(n)

    def text(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = min(n - len(out), MiB)
            at = int(self.rng.integers(0, self.corpus.size - piece))
            out += self.corpus[at:at + piece].tobytes()
        return bytes(out)


@dataclass
class ImageLayout:
    size: int
    runs: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, length, kind)

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n, _ in self.runs)

    @property
    def random_bytes(self) -> int:
        return sum(n for _, n, k in self.runs if k == "random")


def plan_sparse(size: int, fill: float, seed: int, *, min_run: int = MiB,
                max_run: int = 6 * MiB) -> ImageLayout:
    """Scattered data runs of ``min_run``..``max_run`` (4 KiB multiples) with holes between,
    about ``fill`` of ``size`` in data, alternating random / compressible runs."""
    r = random.Random(seed)
    lay = ImageLayout(size)
    if fill >= 1.0:
        pos, i = 0, 0
        while pos < size:
            n = min(size - pos, r.randrange(min_run, max_run + 1, 4 * KiB))
            lay.runs.append((pos, n, "random" if i % 2 else "text"))
            pos, i = pos + n, i + 1
        return lay
    mean_run = (min_run + max_run) / 2
    mean_hole = mean_run * (1 - fill) / fill
    pos, i = 0, 0
    while True:
        hole = int(r.uniform(0.2, 1.8) * mean_hole) // (4 * KiB) * (4 * KiB)
        n = r.randrange(min_run, max_run + 1, 4 * KiB)
        pos += hole
        if pos + n > size:
            break
        lay.runs.append((pos, n, "random" if i % 2 else "text"))
        pos, i = pos + n, i + 1
    return lay


def write_image(path: Path, lay: ImageLayout, seed: int) -> None:
    """Create (or overwrite) ``path`` as a sparse image of ``lay.size`` with ``lay``'s runs;
    fsynced."""
    dm = DataMaker(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, lay.size)
        for off, n, kind in lay.runs:
            pos = 0
            while pos < n:
                piece = min(n - pos, 8 * MiB)
                data = dm.random(piece) if kind == "random" else dm.text(piece)
                os.pwrite(fd, data, off + pos)
                pos += piece
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- timing --------------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best(values: list[float]) -> float:
    return min(values)


# -- engine wiring -------------------------------------------------------------------------------------

class TimedTarget(LocalTarget):
    """A LocalTarget that records when each commit reached ``after_commit`` and how long the
    replica's hydration took (the engine calls ``after_commit`` right after the commit)."""

    def __init__(self, repo: Repository, hydrator: ReplicaHydrator | None = None) -> None:
        super().__init__(repo, hydrator)
        self.committed_at: float | None = None
        self.hydrate_s = 0.0

    def after_commit(self, point: PointInfo) -> None:
        self.committed_at = time.perf_counter()
        t0 = time.perf_counter()
        super().after_commit(point)
        self.hydrate_s += time.perf_counter() - t0


@dataclass
class Site:
    """One primary (file hypervisor) and one secondary (local store, replicas) under ``root``."""

    root: Path
    hv: FileHypervisor = field(init=False)
    store: LocalObjectStore = field(init=False)

    def __post_init__(self) -> None:
        self.hv = FileHypervisor(self.root / "primary" / "vms")
        self.store = LocalObjectStore(self.root / "secondary" / "store")

    def create_vm(self, name: str, size: int) -> str:
        vm = self.hv.create_blank(VmSpec(name=name, vcpus=1, memory_mib=512,
                                         disks=(DiskSpec("disk0", size),)))
        return vm.vm_id

    def item(self, item_id: str, vm_id: str, *, hydrate: bool,
             compression: bool | str = True) -> tuple[ItemReplicator, TimedTarget]:
        """``compression``: True/False (every tree), or "auto" | "zstd" | "off" (a tree with
        adaptive compression; an older tree takes any string as True)."""
        repo = Repository(self.store, item_id)
        hydrator = ReplicaHydrator(repo, self.root / "secondary" / "replicas" / item_id) \
            if hydrate else None
        target = TimedTarget(repo, hydrator)
        settings = ReplicationSettings(frequency_s=30.0, app_consistent_every_s=None,
                                       resync_window=ALWAYS, compression=compression)
        it = ItemReplicator(item_id=item_id, vm_id=vm_id, driver=self.hv, target=target,
                            state_dir=self.root / "primary" / "engine", settings=settings)
        return it, target

    def drop_item(self, item_id: str) -> None:
        shutil.rmtree(self.store.root / "items" / item_id, ignore_errors=True)
        shutil.rmtree(self.root / "secondary" / "replicas" / item_id, ignore_errors=True)
        (self.root / "primary" / "engine" / f"{item_id}.json").unlink(missing_ok=True)


# -- machine info and output ------------------------------------------------------------------------

def machine_info(path: Path | None = None) -> dict[str, str]:
    def cpu_model() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or "?"

    def mem() -> str:
        with contextlib.suppress(OSError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        return "?"

    def fs(p: Path) -> str:
        try:
            out = subprocess.run(["df", "-T", str(p)], capture_output=True, text=True,
                                 check=True).stdout.splitlines()[-1].split()
            return f"{out[1]} ({out[0]}, {p})"
        except (OSError, subprocess.CalledProcessError, IndexError):
            return "?"

    def tool_version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "not installed"

    return {
        "nproc": str(os.cpu_count()),
        "memory": mem(),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "filesystem": fs(path or DEFAULT_OUT),
        "cp": tool_version(["cp", "--version"]),
        "rsync": tool_version(["rsync", "--version"]),
    }


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=1, sort_keys=True))


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:.0f} MiB/s" if seconds > 0 else "inf"
