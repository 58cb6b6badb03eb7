"""The life cycle of a synchronous QEMU VM's overlays on the recovery site, on a real
deployment (vault + two QEMU agents as processes; skips without QEMU unless
DRSITE_TEST_QEMU=1): unprotecting the item stops its overlay daemon and removes its files,
and the vault's audit trail says so (``sitestore/syncoverlay.py`` ``drop``,
``agent/storeservice.py`` ``drop_overlays``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.crash_campaign import protect_vm
from tests.integration.test_qemu_driver import require_qemu
from tests.procs import until
from tests.sync_campaign_qemu import QemuSyncCampaign

from drsite.fsutil import read_record
from drsite.hypervisors.qemu.runner import process_token

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
