"""A synchronous QEMU VM's overlay rotation on a real deployment (vault + two QEMU agents as
processes; skips without QEMU unless DRSITE_TEST_QEMU=1): the recovery agent killed between any
two steps of a rotation (``sitestore/syncoverlay.py`` ``rotate``/``retire``), a failover to
latest still holds every write the guest acknowledged. Its own module so that it runs beside
the other life-cycle tests (``test_sync_lifecycle_qemu.py``), not after them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from tests.crash_campaign import protect_vm
from tests.e2e.test_sync_lifecycle_qemu import overlay_dirs
from tests.integration.test_qemu_driver import require_qemu
from tests.procs import kill9, until
from tests.sync_campaign import Trial
from tests.sync_campaign_qemu import QemuSyncCampaign, QemuWriter

from drsite.core.model import PowerState
from drsite.fsutil import read_record
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.runner import process_token
from drsite.up import start_agent

pytestmark = pytest.mark.slow

ROTATE = ("--sync-overlay-rotate-mib", "1")


def _dead(pid: int | None) -> bool:
    return pid is None or process_token(pid) is None


def _crash_trial(camp: QemuSyncCampaign, n: int, failpoint: str) -> tuple[Trial, list[int]]:
    """The recovery agent (1 MiB rotation threshold) is killed at ``failpoint`` while a
    guest writes; restarted without it, the writes go on; then the whole primary dies and an
    unplanned failover to latest runs. Returns the trial and the run's layers before the
    failover."""
    c = camp.c
    t = Trial(n, 0.0)
    kill9(c.pids.get("agent-secondary"))
    start_agent(c, "secondary", store=True, env={"DRSITE_FAILPOINTS": f"{failpoint}=kill"},
                extra_args=ROTATE)
    vm_id, name = camp._vm(n)
    with camp.client() as cl:
        item = protect_vm(cl, vm_id, "g")
    assert until(lambda: camp._in_sync(vm_id, item), 90, poll=0.5), camp.prim.sync_status(vm_id)
    w = QemuWriter(camp.prim, vm_id, n)
    w.start()
    try:
        assert until(lambda: _dead(c.pids.get("agent-secondary")), 180, poll=0.5), \
            f"the recovery agent never reached {failpoint}"
        start_agent(c, "secondary", store=True, extra_args=ROTATE)
        time.sleep(3.0)   # acknowledged writes go on into the surviving overlay daemon
        [d] = overlay_dirs(camp, item)
        [run] = [read_record(p) or {} for p in d.glob("*/run.json")]
        layers = [int(x) for x in run.get("layers") or [0]]
        runner = read_record(VmDir(camp.prim.vm_dir(vm_id)).runner) or {}
        kill9(int(runner["pid"]) if runner.get("pid") else None)
        kill9(c.pids.get("agent-primary"))
    finally:
        w.stop()
    t.acked_writes = w.count
    with camp.client() as cl:
        job = cl.wait_job(cl.item_action(item, "unplanned-failover")["id"], timeout=180)
        assert job["state"] == "succeeded", job
        fo = cl.failovers(item)[0]
    t.replayed = "; ".join(x for x in fo.get("notes") or [] if "sync overlay" in x)
    rec = until(lambda: next((v for v in camp.sec.list_vms() if v.name == name), None), 30)
    assert rec is not None, "no recovery VM after the failover"
    camp._check(t, w, rec.vm_id)
    if rec.power is PowerState.RUNNING:
        camp.sec.kill(rec.vm_id)
    start_agent(c, "primary", store=True)   # for the next trial
    return t, layers


@pytest.mark.timeout(900)  # four trials of a QEMU deployment: 122 s in CI, 228 s under load
def test_failover_after_the_recovery_agent_died_inside_a_rotation(tmp_path: Path) -> None:
    """Each crash point of a rotation: after the new layer is listed, after the switch,
    after the older layers' nodes went, after ``run.json`` stopped listing them. Every
    acknowledged write is on the recovery VM's disk; the overlay was applied."""
    require_qemu()
    camp = QemuSyncCampaign(tmp_path / "c", seed=11)
    try:
        for n, fp in enumerate(("overlay.rotate-listed", "overlay.rotate-switched",
                                "overlay.retire-detached", "overlay.retire-forgotten"), 1):
            t, layers = _crash_trial(camp, n, fp)
            print(fp, layers, json.dumps(t.__dict__))
            assert not t.problems, (fp, t.problems)
            assert t.acked_writes > 0 and t.slots_checked > 0
            assert "sync overlay applied" in t.replayed, (fp, t.replayed)
            if fp.startswith("overlay.rotate"):
                assert layers[-1] >= 1, layers   # the new layer is listed
    finally:
        camp.close()
