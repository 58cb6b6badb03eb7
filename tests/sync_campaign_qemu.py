"""Zero data loss of synchronous mode for QEMU VMs (issue 18 part 2) on a real deployment: a
vault and two agents (``drsite up --hypervisor qemu``), QEMU's active mirror into the recovery
site's overlay. A workload outside the VM records every write the guest acknowledged, QEMU
and the primary agent are killed with SIGKILL at a random moment, an unplanned failover to
"latest" runs through the vault, and every acknowledged write must be on the recovery VM's
disk.

The workload: one thread writes stamped 4 KiB blocks (``tests.sync_campaign.block``: thread,
seq) through the guest's virtio-blk device — HMP ``qemu-io -d vd0/virtio-backend "write -s
FILE"`` returns only once the device's write completed (with the mirror: once the recovery
site's overlay flushed it). The monitor serves one command at a time, so at most one write
is unacknowledged when QEMU dies; a slot must hold its last acknowledged seq or a later one.

Used by ``tests/e2e/test_sync_campaign_qemu.py`` (a few trials in the normal suite) and
``bench/sync_crash_campaign.py --qemu`` (30+ trials by hand).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from drsite.client.api import VaultClient
from drsite.core.errors import DrsiteError
from drsite.core.model import DiskSpec, Nic, PowerState, VmSpec
from drsite.fsutil import read_record
from drsite.hypervisors.qemu.driver import QemuHypervisor, _vm_lock
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.up import Cluster, down, start_agent, up
from tests.crash_campaign import protect_vm
from tests.procs import campaign_protection, item_in_sync, kill9, until
from tests.sync_campaign import BLOCK, SLOTS, Trial, block, parse

MiB = 1 << 20


class QemuWriter:
    """The workload outside the VM (see module doc): one thread, random slots."""

    def __init__(self, hv: QemuHypervisor, vm_id: str, seed: int) -> None:
        self.paths = VmDir(hv.vm_dir(vm_id))
        self.rng = random.Random(seed)
        self.acked: list[dict[int, int]] = [{}]
        self.count = 0
        self._seq = 0
        self._stop = threading.Event()
        self._dir = tempfile.TemporaryDirectory(prefix="drsite-qw-")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._dir.cleanup()

    def write_once(self) -> bool:
        """One stamped block to a random slot; True once the guest's write completed."""
        self._seq += 1
        slot = self.rng.randrange(SLOTS)
        src = Path(self._dir.name) / "block"
        src.write_bytes(block(0, self._seq))
        try:
            with _vm_lock(self.paths), \
                    QmpClient.connect(str(self.paths.qmp_socket), timeout=30) as q:
                out = q.execute("human-monitor-command", {
                    "command-line": f'qemu-io -d vd0/virtio-backend '
                                    f'"write -s {src} {slot * BLOCK} {BLOCK}"'}, timeout=30)
        except (DrsiteError, OSError):
            return False   # QEMU is gone: this write was not acknowledged
        if "error" in str(out).lower() or "failed" in str(out).lower():
            return False   # qemu-io prints its errors in the answer (its progress to stdout)
        self.acked[0][slot] = self._seq   # acknowledged: recorded outside the VM
        self.count += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set() and self.write_once():
            pass


