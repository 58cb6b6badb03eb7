"""Failover RTO: request → replica VM running, for a small and a huge sparse disk.

Two in-process sites (two ``FileHypervisor`` roots, a ``LocalObjectStore`` and a hydrated
replica on the recovery site, the primary's real ``ItemReplicator``), as in
``tests/integration/test_failover_actions.py``. For each disk size (default 1 GiB and 100 GiB,
sparse) the VM holds the SAME data: ``--data-mib`` (default 256 MiB) in scattered runs (half
random, half text), then ``--cycles`` delta cycles of ``--cycle-mib`` each (scattered writes).
Points: ``latest`` (the last cycle) and ``older`` = the point two cycles back (differs from the
latest by the last two cycles' writes).

Cases, per size (each timed failover starts with the page cache dropped when
``/proc/sys/vm/drop_caches`` is writable):

* ``unplanned/latest``: ``unplanned_failover(item, "latest")`` (the replica's images are moved
  into the VM), then ``cancel`` (untimed: deletes the VM, rebuilds the replica);
* ``unplanned/older``: the same for the older point (restored from the store);
* ``test/latest`` and ``test/older``: ``test_failover`` (frozen copy of the replica or restore,
  then a copy-on-write VM), then ``cleanup_test_failover`` (untimed).

The figure is ``FailoverResult.rto_s`` (the library's own request → VM running) with its steps
(``timings``); the wall time of the call as seen by the caller is printed too. After each
failover, outside the timed region, the running VM's disks are checked equal to the chosen point
by blake3 (``drsite.store.digest.image_digest``): over the whole logical disk for disks up to
``--full-digest-max-gib``, else over the union of both sides' data extents (everything outside
reads as zeros on both sides, so equal digests there mean equal disks).

Goals (from the issue): 100 GiB RTO ≤ 1.2 × the 1 GiB RTO, and < 10 s.

    .venv/bin/python bench/rto.py [--quick] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    DataMaker,
    GiB,
    KiB,
    MiB,
    cache_note,
    machine_info,
    mib,
    settle,
    try_drop_caches,
    workdir,
    write_json,
)

from drsite.core.extents import ExtentList
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.failover import actions as fo
from drsite.failover.network import NetworkMap, NetworkMapping, SubnetRule
from drsite.hypervisors.file import FileHypervisor
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.store.digest import image_digest
from drsite.store.format import PointInfo
from drsite.store.generation import GenerationStore
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

RATIO_GOAL = 1.2
ABS_GOAL_S = 10.0
DISK = "disk0"
SETTINGS = ReplicationSettings(frequency_s=30.0, app_consistent_every_s=None,
                               resync_window=ALWAYS)
NETMAP = NetworkMap((NetworkMapping("prod", "dr-prod", "dr-test",
                                   SubnetRule("10.0.0.0/24", "10.9.0.0/24")),))


# -- setup ---------------------------------------------------------------------------------------

def scattered_runs(size: int, total: int, run: int, seed: int) -> list[tuple[int, int]]:
    """``total // run`` runs of ``run`` bytes spread over the whole disk (one per equal slot,
    at a random 4 KiB-aligned place inside it): the same data amount whatever ``size``."""
    r = random.Random(seed)
    n = max(1, total // run)
    slot = size // n
    out = []
    for i in range(n):
        room = max(0, slot - run) // (4 * KiB)
        out.append((i * slot + r.randint(0, room) * 4 * KiB, run))
    return out


@dataclass
class Setup:
    size: int
    item: fo.ProtectedItem
    points: list[PointInfo]
    setup_s: float
    data_bytes: int
    cycle_bytes: int

    @property
    def latest(self) -> PointInfo:
        return self.points[-1]

    @property
    def older(self) -> PointInfo:
        return self.points[-3]


def build(root: Path, size: int, data: int, cycles: int, cycle_bytes: int, seed: int) -> Setup:
    t0 = time.perf_counter()
    hv = FileHypervisor(root / "a" / "vms")
    a = fo.Site("site-a", hv, root / "a" / "work")
    b = fo.Site("site-b", FileHypervisor(root / "b" / "vms"), root / "b" / "work")
    store = LocalObjectStore(root / "b" / "store")
    spec = VmSpec("app", 1, 512, (Nic("prod", "52:54:00:00:00:11", "10.0.0.11"),),
                  (DiskSpec(DISK, size),))
    vm = hv.create_blank(spec)
    dm = DataMaker(seed)
    # the base data, written straight into the (stopped, untracked) disk before protection
    with open(hv.disk_path(vm.vm_id, DISK), "r+b") as f:
        for i, (off, n) in enumerate(scattered_runs(size, data, 4 * MiB, seed)):
            f.seek(off)
            f.write(dm.random(n) if i % 2 else dm.text(n))
    item_id = "item-app"
    GenerationStore(store).ensure(item_id, a.name, now=time.time())
    repo = Repository(store, item_id)
    hydrator = ReplicaHydrator(repo, b.work_dir / "replicas" / item_id)
    engine = ItemReplicator(item_id=item_id, vm_id=vm.vm_id, driver=hv,
                            target=LocalTarget(repo, hydrator), state_dir=a.work_dir / "engine",
                            settings=SETTINGS, generation=1)
    points = [engine.run_initial()]
    for c in range(cycles):  # tracked writes (through the driver), one delta cycle each
        for off, n in scattered_runs(size, cycle_bytes, 256 * KiB, seed * 100 + c):
            hv.write(vm.vm_id, DISK, off, dm.random(n))
        points.append(engine.run_cycle())
    item = fo.ProtectedItem(item_id, vm.vm_id, spec, a, b, repo, hydrator, engine, NETMAP)
    return Setup(size, item, points, time.perf_counter() - t0, data, cycle_bytes)


# -- verification (outside the timed region) -----------------------------------------------------

class Window:
    """The bytes of ``reader`` inside ``extents``, concatenated, as a readable of their total
    size (what ``image_digest`` reads)."""

    def __init__(self, reader: Any, extents: ExtentList) -> None:
        self.reader = reader
        self.pairs = extents.to_pairs()
        self.starts: list[int] = []
        pos = 0
        for _, n in self.pairs:
            self.starts.append(pos)
            pos += n
        self._size = pos

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        i = bisect.bisect_right(self.starts, offset) - 1
        done = 0
        while done < len(buf):
            src_off, n = self.pairs[i]
            inner = offset + done - self.starts[i]
            k = min(n - inner, len(buf) - done)
            self.reader.readinto(src_off + inner, buf[done:done + k])
            done += k
            i += 1


def verify_vm(item: fo.ProtectedItem, vm_id: str, point: PointInfo,
              full_max: int) -> tuple[bool, str, float]:
    """(VM disks == point, method, seconds): blake3 of every disk on both sides."""
    t0 = time.perf_counter()
    hv = item.recovery.hypervisor
    ok = True
    method = ""
    for disk_id, size in point.disk_sizes.items():
        vr = hv.open_live_reader(vm_id, disk_id)
        pr = item.repo.reader(point.point_id, disk_id)
        try:
            if vr.size != size:
                ok = False
                continue
            if size <= full_max:
                method = "full disk"
                a, b = image_digest(vr), image_digest(pr)
            else:
                method = "data extents of both sides"
                ext = vr.data_extents().union(pr.data_extents()).clip(size)
                a, b = image_digest(Window(vr, ext)), image_digest(Window(pr, ext))
            ok = ok and a == b
        finally:
            vr.close()
            pr.close()
    return ok, method, time.perf_counter() - t0


# -- the cases -----------------------------------------------------------------------------------

@dataclass
class Case:
    size: int
    kind: str
    which: str
    rto_s: float
    call_s: float
    timings: dict[str, float]
    image_source: str
    bytes_restored: int
    verified: bool
    verify_method: str
    verify_s: float
    undo_s: float
    cache_dropped: bool
    runs: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.which}"


def run_case(s: Setup, kind: str, which: str, rep: int, full_max: int,
             drop: bool) -> Case:
    item = s.item
    point = s.latest if which == "latest" else s.older
    choice = "latest" if which == "latest" else point.point_id
    fid = f"{kind}-{which}-{rep}"
    settle()
    dropped = try_drop_caches() if drop else False
    t0 = time.perf_counter()
    if kind == "unplanned":
        res = fo.unplanned_failover(item, choice, failover_id=fid)
    else:
        res = fo.test_failover(item, choice, failover_id=fid)
    call_s = time.perf_counter() - t0
    assert res.rto_s is not None and res.vm_id is not None
    if res.point_id != point.point_id:
        raise SystemExit(f"{fid}: failed over to {res.point_id}, expected {point.point_id}")
    ok, method, vs = verify_vm(item, res.vm_id, point, full_max)
    t1 = time.perf_counter()
    if kind == "unplanned":
        fo.cancel(item, fid)  # deletes the VM, new generation, rebuilds the replica
    else:
        fo.cleanup_test_failover(item, fid)
    undo_s = time.perf_counter() - t1
    return Case(s.size, kind, which, res.rto_s, call_s, dict(res.timings), res.image_source,
                res.bytes_restored, ok, method, vs, undo_s, dropped)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def fmt_steps(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in t.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB of data, 2 MiB cycles, one run per case (≈ 30 s)")
    ap.add_argument("--sizes-gib", type=int, nargs="+", default=[1, 100],
                    help="disk sizes (GiB, sparse); the first is the reference")
    ap.add_argument("--data-mib", type=int, default=None, help="base data (default 256)")
    ap.add_argument("--cycle-mib", type=int, default=None, help="data per cycle (default 16)")
    ap.add_argument("--cycles", type=int, default=3, help="delta cycles after the initial")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per case, best kept (default 2; 1 with --quick)")
    ap.add_argument("--no-test", action="store_true", help="skip the test-failover cases")
    ap.add_argument("--no-drop-caches", action="store_true",
                    help="do not drop the page cache before timed runs")
    ap.add_argument("--full-digest-max-gib", type=int, default=2,
                    help="verify whole disks up to this size, larger by data extents")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where work files go (a temp dir is made inside; default bench/out)")
    ap.add_argument("--keep", action="store_true", help="keep the work files")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if a.cycles < 2:
        ap.error("--cycles must be ≥ 2 (the older point is two cycles back)")
    data = (a.data_mib or (64 if a.quick else 256)) * MiB
    cyc = (a.cycle_mib or (2 if a.quick else 16)) * MiB
    repeat = a.repeat or (1 if a.quick else 2)
    kinds = ["unplanned"] + ([] if a.no_test else ["test"])
    full_max = a.full_digest_max_gib * GiB
    t_all = time.perf_counter()
    cases: list[Case] = []
    setups: list[Setup] = []
    problems: list[str] = []
    with workdir(a.workdir, keep=a.keep) as wd:
        info = machine_info(wd)
        print(f"rto: {', '.join(f'{g} GiB' for g in a.sizes_gib)} sparse disks, "
              f"{mib(data)} base data + {a.cycles} cycles × {mib(cyc)}; "
              f"{repeat} run(s) per case; work dir {wd}")
        print(f"machine: {info['nproc']} CPUs, {info['cpu']}, {info['memory']}; "
              f"fs {info['filesystem']}")
        try:
            for gib in a.sizes_gib:
                s = build(wd / f"d{gib}g", gib * GiB, data, a.cycles, cyc, a.seed)
                setups.append(s)
                print(f"[{gib} GiB] setup {s.setup_s:.1f} s: points "
                      f"{[p.point_id for p in s.points]}; latest {s.latest.point_id}, "
                      f"older {s.older.point_id}")
            print(f"load average before the timed runs: {loadavg()}")
            # sizes interleaved run by run, so that a drift in the machine's load (other jobs)
            # does not land on one size only
            for kind in kinds:
                for which in ("latest", "older"):
                    runs: dict[int, list[Case]] = {s.size: [] for s in setups}
                    for r in range(repeat):
                        for s in setups:
                            runs[s.size].append(run_case(s, kind, which, r, full_max,
                                                         not a.no_drop_caches))
                    for s in setups:
                        rs = runs[s.size]
                        c = min(rs, key=lambda x: x.rto_s)
                        c.runs = [x.rto_s for x in rs]
                        c.verified = all(x.verified for x in rs)
                        cases.append(c)
                        if not c.verified:
                            problems.append(f"{s.size // GiB} GiB {c.label}: VM disks differ "
                                            "from the point")
                        print(f"{s.size // GiB:4d} GiB {c.label:17s} RTO {c.rto_s:6.3f} s (runs "
                              f"{', '.join(f'{x:.3f}' for x in c.runs)}; call {c.call_s:.3f} s) "
                              f"image {c.image_source}, restored {mib(c.bytes_restored)}; "
                              f"disks == point: {'yes' if c.verified else 'NO'} "
                              f"({c.verify_method}, {c.verify_s:.1f} s); "
                              f"undo {c.undo_s:.1f} s")
                        print(f"{'':26s} steps: {fmt_steps(c.timings)}")
            print(f"load average after the timed runs: {loadavg()}")
        finally:
            for s in setups:
                for site in (s.item.primary, s.item.recovery):
                    for vm in site.hypervisor.list_vms():
                        site.hypervisor.power_off(vm.vm_id, force=True)
        total = time.perf_counter() - t_all
    ref_gib, big_gib = a.sizes_gib[0], a.sizes_gib[-1]
    by = {(c.size // GiB, c.label): c for c in cases}
    print(f"\nsummary (best of {repeat}; {cache_note(any(c.cache_dropped for c in cases))}):")
    print(f"  {'case':17s} {ref_gib:>5d} GiB {big_gib:>6d} GiB   ratio   "
          f"goal ratio ≤ {RATIO_GOAL}, {big_gib} GiB < {ABS_GOAL_S:.0f} s")
    verdicts = []
    for kind in kinds:
        for which in ("latest", "older"):
            label = f"{kind}/{which}"
            ref, big = by[(ref_gib, label)], by[(big_gib, label)]
            ratio = big.rto_s / ref.rto_s if ref.rto_s > 0 else float("inf")
            ok_r, ok_a = ratio <= RATIO_GOAL, big.rto_s < ABS_GOAL_S
            verdicts.append({"case": label, "ref_s": ref.rto_s, "big_s": big.rto_s,
                             "ratio": ratio, "ratio_met": ok_r, "abs_met": ok_a})
            print(f"  {label:17s} {ref.rto_s:7.3f} s {big.rto_s:8.3f} s  {ratio:6.2f}   "
                  f"ratio {'met' if ok_r else 'NOT met'}, "
                  f"abs {'met' if ok_a else 'NOT met'}")
    print(f"total wall time {total:.0f} s")
    for p in problems:
        print(f"PROBLEM: {p}")
    write_json(a.json, {
        "machine": info, "data_bytes": data, "cycle_bytes": cyc, "cycles": a.cycles,
        "repeat": repeat, "total_s": total, "verdicts": verdicts, "problems": problems,
        "cases": [{"size": c.size, "case": c.label, "rto_s": c.rto_s, "runs": c.runs,
                   "call_s": c.call_s, "timings": c.timings, "image_source": c.image_source,
                   "bytes_restored": c.bytes_restored, "verified": c.verified,
                   "verify_method": c.verify_method, "cache_dropped": c.cache_dropped}
                  for c in cases]})
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
