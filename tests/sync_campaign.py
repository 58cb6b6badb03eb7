"""Zero data loss of synchronous mode (issue 18 part 2) on a real deployment: a workload
outside the VM records every write the guest acknowledged, the whole primary (guest process
and primary agent) is killed with SIGKILL at a random moment, an unplanned failover to
"latest" runs through the vault — or, ``breakglass``, the vault is killed too and the
recovery site's agent host runs it alone (``drsite agent failover``) — and every acknowledged
write must be on the recovery VM's disk.

The workload: ``writers`` threads of this process write 4 KiB blocks through the guest's
control socket (``write``: acknowledged only after the VM's ``write_many`` returned, i.e.
after the recovery site's journal holds it). Thread ``k`` owns the slots ``k, k+W, …`` so
the last acknowledged write of a slot is well defined; each block is stamped
``(MAGIC, thread, seq)`` with ``seq`` repeated at its end. After the failover, each slot that
had an acknowledged write must hold a write of its owner with ``seq >=`` the last
acknowledged one (a later, unacknowledged write may have reached the journal too).

Used by ``tests/e2e/test_sync_campaign.py`` (a few trials in the normal suite) and
``bench/sync_crash_campaign.py`` (30+ trials by hand).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from drsite.client.api import VaultClient
from drsite.core.errors import DrsiteError
from drsite.core.model import DiskSpec, Nic, PowerState, VmSpec
from drsite.hypervisors.file.control import call as guest_call
from drsite.hypervisors.file.control import encode_data
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.layout import VmPaths
from drsite.up import Cluster, down, start_agent, start_vault, up
from tests.crash_campaign import protect_vm
from tests.procs import campaign_protection, item_in_sync, kill9, until

MiB = 1 << 20
BLOCK = 4096
SLOTS = 1024                    # the first 4 MiB of the disk
DRSITE = str(Path(sys.executable).parent / "drsite")
_STAMP = struct.Struct("<8sQQ")
MAGIC = b"DRSYNCW1"


def block(thread: int, seq: int) -> bytes:
    head = _STAMP.pack(MAGIC, thread, seq)
    return head + bytes(BLOCK - len(head) - 8) + seq.to_bytes(8, "little")


def parse(b: bytes) -> tuple[int, int] | None:
    magic, thread, seq = _STAMP.unpack_from(b, 0)
    if magic != MAGIC or int.from_bytes(b[-8:], "little") != seq:
        return None
    return int(thread), int(seq)


@dataclass
class Trial:
    n: int
    kill_after_s: float
    item: str = ""
    acked_writes: int = 0
    slots_checked: int = 0
    replayed: str = ""
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    failover_s: float | None = None


class Writers:
    """The workload outside the VM: ``n`` threads, each its own slots (see module doc)."""

    def __init__(self, socket_address: str, n: int) -> None:
        self.address = socket_address
        self.n = n
        self.acked: list[dict[int, int]] = [{} for _ in range(n)]
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(n)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _run(self, k: int) -> None:
        rng = random.Random(k)
        mine = list(range(k, SLOTS, self.n))
        seq = 0
        while not self._stop.is_set():
            seq += 1
            slot = rng.choice(mine)
            try:
                guest_call(self.address, "write", timeout=30.0, disk_id="d0",
                           offset=slot * BLOCK, data=encode_data(block(k, seq)), tag=seq)
            except DrsiteError:
                return  # the guest is gone: this write was not acknowledged
            self.acked[k][slot] = seq  # acknowledged: recorded outside the VM
            with self._lock:
                self.count += 1


class SyncCampaign:
    """One deployment (vault + two agents as processes), a fresh VM per trial."""

    def __init__(self, root: Path, *, seed: int = 1, budget_ms: int = 2000,
                 writers: int = 4, frequency_s: float = 5.0) -> None:
        self.rng = random.Random(seed)
        self.writers = writers
        self.c: Cluster = up(root)
        self.prim = FileHypervisor(self.c.root / "primary" / "vms")
        self.sec = FileHypervisor(self.c.root / "secondary" / "vms")
        self.trials: list[Trial] = []
        self._fallbacks = 0
        with self.client() as cl:
            campaign_protection(cl, "sync", frequency_s, mode="sync", sync_budget_ms=budget_ms)

    def client(self) -> VaultClient:
        return self.c.client()

    def close(self) -> None:
        down(self.c)
        for h in (self.prim, self.sec):
            for vm in h.list_vms():
                h.power_off(vm.vm_id, force=True)

    def _vm(self, n: int) -> tuple[str, str]:
        name = f"s{n:03d}"
        vm = self.prim.create_blank(VmSpec(
            name=name, nics=(Nic("prod", f"52:54:00:20:00:{n % 256:02x}", None),),
            disks=(DiskSpec("d0", 8 * MiB),)))
        self.prim.power_on(vm.vm_id)
        return vm.vm_id, name

    def _protect(self, vm_id: str) -> str:
        with self.client() as cl:
            return protect_vm(cl, vm_id, "g")

    def _in_sync(self, vm_id: str, item: str) -> bool:
        with self.client() as cl:
            return item_in_sync(self.prim, cl, vm_id, item)

    def trial(self, kill_window_s: float = 3.0, *, breakglass: bool = False) -> Trial:
        """One trial; ``breakglass``: the vault is killed with the primary and the recovery
        site's agent host fails the item over alone (then the vault is started again)."""
        t = Trial(len(self.trials) + 1, round(self.rng.uniform(0.3, kill_window_s), 2))
        try:
            self._trial(t, breakglass)
        except Exception as e:  # a broken trial is a finding, not a crash of the campaign
            t.problems.append(f"{type(e).__name__}: {e}")
        t.ok = not t.problems
        self.trials.append(t)
        return t

    def vm_in_sync(self, n: int) -> tuple[str, str, str]:
        """A new VM, protected and in sync: (VM id, name, item); AssertionError otherwise."""
        vm_id, name = self._vm(n)
        item = self._protect(vm_id)
        assert until(lambda: self._in_sync(vm_id, item), 60), self.prim.sync_status(vm_id)
        return vm_id, name, item

    def journal_dir(self, item: str) -> Path:
        """The item's sync journal on the recovery site's agent host."""
        return self._agent_data() / "sync-journals" / item

    def _trial(self, t: Trial, breakglass: bool) -> None:
        vm_id, name = self._vm(t.n)
        item = t.item = self._protect(vm_id)
        if not until(lambda: self._in_sync(vm_id, item), 60):
            t.problems.append(f"never in sync: {self.prim.sync_status(vm_id)}")
            return
        if breakglass and not until(lambda: self._in_book(item), 30):
            t.problems.append("the recovery book never named the item")
            return
        w = Writers(VmPaths(self.prim.vm_dir(vm_id)).socket_address(), self.writers)
        w.start()
        time.sleep(t.kill_after_s)
        guest_pid = _guest_pid(self.prim, vm_id)
        agent_pid = self.c.pids.get("agent-primary")
        kill9(guest_pid)   # the whole primary, as close to one instant as two signals go
        kill9(agent_pid)
        if breakglass:
            kill9(self.c.pids.get("vault"))
        w.stop()
        t.acked_writes = w.count
        t0 = time.monotonic()
        fo = self._breakglass(t, item) if breakglass else self._vault_failover(t, item)
        if fo is None:
            return
        t.failover_s = round(time.monotonic() - t0, 2)
        t.replayed = "; ".join(n for n in fo.get("notes") or [] if "sync journal" in n)
        rec = until(lambda: next((v for v in self.sec.list_vms() if v.name == name
                                   and v.power is PowerState.RUNNING), None), 20)
        if rec is None:
            t.problems.append("no recovery VM runs after the failover")
            return
        self._check(t, w, self.sec.disk_path(rec.vm_id, "d0"))
        if breakglass:  # the vault again; it learns the failover from the agent's heartbeat
            start_vault(self.c)
            with self.client() as cl:
                if not until(lambda: cl.item(item)["protection"] == "failed_over", 30):
                    t.problems.append("the vault did not record the break-glass failover")
        # the primary agent again, for the next trial (its old item is failed over)
        start_agent(self.c, "primary", store=True)

    def _vault_failover(self, t: Trial, item: str) -> dict[str, Any] | None:
        with self.client() as cl:
            job = cl.wait_job(cl.item_action(item, "unplanned-failover")["id"], timeout=120)
            if job["state"] != "succeeded":
                t.problems.append(f"unplanned failover {job['state']}: {job.get('error')}")
                return None
            return dict(cl.failovers(item)[0])

    def _agent_data(self) -> Path:
        return self.c.root / "secondary" / "agent"

    def _in_book(self, item: str) -> bool:
        try:
            book = json.loads((self._agent_data() / "recovery-book.json").read_text())
        except (OSError, ValueError):
            return False
        return item in book.get("items", {})

    def _breakglass(self, t: Trial, item: str) -> dict[str, Any] | None:
        """``drsite agent failover ITEM`` on the recovery site's agent host: its record."""
        p = subprocess.run([DRSITE, "agent", "failover", item, "--json",
                            "--data", str(self._agent_data())],
                           capture_output=True, text=True, timeout=180)
        if p.returncode != 0:
            t.problems.append(f"break-glass failover exited {p.returncode}: {p.stderr.strip()}")
            return None
        rec = dict(json.loads(p.stdout))
        if rec.get("state") != "pending_commit":
            t.problems.append(f"break-glass failover ended {rec.get('state')}")
            return None
        return rec

    def _check(self, t: Trial, w: Writers, disk: Path) -> None:
        with open(disk, "rb") as f:
            data = f.read(SLOTS * BLOCK)
        lost = []
        for k, acked in enumerate(w.acked):
            for slot, seq in acked.items():
                t.slots_checked += 1
                got = parse(data[slot * BLOCK:(slot + 1) * BLOCK])
                if got is None or got[0] != k or got[1] < seq:
                    lost.append((slot, seq, got))
        if lost:
            t.problems.append(f"{len(lost)} acknowledged write(s) missing on the recovery "
                              f"disk, e.g. slot/acked seq/found {lost[:3]} ({t.replayed})")

    def fallback(self, budget_ms: int, *, blackhole: bool = False) -> dict[str, Any]:
        """Kill the recovery agent (or, ``blackhole``, stop it with SIGSTOP: a hung peer, no
        RST): the guest's writes go on after at most the budget, the vault raises the
        ``sync_suspended`` alert; the agent back, sync returns after the next cycle's point
        and the alert clears. Returns what was measured; raises AssertionError otherwise."""
        with self.client() as cl:
            cl.update_policy("sync", {**{k: v for k, v in cl.policy("sync").items()
                                         if k not in ("name", "created_at", "updated_at")},
                                      "sync_budget_ms": budget_ms})
        self._fallbacks += 1
        vm_id, name = self._vm(200 + self._fallbacks)
        item = self._protect(vm_id)
        assert until(lambda: self._in_sync(vm_id, item), 60), self.prim.sync_status(vm_id)
        address = VmPaths(self.prim.vm_dir(vm_id)).socket_address()
        pid = self.c.pids["agent-secondary"]
        if blackhole:
            os.kill(pid, signal.SIGSTOP)
        else:
            kill9(pid)
        t0 = time.monotonic()
        lat: list[float] = []
        while time.monotonic() - t0 < 2.0:
            w0 = time.monotonic()
            guest_call(address, "write", timeout=30.0, disk_id="d0", offset=0,
                       data=encode_data(block(0, len(lat) + 1)))
            lat.append(time.monotonic() - w0)
        st = self.prim.sync_status(vm_id)
        assert st is not None and st["state"] == "suspended", st
        with self.client() as cl:
            alert = until(lambda: [a for a in cl.alerts(state="active", kind="sync_suspended")
                                    if a["subject"] == name], 30)
        assert alert, "no sync_suspended alert"
        t_back = time.monotonic()
        if blackhole:
            os.kill(pid, signal.SIGCONT)
        else:
            start_agent(self.c, "secondary", store=True)
        back = until(lambda: self._in_sync(vm_id, item), 90, poll=0.5)
        assert back, f"not back in sync: {self.prim.sync_status(vm_id)}"
        took = time.monotonic() - t_back
        with self.client() as cl:
            cleared = until(lambda: not [a for a in cl.alerts(state="active",
                                                                kind="sync_suspended")
                                          if a["subject"] == name], 30)
        assert cleared, "the sync_suspended alert did not clear"
        return {"writes": len(lat), "max_write_s": max(lat), "first_write_s": lat[0],
                "alert": alert[0]["message"], "back_in_sync_s": round(took, 1)}

    def summary(self) -> dict[str, Any]:
        return {"trials": len(self.trials), "ok": sum(t.ok for t in self.trials),
                "acked_writes": sum(t.acked_writes for t in self.trials),
                "slots_checked": sum(t.slots_checked for t in self.trials),
                "failed": [asdict(t) for t in self.trials if not t.ok]}


def _guest_pid(hv: FileHypervisor, vm_id: str) -> int | None:
    try:
        return int((hv.vm_dir(vm_id) / "guest.pid").read_text().strip())
    except (OSError, ValueError):
        return None
