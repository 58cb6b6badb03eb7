"""Failover of a QEMU VM with real processes: a vault and two agents (``drsite up``), both
agents with ``--hypervisor qemu``, on 127.0.0.1 (skips without QEMU unless DRSITE_TEST_QEMU=1).

A QEMU VM (two disks, a NIC) is protected through the vault; the guest writes through its
virtio-blk devices between cycles; a test failover runs a copy-on-write QEMU VM equal to its
point and is cleaned up; a planned failover through the API starts a recovery QEMU
VM on the secondary whose disks equal the stopped source's (read through each site's QEMU
block layer, by digest: never the qcow2 files); commit re-protects at once and only
differences travel back; a guest write on the recovery VM (raw images moved in) ships as a
reverse delta point equal to its disks; failback re-creates the original VM, equal again.
A drill of a QEMU VM boots its test VM, probes it through QEMU and reports RPO and RTO.
Two running QEMU guests in a consistent group get group points (the barrier holds them)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.e2e.test_failover_cluster import protect, run, setup, until
from tests.integration.test_qemu_driver import require_qemu
from tests.integration.test_qemu_hold import booted_writer, guest_writes

from drsite.core.model import DiskSpec, Nic, PowerState, VmSpec
from drsite.hypervisors.qemu.driver import QemuHypervisor, _vm_lock
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.store.digest import image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from drsite.up import Cluster, down, up

pytestmark = pytest.mark.slow
MiB = 1 << 20
KiB = 1 << 10
DISK = 32 * MiB


def hv(c: Cluster, site: str) -> QemuHypervisor:
    return QemuHypervisor(c.root / site / "vms", agent_timeout=0.5)


def stop_all_qemu(c: Cluster) -> None:
    """Every QEMU process of both sites: VMs powered off with force, then any runner left
    (a storage daemon) killed, then the VMs deleted."""
    for site in ("primary", "secondary"):
        if not (c.root / site / "vms").is_dir():
            continue
        h = hv(c, site)
        try:
            for vm in h.list_vms():
                try:
                    h.power_off(vm.vm_id, force=True, timeout=5.0)
                finally:
                    h.kill(vm.vm_id)
                    h.delete_vm(vm.vm_id)  # and its socket directory under $TMPDIR
        finally:
            h.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    require_qemu()
    c = up(tmp_path / "c", hypervisor="qemu")
    try:
        yield c
    finally:
        try:
            down(c)
        finally:
            stop_all_qemu(c)


def guest_write(h: QemuHypervisor, vm_id: str, dev: int, off: int, n: int, pattern: int) -> None:
    """A write by the guest's virtio-blk device (HMP qemu-io on the device's BlockBackend),
    under the VM's lock: the agent's QMP sessions and this one take turns."""
    paths = VmDir(h.vm_dir(vm_id))
    with _vm_lock(paths), QmpClient.connect(str(paths.qmp_socket)) as q:
        out = q.execute("human-monitor-command", {
            "command-line": f'qemu-io -d vd{dev}/virtio-backend "write -P {pattern} {off} {n}"'})
    assert "error" not in str(out).lower() and "failed" not in str(out).lower(), out


def disk_digests(h: QemuHypervisor, vm_id: str) -> dict[str, str]:
    """Digest of every disk, read through QEMU (an NBD export of the disk's live node)."""
    out: dict[str, str] = {}
    for d in h.get_vm(vm_id).disks:
        r = h.open_live_reader(vm_id, d.disk_id)
        try:
            out[d.disk_id] = image_digest(r)
        finally:
            r.close()
    return out


def read_at(h: QemuHypervisor, vm_id: str, disk_id: str, off: int, n: int) -> bytes:
    r = h.open_live_reader(vm_id, disk_id)
    try:
        buf = bytearray(n)
        r.readinto(off, memoryview(buf))
        return bytes(buf)
    finally:
        r.close()


def test_qemu_vm_protect_planned_failover_commit(cluster: Cluster) -> None:
    prim, sec = hv(cluster, "primary"), hv(cluster, "secondary")
    vm_id = prim.create_blank(VmSpec(
        "app", memory_mib=64, nics=(Nic("prod", "52:54:00:00:00:0a", "10.0.0.5"),),
        disks=(DiskSpec("d0", DISK), DiskSpec("d1", DISK)))).vm_id
    prim.power_on(vm_id)
    rng = np.random.default_rng(11)
    for d in ("d0", "d1"):  # some data: 256 KiB every 4 MiB
        for off in range(0, DISK, 4 * MiB):
            prim.write(vm_id, d, off, rng.integers(0, 256, 256 * KiB, dtype=np.uint8).tobytes())
    prim.flush(vm_id)
    prim.close()  # drop the test's NBD writer: from here on only the guest writes
    with cluster.client() as cl:
        setup(cl)
        item = protect(cl, vm_id)
        n0 = len(cl.points(item["id"]))
        assert n0 >= 1

        # the guest writes between cycles; each batch is shipped as a delta point
        writes = [(0, 5 * MiB + 512, 200 * KiB, 0x5A), (1, 3 * MiB + 1024, 1024, 0x6B),
                  (0, 31 * MiB, 64 * KiB, 0x11), (1, 17 * MiB, 128 * KiB, 0x22)]
        def deltas() -> list[dict[str, Any]]:
            return [p for p in cl.points(item["id"])
                    if p["kind"] == "delta" and p["bytes_written"] > 0]

        for i in range(2):
            for dev, off, n, pat in writes[2 * i:2 * i + 2]:
                guest_write(prim, vm_id, dev, off, n, pat)
            until(f"delta point {i + 1}", lambda i=i: len(deltas()) > i, 60)
        pts = cl.points(item["id"])
        assert len(pts) >= n0 + 2, pts

        # test failover: a copy-on-write QEMU VM over the replica's frozen images; cleanup
        run(cl, cl.item_action(item["id"], "test-failover"))
        tfo = cl.failovers(item["id"])[0]
        assert tfo["kind"] == "test" and tfo["state"] == "test_running", tfo
        test_vm = sec.find_vm(tfo["vm_name"])
        assert test_vm.power is PowerState.RUNNING
        assert [(n.network, n.ip) for n in test_vm.nics] == [("dr-test", "10.9.0.5")]
        repo = Repository(LocalObjectStore(cluster.root / "secondary" / "store"), item["id"])
        try:
            assert disk_digests(sec, test_vm.vm_id) == {
                d: image_digest(repo.reader(tfo["point_id"], d)) for d in ("d0", "d1")}
        finally:
            repo.close()
        run(cl, cl.item_action(item["id"], "cleanup-test-failover"))
        assert not any(v.name == tfo["vm_name"] for v in sec.list_vms())

        # planned failover: the source stops, its last writes ship, the replica starts equal
        run(cl, cl.item_action(item["id"], "planned-failover"))
        fo = cl.failovers(item["id"])[0]
        assert fo["kind"] == "planned" and fo["state"] == "pending_commit", fo
        assert prim.get_vm(vm_id).power is PowerState.STOPPED
        rec_vm = sec.find_vm("app")
        assert rec_vm.power is PowerState.RUNNING
        assert sec.runner(rec_vm.vm_id) is not None  # a real QEMU process
        assert [(n.network, n.ip) for n in rec_vm.nics] == [("dr", "10.9.0.5")]
        assert [(d.disk_id, d.size) for d in rec_vm.disks] == [("d0", DISK), ("d1", DISK)]
        src = disk_digests(prim, vm_id)
        assert src == disk_digests(sec, rec_vm.vm_id)  # no write lost
        for dev, off, n, pat in writes:  # and the guest's writes are in it
            assert read_at(sec, rec_vm.vm_id, f"d{dev}", off, n) == bytes([pat]) * n
        assert cl.item(item["id"])["protection"] == "failed_over"

        # commit re-protects at once: the recovery VM replicates back, only differences travel
        run(cl, cl.item_action(item["id"], "commit"), timeout=120)
        fo = cl.failover(fo["id"])
        rp = fo["result"]["reprotect"]
        assert rp["disk_bytes"] == 2 * DISK
        assert rp["bytes_sent"] < rp["disk_bytes"] // 8, rp
        rev = cl.item(rp["item_id"])
        assert rev["protection"] == "protected" and rev["site"] == "secondary"
        assert prim.get_vm(vm_id).power is PowerState.STOPPED  # never on both sites
        assert sec.get_vm(rec_vm.vm_id).power is PowerState.RUNNING
        assert disk_digests(prim, vm_id) == src  # the old primary's disks were only read

        # the recovery VM (raw images moved in, bitmaps in its qcow2) is change-tracked: a
        # guest write there ships as a delta point of the reverse item, equal to its disks
        until("reverse resync point",
              lambda: any(p["kind"] == "resync" for p in cl.points(rev["id"])), 30)
        guest_write(sec, rec_vm.vm_id, 0, 9 * MiB, 64 * KiB, 0x33)
        delta = until("reverse delta point", lambda: next(
            (p for p in cl.points(rev["id"]) if p["kind"] == "delta"), None), 60)
        assert delta["bytes_written"] >= 64 * KiB, delta
        repo = Repository(LocalObjectStore(cluster.root / "primary" / "store"), rev["id"])
        try:  # the guest wrote nothing since: its live disks are the point
            assert disk_digests(sec, rec_vm.vm_id) == {
                d: image_digest(repo.reader(delta["point_id"], d)) for d in ("d0", "d1")}
        finally:
            repo.close()

        # failback: planned failover of the reverse item to the original VM (re-created)
        run(cl, cl.item_action(rev["id"], "planned-failover"))
        back = prim.find_vm("app")
        assert back.vm_id != vm_id and back.power is PowerState.RUNNING
        assert [(n.network, n.ip) for n in back.nics] == [("prod", "10.0.0.5")]
        assert sec.get_vm(rec_vm.vm_id).power is PowerState.STOPPED
        assert disk_digests(sec, rec_vm.vm_id) == disk_digests(prim, back.vm_id)
        assert read_at(prim, back.vm_id, "d0", 9 * MiB, 64 * KiB) == b"\x33" * (64 * KiB)
        print(f"forward points {len(pts)}, RTO {fo.get('rto_s')} s, reprotect {rp}, "
              f"reverse delta {delta['bytes_written']} bytes")


PROBE = '''
import os, sys
from pathlib import Path
from drsite.core.model import PowerState
from drsite.hypervisors.qemu.driver import QemuHypervisor

h = QemuHypervisor(Path(sys.argv[1]), agent_timeout=0.5)
vm_id = os.environ["DRSITE_DRILL_VM_ID"]
try:
    if h.get_vm(vm_id).power is not PowerState.RUNNING or h.runner(vm_id) is None:
        sys.exit("the test VM's QEMU does not run")
    r = h.open_live_reader(vm_id, "d0")  # through the running QEMU's block layer
    try:
        buf = bytearray(4096)
        r.readinto(int(sys.argv[2]), memoryview(buf))
    finally:
        r.close()
    sys.exit(0 if bytes(buf) == b"\\x5a" * 4096 else "the marker is not on the test VM's disk")
finally:
    h.close()
'''


def test_qemu_drill_boots_probes_and_cleans_up(cluster: Cluster, tmp_path: Path) -> None:
    """A drill of a QEMU VM: the test VM (copy-on-write over the point, verified) runs in real
    QEMU, the probe reads the source's marker through the test VM's block layer, the report has
    RPO and RTO, and nothing is left behind. Without a probe the drill fails — this guest has no
    OS, so its qemu-guest-agent never answers — with that reason, an alert, and cleans up."""
    prim, sec = hv(cluster, "primary"), hv(cluster, "secondary")
    vm_id = prim.create_blank(VmSpec(
        "qd", memory_mib=64, nics=(Nic("prod", "52:54:00:00:00:0b", "10.0.0.6"),),
        disks=(DiskSpec("d0", 16 * MiB),))).vm_id
    prim.power_on(vm_id)
    prim.write(vm_id, "d0", MiB, b"\x5a" * 4096)
    prim.flush(vm_id)
    prim.close()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    with cluster.client() as cl:
        setup(cl)
        item = protect(cl, vm_id)
        cl.apply_plans([{"name": "q", "groups": [{"name": "all", "vms": ["qd"]}]}])
        started = cl.run_drill("q", boot_timeout_s=60, probe={
            "script": f"{sys.executable} {probe} {cluster.root / 'secondary' / 'vms'} {MiB}",
            "timeout_s": 30})
        cl.wait_job(started["job_id"], timeout=120)
        d = cl.drill(started["drill_id"])
        assert d["state"] == "passed", d
        (v,) = d["report"]["vms"]
        assert v["verified"] is True and v["probe"]["rc"] == 0, v
        assert v["guest_ready"] is False  # no OS: the guest agent never answered
        assert v["point_id"] in [p["point_id"] for p in cl.points(item["id"])]
        assert v["rpo_s"] is not None and v["rpo_s"] >= 0 and 0 < v["rto_s"] < 60, v
        assert not any(x.name == v["test_vm"] for x in sec.list_vms())

        started = cl.run_drill("q", boot_timeout_s=3)
        job = cl.wait_job(started["job_id"], timeout=120)
        d = cl.drill(started["drill_id"])
        assert job["state"] == "failed" and d["state"] == "failed", d
        (v,) = d["report"]["vms"]
        assert "did not answer" in v["reason"] and "probe script" in v["reason"], v
        until("the drill alert", lambda: [a for a in cl.alerts()
                                          if a["kind"] == "drill" and a["active"]], 15)
        until("the test VM removed", lambda: not any(x.name == v["test_vm"]
                                                     for x in sec.list_vms()), 60)


def test_a_consistent_group_of_qemu_vms_forms_group_points(cluster: Cluster) -> None:
    """Two running QEMU guests (boot sectors that write their disks without pause) in one
    consistent group: the barriers hold them (QMP stop, the seal's transaction, cont), every
    member is held, group points form, and the guests run and write on afterwards."""
    runner = QemuHypervisor(cluster.root / "primary" / "vms", start_cpus=True, agent_timeout=0.5)
    try:
        vms = [booted_writer(runner, f"gw{k}") for k in range(2)]
        with cluster.client() as cl:
            cl.create_policy({"name": "fast", "frequency_s": 5.0, "retention_hours": 24,
                              "app_consistent_every_s": None, "rpo_threshold_s": 120,
                              "resync_window": "00:00-00:00", "compression": True,
                              "encryption": False, "bandwidth_limit_bps": None})
            cl.create_group({"name": "qg", "site": "primary", "target_site": "secondary",
                             "policy": "fast",
                             "match": {"vm_names": [], "hosts": [], "labels": []},
                             "consistent": True, "barrier_timeout_ms": 1000})
            until("inventory", lambda: set(vms) <= {v["vm_id"] for v in cl.vms()})
            items = []
            for vm in vms:
                job = cl.wait_job(cl.protect(vm, "qg")["job_id"], timeout=180)
                assert job["state"] == "succeeded", job
                items.append(next(it["id"] for it in cl.items() if it["vm_id"] == vm))

            def whole() -> list[dict[str, Any]]:
                return [g for g in cl.group_points("qg") if g["complete"]
                        and set(g["members"]) == set(items)
                        and all(m["held"] for m in g["members"].values())]

            until("3 group points of the QEMU guests", lambda: len(whole()) >= 3, 120)
            for g in whole():
                assert all(0 < m["paused_s"] < 1.0 for m in g["members"].values()), g
            for vm in vms:
                w0 = guest_writes(runner, vm)
                until("the guest writes on", lambda v=vm, w=w0: guest_writes(runner, v) > w, 10)
    finally:
        runner.close()
