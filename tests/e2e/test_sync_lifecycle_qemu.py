"""The life cycle of a synchronous QEMU VM's overlays on the recovery site, on a real
deployment (vault + two QEMU agents as processes; skips without QEMU unless
DRSITE_TEST_QEMU=1): unprotecting the item stops its overlay daemon and removes its files,
and the vault's audit trail says so (``sitestore/syncoverlay.py`` ``drop``,
``agent/storeservice.py`` ``drop_overlays``); a synchronous item failed over, re-protected, in
sync again and failed back. The rotation's crash points: ``test_sync_rotation_qemu.py``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.crash_campaign import protect_vm
from tests.integration.test_qemu_driver import require_qemu
from tests.procs import kill9, until
from tests.sync_campaign_qemu import QemuSyncCampaign, QemuWriter

from drsite.core.model import PowerState
from drsite.fsutil import read_record
from drsite.hypervisors.qemu.driver import QemuHypervisor
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.runner import process_token
from drsite.up import start_agent

pytestmark = pytest.mark.slow


def overlay_dirs(camp: QemuSyncCampaign, item: str) -> list[Path]:
    return [p for p in (camp.c.root / "secondary").rglob("sync-overlays/*") if p.name == item]


def test_unprotect_stops_the_overlay_daemon_and_removes_its_files(tmp_path: Path) -> None:
    require_qemu()
    camp = QemuSyncCampaign(tmp_path / "c", seed=7)
    try:
        vm_id, _name = camp._vm(1)
        with camp.client() as cl:
            item = protect_vm(cl, vm_id, "g")
        assert until(lambda: camp._in_sync(vm_id, item), 90, poll=0.5), \
            camp.prim.sync_status(vm_id)
        [d] = overlay_dirs(camp, item)
        daemon = read_record(d / "daemon.json")
        assert daemon is not None and process_token(int(daemon["pid"])) == daemon["token"]
        with camp.client() as cl:
            job = cl.wait_job(cl.unprotect(item)["job_id"], timeout=120)
            assert job["state"] == "succeeded", job
        # the store agent's hydration loop sees the item leave the book's keep list
        assert until(lambda: not overlay_dirs(camp, item), 60, poll=0.5), overlay_dirs(camp, item)
        assert process_token(int(daemon["pid"])) != daemon["token"], "the daemon still runs"
        assert camp.prim.sync_status(vm_id) is None   # the primary left synchronous mode
        with camp.client() as cl:
            audited = until(lambda: [e for e in cl.audit(limit=200)["entries"]
                                     if e["action"] == "store.delete"
                                     and f"sync-overlays/{item}" in e["target"]], 60, poll=1)
        assert audited and audited[0]["outcome"] == "ok", audited
    finally:
        camp.close()


def _lost(h: QemuHypervisor, vm_id: str, acked: dict[int, int]) -> list[tuple[int, int, object]]:
    """Slots of ``acked`` (slot → seq) whose block on the VM's disk is older or missing."""
    from tests.sync_campaign import BLOCK, SLOTS, parse
    r = h.open_live_reader(vm_id, "d0")
    try:
        buf = bytearray(SLOTS * BLOCK)
        r.readinto(0, memoryview(buf))
    finally:
        r.close()
    out = []
    for slot, seq in acked.items():
        got = parse(bytes(buf[slot * BLOCK:(slot + 1) * BLOCK]))
        if got is None or got[1] < seq:
            out.append((slot, seq, got))
    return out