class QemuSyncCampaign:
    """One deployment (vault + two QEMU agents as processes), a fresh VM per trial."""

    def __init__(self, root: Path, *, seed: int = 1, budget_ms: int = 2000,
                 frequency_s: float = 5.0) -> None:
        self.rng = random.Random(seed)
        self.c: Cluster = up(root, hypervisor="qemu")
        self.prim = QemuHypervisor(self.c.root / "primary" / "vms", agent_timeout=0.5)
        self.sec = QemuHypervisor(self.c.root / "secondary" / "vms", agent_timeout=0.5)
        self.trials: list[Trial] = []
        with self.client() as cl:
            campaign_protection(cl, "sync", frequency_s, mode="sync", sync_budget_ms=budget_ms)

    def client(self) -> VaultClient:
        return self.c.client()

    def close(self) -> None:
        try:
            down(self.c)
        finally:
            for h in (self.prim, self.sec):
                for vm in h.list_vms():
                    h.kill(vm.vm_id)
                    h.delete_vm(vm.vm_id)
                h.close()

    def _vm(self, n: int) -> tuple[str, str]:
        name = f"q{n:03d}"
        vm = self.prim.create_blank(VmSpec(
            name=name, nics=(Nic("prod", f"52:54:00:21:00:{n % 256:02x}", None),),
            disks=(DiskSpec("d0", 8 * MiB),)), guest_agent=False)
        self.prim.power_on(vm.vm_id)
        return vm.vm_id, name

    def _in_sync(self, vm_id: str, item: str) -> bool:
        return self._in_sync_on(self.prim, vm_id, item)

    def _in_sync_on(self, hv: QemuHypervisor, vm_id: str, item: str) -> bool:
        with self.client() as cl:
            return item_in_sync(hv, cl, vm_id, item)

    def trial(self, kill_window_s: float = 3.0) -> Trial:
        t = Trial(len(self.trials) + 1, round(self.rng.uniform(0.3, kill_window_s), 2))
        try:
            self._trial(t)
        except Exception as e:  # a broken trial is a finding, not a crash of the campaign
            t.problems.append(f"{type(e).__name__}: {e}")
        t.ok = not t.problems
        self.trials.append(t)
        return t

    def _trial(self, t: Trial) -> None:
        vm_id, name = self._vm(t.n)
        with self.client() as cl:
            item = protect_vm(cl, vm_id, "g")
        if not until(lambda: self._in_sync(vm_id, item), 90, poll=0.5):
            t.problems.append(f"never in sync: {self.prim.sync_status(vm_id)}")
            return
        w = QemuWriter(self.prim, vm_id, t.n)
        w.start()
        time.sleep(t.kill_after_s)
        runner = read_record(VmDir(self.prim.vm_dir(vm_id)).runner) or {}
        kill9(int(runner["pid"]) if runner.get("pid") else None)  # the whole primary, at once
        kill9(self.c.pids.get("agent-primary"))
        w.stop()
        t.acked_writes = w.count
        t0 = time.monotonic()
        with self.client() as cl:
            job = cl.wait_job(cl.item_action(item, "unplanned-failover")["id"], timeout=180)
            if job["state"] != "succeeded":
                t.problems.append(f"unplanned failover {job['state']}: {job.get('error')}")
                return
            fo = cl.failovers(item)[0]
        t.failover_s = round(time.monotonic() - t0, 2)
        t.replayed = "; ".join(n for n in fo.get("notes") or [] if "sync overlay" in n)
        rec = until(lambda: next((v for v in self.sec.list_vms() if v.name == name), None), 30)
        if rec is None:
            t.problems.append("no recovery VM after the failover")
            return
        self._check(t, w, rec.vm_id)
        if rec.power is PowerState.RUNNING:
            self.sec.kill(rec.vm_id)
        start_agent(self.c, "primary", store=True)   # for the next trial

    def _check(self, t: Trial, w: QemuWriter, vm_id: str) -> None:
        r = self.sec.open_live_reader(vm_id, "d0")
        try:
            buf = bytearray(SLOTS * BLOCK)
            r.readinto(0, memoryview(buf))
        finally:
            r.close()
        lost = []
        for slot, seq in w.acked[0].items():
            t.slots_checked += 1
            got = parse(bytes(buf[slot * BLOCK:(slot + 1) * BLOCK]))
            if got is None or got[1] < seq:
                lost.append((slot, seq, got))
        if lost:
            t.problems.append(f"{len(lost)} acknowledged write(s) missing on the recovery "
                              f"disk, e.g. slot/acked seq/found {lost[:3]} ({t.replayed})")

    def fallback(self, budget_ms: int) -> dict[str, Any]:
        """Stop the recovery site's overlay daemon of a VM in sync with SIGSTOP (a hung peer:
        no RST): a guest write completes after about the budget, the item says ``sync mode
        suspended`` and the vault raises the ``sync_suspended`` alert; the daemon back, the
        agent provisions a new overlay, the next cycle begins a run on it, the item is in
        sync after that cycle's point and the alert clears. Returns what was measured;
        raises AssertionError otherwise."""
        with self.client() as cl:
            cl.update_policy("sync", {**{k: v for k, v in cl.policy("sync").items()
                                         if k not in ("name", "created_at", "updated_at")},
                                      "sync_budget_ms": budget_ms})
        vm_id, name = self._vm(200 + len(self.trials))
        with self.client() as cl:
            item = protect_vm(cl, vm_id, "g")
        assert until(lambda: self._in_sync(vm_id, item), 90, poll=0.5), \
            self.prim.sync_status(vm_id)
        before = (self.prim.sync_status(vm_id) or {})["stream"]
        found = list((self.c.root / "secondary").rglob(f"sync-overlays/{item}/daemon.json"))
        daemon = read_record(found[0]) if found else None
        assert daemon is not None, "no overlay daemon for the item"
        w = QemuWriter(self.prim, vm_id, 1)
        os.kill(int(daemon["pid"]), signal.SIGSTOP)
        try:
            lat = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                w0 = time.monotonic()
                w.write_once()
                lat.append(time.monotonic() - w0)
            st = self.prim.sync_status(vm_id)
            assert st is not None and st["state"] == "suspended", st
            with self.client() as cl:
                alert = until(lambda: [a for a in cl.alerts(state="active",
                                                            kind="sync_suspended")
                                       if a["subject"] == name], 60, poll=0.5)
            assert alert, "no sync_suspended alert"
        finally:
            os.kill(int(daemon["pid"]), signal.SIGCONT)
        t_back = time.monotonic()
        back = until(lambda: self._in_sync(vm_id, item)
                     and (self.prim.sync_status(vm_id) or {}).get("stream") != before, 120,
                     poll=0.5)
        assert back, f"not back in sync: {self.prim.sync_status(vm_id)}"
        took = time.monotonic() - t_back
        with self.client() as cl:
            cleared = until(lambda: not [a for a in cl.alerts(state="active",
                                                                kind="sync_suspended")
                                          if a["subject"] == name], 60, poll=0.5)
        assert cleared, "the sync_suspended alert did not clear"
        return {"writes": len(lat), "max_write_s": round(max(lat), 3),
                "first_write_s": round(lat[0], 3), "alert": alert[0]["message"],
                "back_in_sync_s": round(took, 1)}

    def summary(self) -> dict[str, Any]:
        return {"trials": len(self.trials), "ok": sum(t.ok for t in self.trials),
                "acked_writes": sum(t.acked_writes for t in self.trials),
                "slots_checked": sum(t.slots_checked for t in self.trials),
                "failed": [t.__dict__ for t in self.trials if not t.ok]}
