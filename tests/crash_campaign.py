"""A crash campaign on a real deployment (issue 19): kill -9 the primary agent, the secondary
agent or the vault at a random moment of an operation, restart it, and check liveness and
safety.

Phases: ``initial`` (protect a new VM), ``delta`` (an item replicating), ``planned`` and
``unplanned`` failover, ``cancel`` (of an unplanned failover), ``reprotect`` (commit of a
planned failover, which re-protects in the reverse direction). For each trial the victim is
killed after a random delay into the operation (not at a failpoint), restarted after a random
pause, and then:

- **liveness**: the item is back to protected with a point created after the restart (for
  ``planned``/``unplanned``: the job ends, succeeded or failed with a message) — the time from
  the restart is the trial's figure; the goal is two policy intervals;
- **safety**: never a VM of the item running on both sites; the latest point of every item the
  trial touched verifies (every object read back and hash-checked); a planned failover's
  recovery VM equals the stopped source by digest, an unplanned one equals its point.

Used by ``tests/e2e/test_crash_campaign.py`` (a short campaign in CI) and
``bench/crash_campaign.py`` (a longer one by hand, figures into ``bench/RESULTS.md``).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, Nic, PowerState, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.store.digest import file_digest, image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from drsite.up import Cluster, down, start_agent, start_vault, up
from tests.procs import campaign_protection, kill9, until

PHASES = ("initial", "delta", "planned", "unplanned", "cancel", "reprotect")
# the kill comes after a random delay up to this into the operation (a failover through the
# vault takes about a second now: later kills would only hit an idle deployment)
KILL_WINDOW_S = {"initial": 3.0, "delta": 5.0, "planned": 1.0, "unplanned": 0.6,
                 "cancel": 1.5, "reprotect": 2.0}
VICTIMS = ("agent-primary", "agent-secondary", "vault")
MiB = 1 << 20


@dataclass
class Trial:
    n: int
    phase: str
    victim: str
    kill_after_s: float
    restart_to_done_s: float | None = None
    goal_s: float = 0.0
    outcome: str = ""
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    # a failed trial's evidence: the job that did not end (its tasks and messages) and the item
    evidence: dict[str, Any] = field(default_factory=dict)
    item: str = ""      # the item under test, and when its victim was killed (UTC, to find it
    killed_at: str = ""  # in the deployment's logs)
    load: float = 0.0   # the 1-minute load average per CPU when the trial ended


def protect_vm(cl: VaultClient, vm_id: str, group: str) -> str:
    """Protect a VM the agents reported (waits for it in the inventory) in ``group``; waits for
    the job and returns the item id (AssertionError with the job's error if it failed)."""
    until(lambda: any(v["vm_id"] == vm_id for v in cl.vms()), 30)
    job = cl.wait_job(cl.protect(vm_id, group)["job_id"], timeout=120)
    if job["state"] != "succeeded":
        raise AssertionError(f"protect failed: {job.get('error')}")
    return str(next(it["id"] for it in cl.items() if it["vm_id"] == vm_id))


class Campaign:
    """One deployment, many trials. ``policy_s``: the policy frequency (goal = 2 × it)."""

    def __init__(self, root: Path, *, seed: int = 1, policy_s: float = 5.0) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.policy_s = policy_s
        self.c: Cluster = up(root)
        self.prim = FileHypervisor(self.c.root / "primary" / "vms")
        self.sec = FileHypervisor(self.c.root / "secondary" / "vms")
        self.trials: list[Trial] = []
        self._n = 0
        self._pool: list[str] = []   # protected items free for the next failover trial
        self._killed_at = ""  # when the current trial's victim was killed (UTC)
        with self.client() as cl:
            campaign_protection(cl, "fast", policy_s, (("primary", "secondary", "prod", "dr"),
                                                       ("secondary", "primary", "dr", "prod")))

    # ------------------------------------------------------------------ plumbing

    def client(self) -> VaultClient:
        return self.c.client()

    def close(self) -> None:
        down(self.c)
        for h in (self.prim, self.sec):
            for vm in h.list_vms():
                h.power_off(vm.vm_id, force=True)

    def _vm(self, size_mib: int = 8) -> tuple[str, str]:
        self._n += 1
        name = f"c{self._n:03d}"
        hi, lo = divmod(self._n, 256)
        vm = self.prim.create_blank(VmSpec(
            name=name, nics=(Nic("prod", f"52:54:00:10:{hi:02x}:{lo:02x}", None),),
            disks=(DiskSpec("d0", size_mib * MiB),)))
        rng = np.random.default_rng(self._n)
        seed_disk(self.prim.disk_path(vm.vm_id, "d0"), size_mib * MiB, 0.5, rng)
        self.prim.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096,
                                                      rate=64 * 1024, seed=self._n))
        self.prim.power_on(vm.vm_id)
        return vm.vm_id, name

    def _protect(self, vm_id: str) -> str:
        with self.client() as cl:
            return protect_vm(cl, vm_id, "g")

    def _free_item(self) -> str:
        while self._pool:
            item = self._pool.pop()
            with self.client() as cl:
                it = cl.item(item)
            if it["protection"] == "protected" and it.get("active_job_id") is None:
                return item
        vm_id, _ = self._vm()
        return self._protect(vm_id)

    def _crash(self, victim: str) -> float:
        """Kill -9 ``victim``, restart it after a random pause; returns when it is back."""
        kill9(self.c.pids[victim])
        self._killed_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        time.sleep(self.rng.uniform(0.0, 0.5))
        if victim == "vault":
            start_vault(self.c)
        else:
            start_agent(self.c, victim.removeprefix("agent-"), store=True)
        return time.monotonic()

    def _store(self, site: str) -> LocalObjectStore:
        return LocalObjectStore(self.c.root / site / "store")

    def _verify_latest(self, item: str, site: str = "secondary") -> str | None:
        repo = Repository(self._store(site), item)
        try:
            latest = repo.latest()
            if latest is None:
                return None
            rep = repo.verify(latest.point_id)
            return None if rep.ok else f"point {latest.point_id} of {item}: damaged {rep.damaged_keys[:3]}"
        finally:
            repo.close()

    def _on_both(self, name: str) -> bool:
        a = any(v.name == name and v.power is PowerState.RUNNING for v in self.prim.list_vms())
        b = any(v.name == name and v.power is PowerState.RUNNING for v in self.sec.list_vms())
        return a and b

    def _new_point(self, item: str, since_wall: float) -> bool:
        with self.client() as cl:
            it = cl.item(item)
            if it["protection"] != "protected" or it["state"] != "protected":
                return False
            return any(p["created_at"] > since_wall for p in cl.points(item))

    def _back_to_protected(self, item: str, t_restart: float, since_wall: float,
                           timeout: float) -> float | None:
        ok = until(lambda: self._new_point(item, since_wall), timeout)
        return time.monotonic() - t_restart if ok else None

    def _job_end(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        def ended() -> dict[str, Any] | None:
            with self.client() as cl:
                j = cl.job(job_id)
            return j if j["state"] in ("succeeded", "failed", "cancelled") else None
        out: dict[str, Any] | None = until(ended, timeout)
        return out

    def _keep_evidence(self, t: Trial, job_id: str, item: str) -> None:
        """What a job that did not end (or failed) and its item looked like at the end."""
        with self.client() as cl:
            t.evidence = {"job": cl.job(job_id), "item": cl.item(item)}

    def _cancel_back(self, t: Trial, item: str) -> None:
        """Untimed clean-up after a failover trial: cancel so the item is protected again
        (a cancel that does not end within 90 s is the trial's finding, with its evidence)."""
        with self.client() as cl:
            it = cl.item(item)
            if it["protection"] in ("failed_over", "failing_over") and not it.get("active_job_id"):
                job_id = cl.item_action(item, "cancel")["id"]
                end = self._job_end(job_id, 90)
                if end is None:
                    t.problems.append(f"the cancel {job_id} after the trial did not end in 90 s")
                    self._keep_evidence(t, job_id, item)
                elif end["state"] == "succeeded":
                    self._pool.append(item)

    # ------------------------------------------------------------------ one trial

    def trial(self, phase: str, victim: str) -> Trial:
        t = Trial(len(self.trials) + 1, phase, victim,
                  round(self.rng.uniform(0.0, KILL_WINDOW_S[phase]), 2), goal_s=2 * self.policy_s)
        self._killed_at = ""
        try:
            getattr(self, f"_trial_{phase}")(t)
        except Exception as e:  # a broken trial is a finding, not a crash of the campaign
            t.problems.append(f"{type(e).__name__}: {e}")
        t.killed_at = self._killed_at
        t.load = round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
        t.ok = not t.problems
        self.trials.append(t)
        return t

    def _check_safety(self, t: Trial, item: str, name: str, site: str = "secondary") -> None:
        if self._on_both(name):
            t.problems.append(f"{name} runs on both sites")
        bad = self._verify_latest(item, site)
        if bad:
            t.problems.append(bad)

    def _liveness(self, t: Trial, item: str, t_restart: float, wall: float) -> None:
        # budget: the goal plus the time a restarted process needs to be useful again
        took = self._back_to_protected(item, t_restart, wall, t.goal_s + 20)
        t.restart_to_done_s = None if took is None else round(took, 2)
        t.item = item
        if took is None:
            t.problems.append(f"not protected with a new point {t.goal_s + 20:.0f} s after "
                              "the restart")
            with self.client() as cl:
                t.evidence = {"item": cl.item(item)}
        t.outcome = "protected, new point"

    def _trial_initial(self, t: Trial) -> None:
        vm_id, name = self._vm()
        with self.client() as cl:
            until(lambda: any(v["vm_id"] == vm_id for v in cl.vms()), 30)
            job = cl.protect(vm_id, "g")
        time.sleep(t.kill_after_s)
        wall = time.time()
        t_restart = self._crash(t.victim)
        end = self._job_end(job["job_id"], 90)
        if end is None or end["state"] != "succeeded":
            t.problems.append(f"EnableProtection ended {end and end['state']}: "
                              f"{end and end.get('error')}")
            return
        self._liveness(t, str(job["item_id"]), t_restart, wall)
        self._check_safety(t, str(job["item_id"]), name)
        self._pool.append(str(job["item_id"]))

    def _trial_delta(self, t: Trial) -> None:
        item = self._free_item()
        time.sleep(t.kill_after_s)
        wall = time.time()
        t_restart = self._crash(t.victim)
        self._liveness(t, item, t_restart, wall)
        with self.client() as cl:
            name = cl.item(item)["vm_name"]
        self._check_safety(t, item, name)
        self._pool.append(item)

    def _failover(self, t: Trial, kind: str) -> None:
        item = self._free_item()
        with self.client() as cl:
            it = cl.item(item)
            job = cl.item_action(item, f"{kind}-failover")
        time.sleep(t.kill_after_s)
        t_restart = self._crash(t.victim)
        end = self._job_end(job["id"], t.goal_s + 60)
        t.restart_to_done_s = round(time.monotonic() - t_restart, 2) if end else None
        if end is None:
            t.problems.append("the failover job did not end")
            self._keep_evidence(t, job["id"], item)
            return
        t.outcome = f"job {end['state']}"
        if end["state"] == "failed" and not (end.get("error") or {}).get("message"):
            t.problems.append("the job failed without a message")
        name, vm_id = it["vm_name"], it["vm_id"]
        if end["state"] == "succeeded":
            rec = until(lambda: next((v for v in self.sec.list_vms() if v.name == name
                                       and v.power is PowerState.RUNNING), None), 10)
            if rec is None:
                t.problems.append("no recovery VM runs after a succeeded failover")
            elif kind == "planned":
                src = {d.disk_id: file_digest(self.prim.disk_path(vm_id, d.disk_id), d.size)
                       for d in self.prim.get_vm(vm_id).disks}
                dst = {d.disk_id: file_digest(self.sec.disk_path(rec.vm_id, d.disk_id), d.size)
                       for d in self.sec.get_vm(rec.vm_id).disks}
                if src != dst:
                    t.problems.append("planned failover: recovery disks differ from the source")
            else:
                with self.client() as cl:
                    point = cl.failovers(item)[0]["point_id"]
                if not self._equals_point(rec.vm_id, item, point):
                    t.problems.append(f"unplanned failover: recovery VM differs from {point}")
            # the old primary is fenced (unplanned) or off (planned)
            if not until(lambda: self.prim.get_vm(vm_id).power is PowerState.STOPPED,
                          t.goal_s + 10):
                t.problems.append("the old primary's VM still runs")
        self._check_safety(t, item, name)
        self._cancel_back(t, item)

    def _equals_point(self, vm_id: str, item: str, point_id: str) -> bool:
        repo = Repository(self._store("secondary"), item)
        try:
            for d in self.sec.get_vm(vm_id).disks:
                r = self.sec.open_live_reader(vm_id, d.disk_id)
                try:
                    if image_digest(r) != image_digest(repo.reader(point_id, d.disk_id)):
                        return False
                finally:
                    r.close()
            return True
        finally:
            repo.close()

    def _trial_planned(self, t: Trial) -> None:
        self._failover(t, "planned")

    def _trial_unplanned(self, t: Trial) -> None:
        self._failover(t, "unplanned")

    def _after(self, t: Trial, first: str, second: str, budget_s: float
               ) -> tuple[str, str, float, float] | None:
        """``first`` on a free item (untimed, must succeed), then ``second``: the victim is
        killed during ``second``, which must succeed. (item, VM name, restart time, wall time
        of the kill), or None when the trial failed (its problems and evidence recorded)."""
        item = self._free_item()
        with self.client() as cl:
            name = cl.item(item)["vm_name"]
            job = cl.wait_job(cl.item_action(item, first)["id"], timeout=90)
            if job["state"] != "succeeded":
                t.problems.append(f"set-up {first} {job['state']}: {job.get('error')}")
                return None
            job = cl.item_action(item, second)
        time.sleep(t.kill_after_s)
        wall = time.time()
        t_restart = self._crash(t.victim)
        end = self._job_end(job["id"], budget_s)
        if end is None or end["state"] != "succeeded":
            t.problems.append(f"{second} ended {end and end['state']}: {end and end.get('error')}")
            self._keep_evidence(t, job["id"], item)
            return None
        return item, name, t_restart, wall

    def _trial_cancel(self, t: Trial) -> None:
        got = self._after(t, "unplanned-failover", "cancel", t.goal_s + 60)
        if got is None:
            return
        item, name, t_restart, wall = got
        self._liveness(t, item, t_restart, wall)
        self._check_safety(t, item, name)
        self._pool.append(item)

    def _trial_reprotect(self, t: Trial) -> None:
        got = self._after(t, "planned-failover", "commit", t.goal_s + 90)
        if got is None:
            return
        item, name, t_restart, wall = got
        with self.client() as cl:
            rev = str(cl.failovers(item)[0]["result"]["reprotect"]["item_id"])
        self._liveness(t, rev, t_restart, wall)
        self._check_safety(t, rev, name, site="primary")

    # ------------------------------------------------------------------ many

    def run(self, trials: int, *, phases: tuple[str, ...] = PHASES,
            victims: tuple[str, ...] = VICTIMS) -> list[Trial]:
        """``trials`` trials cycling through every (phase, victim) pair in a shuffled order."""
        pairs = [(p, v) for p in phases for v in victims]
        self.rng.shuffle(pairs)
        for i in range(trials):
            phase, victim = pairs[i % len(pairs)]
            self.trial(phase, victim)
        return self.trials


def summary(trials: list[Trial]) -> dict[str, Any]:
    """Per phase and per killed process: trials, failures, restart → done p50/p100 (s)."""
    def stats(ts: list[Trial]) -> dict[str, Any]:
        xs = sorted(t.restart_to_done_s for t in ts if t.restart_to_done_s is not None)
        return {"trials": len(ts), "failed": sum(not t.ok for t in ts),
                "p50_s": round(statistics.median(xs), 2) if xs else None,
                "p100_s": xs[-1] if xs else None,
                "within_goal": sum(1 for t in ts if t.restart_to_done_s is not None
                                   and t.restart_to_done_s <= t.goal_s)}
    return {"all": stats(trials),
            "by_phase": {p: stats([t for t in trials if t.phase == p])
                         for p in PHASES if any(t.phase == p for t in trials)},
            "by_victim": {v: stats([t for t in trials if t.victim == v])
                          for v in VICTIMS if any(t.victim == v for t in trials)},
            "trials": [asdict(t) for t in trials]}
