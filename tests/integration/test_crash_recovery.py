"""Crash tests with real processes: ``drsite replicate`` is SIGKILLed mid initial copy and mid
commit (at failpoints, so the kill lands exactly there) while the VM's guest process writes;
the restarted process resumes and every committed point stays intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.store.digest import file_digest, image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
SIZE = 48 * MiB


class Site:
    def __init__(self, tmp: Path, *, size: int = SIZE, fill_every: int = 2,
                 rate: int = 1 * MiB) -> None:
        """Two disks of ``size``, every ``fill_every``-th MiB written (incompressible), the
        guest writing 4 KiB blocks at random at ``rate`` bytes/s."""
        self.tmp = tmp
        self.size = size
        self.vms = tmp / "vms"
        self.hv = FileHypervisor(self.vms)
        vm = self.hv.create_blank(VmSpec(name="crashy", disks=(DiskSpec("d0", size),
                                                               DiskSpec("d1", size))))
        self.vm_id = vm.vm_id
        rng = np.random.default_rng(3)
        for d in ("d0", "d1"):
            with open(self.hv.disk_path(vm.vm_id, d), "r+b") as f:
                for i in range(0, size // MiB, fill_every):  # incompressible 1 MiB runs
                    os.pwrite(f.fileno(), rng.integers(0, 256, MiB, dtype=np.uint8).tobytes(),
                              i * MiB)
        self.hv.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096,
                                                    rate=rate, seed=9))
        self.hv.power_on(vm.vm_id)

    def repo(self) -> Repository:
        return Repository(LocalObjectStore(self.tmp / "store"), "item-crashy")

    def run(self, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env.pop("DRSITE_FAILPOINTS", None)
        if failpoint:
            env["DRSITE_FAILPOINTS"] = failpoint
        cmd = [sys.executable, "-m", "drsite.cli.main", "replicate", "--vms", str(self.vms),
               "--vm", "crashy", "--store", str(self.tmp / "store"), "--state",
               str(self.tmp / "state"), "--replicas", str(self.tmp / "replicas"),
               "--frequency", "5", "--json", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    def report(self, proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
        assert proc.returncode == 0, proc.stderr[-3000:]
        out: dict[str, object] = json.loads(proc.stdout)
        return out

    def verify_all_points(self) -> None:
        repo = self.repo()
        for p in repo.points():
            assert repo.verify(p.point_id).ok, p.point_id

    def stop_and_prove(self) -> None:
        """Shut the guest down, ship the last changes: source == point == replica."""
        self.hv.power_off(self.vm_id)
        self.report(self.run("--until", "cycles", "--cycles", "1"))
        repo = self.repo()
        latest = repo.latest()
        assert latest is not None
        for d in ("d0", "d1"):
            src = file_digest(self.hv.disk_path(self.vm_id, d), self.size)
            assert image_digest(repo.reader(latest.point_id, d)) == src
            assert file_digest(self.tmp / "replicas" / "item-crashy" / f"{d}.img",
                               self.size) == src
        self.verify_all_points()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path)
    yield s  # type: ignore[misc]
    s.hv.power_off(s.vm_id, force=True)


def test_sigkill_mid_initial_copy_resumes_not_from_zero(site: Site) -> None:
    proc = site.run("--until", "initial", failpoint="store.pack-stored=kill@3")
    assert proc.returncode == -9, proc.stderr[-2000:]
    repo = site.repo()
    assert repo.points() == [], "a point became visible before its copy finished"
    staged = repo.staged_cycles()
    assert len(staged) == 1
    packs_before = list(LocalObjectStore(site.tmp / "store").list("items/item-crashy/packs/"))
    assert len(packs_before) >= 3

    rep = site.report(site.run("--until", "initial"))
    assert rep["state"] == "protected"
    resumed = int(rep["initial_resumed_from"])  # type: ignore[call-overload]
    assert resumed >= 3 * 8 * MiB * 0.9, f"restarted from zero (resumed from {resumed} bytes)"
    points = site.repo().points()
    assert len(points) == 1 and points[0].cycle_id == staged[0]
    site.stop_and_prove()


@pytest.mark.parametrize("failpoint", ["store.before-manifest", "store.after-manifest",
                                       "engine.after-commit"])
def test_sigkill_mid_commit_leaves_points_whole(site: Site, failpoint: str) -> None:
    site.report(site.run("--until", "initial"))
    before = site.repo().points()
    proc = site.run("--until", "cycles", "--cycles", "1", failpoint=f"{failpoint}=kill")
    assert proc.returncode == -9, proc.stderr[-2000:]
    repo = site.repo()
    after_kill = repo.points()
    if failpoint == "store.before-manifest":
        assert after_kill == before, "a point became visible before its manifest was stored"
        assert len(repo.staged_cycles()) == 1
    else:
        assert len(after_kill) == len(before) + 1
    site.verify_all_points()  # nothing committed was damaged by the kill

    rep = site.report(site.run("--until", "cycles", "--cycles", "1"))
    assert rep["state"] == "protected" and rep["last_error"] is None
    points = site.repo().points()
    cycles = [p.cycle_id for p in points]
    assert len(cycles) == len(set(cycles)), "a cycle was committed twice"
    assert site.repo().staged_cycles() == []
    site.stop_and_prove()


def test_sigkill_while_rehoming_leaves_points_whole(tmp_path: Path) -> None:
    """A guest that overwrites most of its disk every cycle leaves the older packs sparse, and
    with a short retention each cycle also stores their live blocks again (re-homing,
    ``store/compaction.py``). ``drsite replicate`` is killed in the middle of that: nothing
    committed is touched, the restarted process commits the interrupted cycle as its own point
    and re-homes again, and the last point and the replica equal the disks."""
    # ~27 % of each disk overwritten per 5 s cycle (over half would be a resync)
    site = Site(tmp_path, size=16 * MiB, fill_every=1, rate=2 * MiB)
    try:
        short = ("--retention-hours", "0.02")   # 72 s of 5 s points: re-homing is on
        # the initial point and four cycles (the first is short): the next cycle's base reads
        # ~40 % of the initial packs (a process plans re-homing at its first cycle, then once a
        # minute)
        site.report(site.run("--until", "cycles", "--cycles", "4", *short))
        before = site.repo().points()
        proc = site.run("--until", "cycles", "--cycles", "6", *short,
                        failpoint="engine.rehome-batch=kill@2")
        assert proc.returncode == -9, "never killed while re-homing: " + proc.stderr[-2000:]
        repo = site.repo()
        assert [p.point_id for p in repo.points()][:len(before)] == \
            [p.point_id for p in before]
        assert len(repo.staged_cycles()) == 1, "the cycle that was re-homing is not staged"
        site.verify_all_points()
        at_kill = {p.point_id for p in repo.points()}

        rep = site.report(site.run("--until", "cycles", "--cycles", "2", *short))
        assert rep["state"] == "protected" and rep["last_error"] is None
        repo = site.repo()
        assert repo.staged_cycles() == []
        rehomed = [int(p.meta.get("rehomed") or 0) for p in repo.points()
                   if p.point_id not in at_kill]
        assert any(rehomed), f"the restarted process re-homed nothing: {rehomed}"
        site.stop_and_prove()
    finally:
        site.hv.power_off(site.vm_id, force=True)