def test_sync_item_failover_reprotect_in_sync_again_and_failback(tmp_path: Path) -> None:
    """A QEMU VM in synchronous mode: the whole primary dies, unplanned failover to latest
    (every acknowledged write there), commit, re-protect — the overlay direction reverses:
    the recovery VM mirrors into an overlay on the old primary's store —, in sync again, the
    guest writes, failback (planned failover of the reverse item): every acknowledged write
    of both phases on the failed-back VM, whose disk equals the recovery VM's."""
    require_qemu()
    from tests.e2e.test_qemu_cluster import disk_digests
    camp = QemuSyncCampaign(tmp_path / "c", seed=13)
    c = camp.c
    try:
        vm_id, name = camp._vm(1)
        with camp.client() as cl:
            item = protect_vm(cl, vm_id, "g")
        assert until(lambda: camp._in_sync(vm_id, item), 90, poll=0.5), \
            camp.prim.sync_status(vm_id)
        w = QemuWriter(camp.prim, vm_id, 1)
        w.start()
        time.sleep(2.0)
        runner = read_record(VmDir(camp.prim.vm_dir(vm_id)).runner) or {}
        kill9(int(runner["pid"]) if runner.get("pid") else None)
        kill9(c.pids.get("agent-primary"))
        w.stop()
        assert w.count > 0
        with camp.client() as cl:
            job = cl.wait_job(cl.item_action(item, "unplanned-failover")["id"], timeout=180)
            assert job["state"] == "succeeded", job
            fo = cl.failovers(item)[0]
            assert any("sync overlay applied" in x for x in fo.get("notes") or []), fo
        rec = until(lambda: next((v for v in camp.sec.list_vms() if v.name == name), None), 30)
        assert rec is not None
        assert _lost(camp.sec, rec.vm_id, w.acked[0]) == []
        if rec.power is not PowerState.RUNNING:
            camp.sec.power_on(rec.vm_id)
        start_agent(c, "primary", store=True)   # the old primary's site comes back
        with camp.client() as cl:
            cl.set_network_mapping({"source_site": "secondary", "recovery_site": "primary",
                                    "source_network": "dr", "recovery_network": "prod",
                                    "test_network": "prod-test", "ip_rule": {"kind": "keep"}})
            job = cl.wait_job(cl.item_action(item, "commit")["id"], timeout=180)
            assert job["state"] == "succeeded", job
            fo = cl.failover(fo["id"])
            rp = (fo.get("result") or {}).get("reprotect")
            if rp is None:
                job = cl.wait_job(cl.item_action(item, "reprotect")["id"], timeout=300)
                assert job["state"] == "succeeded", job
                rp = (cl.failover(fo["id"]).get("result") or {}).get("reprotect")
            assert rp is not None, fo
            rev = str(rp["item_id"])
        # the reverse item mirrors into an overlay on the old primary's site
        assert until(lambda: camp._in_sync_on(camp.sec, rec.vm_id, rev), 120, poll=0.5), \
            camp.sec.sync_status(rec.vm_id)
        prim_overlays = [p for p in (c.root / "primary").rglob("sync-overlays/*")
                         if p.name == rev]
        assert prim_overlays, "no overlay of the reverse item on the old primary's site"
        # the forward item's sync state ended on the recovery site: its overlays went
        assert until(lambda: not overlay_dirs(camp, item), 60, poll=0.5), overlay_dirs(camp, item)
        w2 = QemuWriter(camp.sec, rec.vm_id, 2)
        w2._seq = w._seq + 1_000_000   # stamps newer than every first-phase one
        w2.start()
        time.sleep(2.0)
        w2.stop()
        assert w2.count > 0
        with camp.client() as cl:
            job = cl.wait_job(cl.item_action(rev, "planned-failover")["id"], timeout=300)
            assert job["state"] == "succeeded", job
        back = until(lambda: next((v for v in camp.prim.list_vms()
                                   if v.name == name and v.vm_id != vm_id), None), 30)
        assert back is not None, [v.name for v in camp.prim.list_vms()]
        acked = dict(w.acked[0])
        for slot, seq in w2.acked[0].items():
            acked[slot] = max(seq, acked.get(slot, 0))
        assert _lost(camp.prim, back.vm_id, acked) == []
        assert disk_digests(camp.sec, rec.vm_id) == disk_digests(camp.prim, back.vm_id)
    finally:
        camp.close()
