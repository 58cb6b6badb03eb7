"""Agents end to end against a fake vault: a secondary agent serving its recovery store over
mTLS (with its hydration loop), a primary agent protecting a file VM into it — in process, and
as a real process SIGKILLed in the middle of its initial copy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drsite.agent.daemon import Agent
from drsite.agent.process import agent_register
from drsite.agent.testing import FakeVault
from drsite.core.model import Consistency, DiskSpec, PowerState, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.store.digest import file_digest, image_digest
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from tests.blackhole import Proxy

pytestmark = pytest.mark.slow

MiB = 1 << 20
ITEM = "item-db"
SETTINGS = {"frequency_s": 5, "app_consistent_every_s": None, "rpo_threshold_s": 600,
            "retention_hours": 24, "resync_window": "always"}


class Sites:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.vault = FakeVault(tmp / "vault")
        self.vault.start()
        sec = agent_register(self.vault.url, self.vault.registration_key("site-b"),
                             tmp / "sec", "sec-host", ca_fingerprint=self.vault.ca_fingerprint)
        self.secondary = Agent(tmp / "sec", hypervisor=FileHypervisor(tmp / "sec-vms"),
                               heartbeat_interval=0.3, store_dir=tmp / "store",
                               store_listen="127.0.0.1:0")
        self.sec_thread = threading.Thread(target=self.secondary.run, daemon=True)
        self.sec_thread.start()
        deadline = time.monotonic() + 10
        while self.secondary.store_url is None:
            assert time.monotonic() < deadline, "secondary store did not start"
            time.sleep(0.02)
        self.store_url = self.secondary.store_url
        self.vault.wait_heartbeat(sec.host_id, 0, 10)
        assert self.vault.hosts[sec.host_id].last["store_url"] == self.store_url
        pri = agent_register(self.vault.url, self.vault.registration_key("site-a"),
                             tmp / "pri", "pri-host", ca_file=self.vault.ca_file)
        self.pri_id = pri.host_id
        self.hv = FileHypervisor(tmp / "vms")

    def make_vm(self, size: int) -> str:
        vm = self.hv.create_blank(VmSpec(name="db", disks=(DiskSpec("d0", size),
                                                           DiskSpec("d1", size))))
        rng = np.random.default_rng(5)
        for d in ("d0", "d1"):
            with open(self.hv.disk_path(vm.vm_id, d), "r+b") as f:
                for i in range(0, size // MiB, 2):  # half the disk: incompressible 1 MiB runs
                    os.pwrite(f.fileno(), rng.integers(0, 256, MiB, dtype=np.uint8).tobytes(),
                              i * MiB)
        return vm.vm_id

    def protect(self, vm_id: str, command_id: str | None = None) -> str:
        return self.vault.send(self.pri_id, "protect", ITEM,
                               {"vm_id": vm_id, "target_site": "site-b",
                                "store_url": self.store_url, "settings": SETTINGS},
                               command_id=command_id)

    @contextmanager
    def primary_agent(self, join_s: float = 30) -> Iterator[Agent]:
        """The primary's agent, running on a thread of this process until the block ends."""
        primary = Agent(self.tmp / "pri", hypervisor=self.hv, heartbeat_interval=0.3)
        t = threading.Thread(target=primary.run, daemon=True)
        t.start()
        try:
            yield primary
        finally:
            primary.stop()
            t.join(join_s)
        assert not t.is_alive(), "the primary agent did not stop"

    def cycles(self, vm_id: str, n: int) -> list[dict[str, Any]]:
        """``n`` cycles, each after a 4 KiB write to d0; their (succeeded) results."""
        out = []
        for _ in range(n):
            self.hv.write(vm_id, "d0", 0, os.urandom(4096))
            r = self.vault.wait_final(self.vault.send(self.pri_id, "cycle", ITEM, {}), 30)
            assert r["status"] == "succeeded", r
            out.append(r)
        return out

    def repo(self) -> Repository:
        return Repository(LocalObjectStore(self.tmp / "store"), ITEM)

    def replica_state(self) -> dict[str, Any]:
        path = self.tmp / "sec" / "replicas" / ITEM / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def close(self) -> None:
        self.secondary.stop()
        self.sec_thread.join(30)
        self.vault.stop()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path)
    yield s
    s.close()


def test_protect_cycle_and_hydrated_replica(sites: Sites) -> None:
    size = 8 * MiB
    vm_id = sites.make_vm(size)
    with sites.primary_agent():
        r = sites.vault.wait_final(sites.protect(vm_id), 30)
        assert r["status"] == "succeeded", r
        assert r["result"]["point"]["kind"] == "initial"
        sites.hv.write(vm_id, "d1", 3 * MiB, b"\x5a" * 65536)
        r = sites.vault.wait_final(sites.vault.send(sites.pri_id, "cycle", ITEM,
                                                    {"app_consistent": False}), 30)
        assert r["status"] == "succeeded", r
        point = r["result"]["point"]
        assert point["seq"] == 2 and point["base_point_id"] == "p000000000001"

        # the replica reaches the new point (catch-up after commit, else the hydration loop)
        deadline = time.monotonic() + 15
        while sites.replica_state().get("point_id") != point["point_id"]:
            assert time.monotonic() < deadline, sites.replica_state()
            time.sleep(0.1)
        repo = sites.repo()
        for d in ("d0", "d1"):
            src = file_digest(sites.hv.disk_path(vm_id, d), size)
            assert image_digest(repo.reader(point["point_id"], d)) == src
            assert file_digest(sites.tmp / "sec" / "replicas" / ITEM / f"{d}.img", size) == src
        # the store's catch-ups left every segment map of the point in the agent's shared
        # cache: a failover on this host verifies with them warm
        svc = sites.secondary.store_service
        assert svc is not None and set(repo._maps) and set(repo._maps) <= set(svc.map_cache)
        # the vault's catalogue got both points
        sites.vault.wait_heartbeat(sites.pri_id, sites.vault.hosts[sites.pri_id].heartbeats, 5)
        assert set(sites.vault.points[ITEM]) == {"p000000000001", "p000000000002"}


def _agent_proc(sites: Sites, failpoint: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("DRSITE_FAILPOINTS", None)
    if failpoint:
        env["DRSITE_FAILPOINTS"] = failpoint
    cmd = [sys.executable, "-m", "drsite.cli.main", "agent", "run", "--data", str(sites.tmp / "pri"),
           "--vms", str(sites.tmp / "vms"), "--heartbeat-interval", "0.3"]
    with open(sites.tmp / f"agent-{time.monotonic_ns()}.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def test_hydration_loop_follows_points_without_catch_up_calls(sites: Sites) -> None:
    repo = sites.repo()
    for i, data in enumerate((b"\x11" * 8192, b"\x22" * 4096)):
        base = repo.latest()
        w = repo.begin(f"cycle{i}", base=base.point_id if base else None,
                       disk_sizes={"d0": 4 * MiB}, kind="delta" if base else "initial")
        w.write("d0", i * MiB, data)
        point = w.commit(created_at=time.time(), consistency=Consistency.CRASH)
        w.close()
    deadline = time.monotonic() + 15
    while sites.replica_state().get("point_id") != point.point_id:
        assert time.monotonic() < deadline, sites.replica_state()
        time.sleep(0.1)
    assert file_digest(sites.tmp / "sec" / "replicas" / ITEM / "d0.img", 4 * MiB) == \
        image_digest(repo.reader(point.point_id, "d0"))


def test_sigkill_mid_initial_copy_resumes(sites: Sites) -> None:
    size = 32 * MiB
    vm_id = sites.make_vm(size)
    proc = _agent_proc(sites, "store.pack-stored=kill@3")
    try:
        cid = sites.protect(vm_id)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    repo = sites.repo()
    assert repo.points() == [], "a point became visible before its copy finished"
    assert len(repo.staged_cycles()) == 1

    proc = _agent_proc(sites, None)
    try:
        # the vault delivers the command again (it never got a result for it)
        sites.vault.resend(sites.pri_id, {"command_id": cid, "kind": "protect", "item_id": ITEM,
                                          "args": {"vm_id": vm_id, "target_site": "site-b",
                                                   "store_url": sites.store_url,
                                                   "settings": SETTINGS}})
        r = sites.vault.wait_final(cid, 60)
        assert r["status"] == "succeeded", r
        report = r["result"]["report"]
        assert report["state"] == "protected"
        assert report["initial_resumed_from"] > 0, "restarted the initial copy from zero"
        assert report["initial_resumed_from"] >= 16 * MiB
        (point,) = sites.repo().points()
        for d in ("d0", "d1"):
            assert image_digest(sites.repo().reader(point.point_id, d)) == \
                file_digest(sites.hv.disk_path(vm_id, d), size)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "SIGTERM did not stop the agent cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_site_store_retention_and_deletion_run_on_the_stores_agent(sites: Sites) -> None:
    """The source never deletes committed points on a site store (refused remotely): its
    engine skips retention, its ``retention`` deletes nothing; the store's agent deletes them
    (``retention`` with ``store_side``), audits each, and the source reports them removed."""
    vm_id = sites.make_vm(4 * MiB)
    sec_id = sites.secondary.identity.host_id
    with sites.primary_agent():
        assert sites.vault.wait_final(sites.protect(vm_id), 30)["status"] == "succeeded"
        for r in sites.cycles(vm_id, 2):
            reasons = r["result"]["report"]["health_reasons"]
            assert not [x for x in reasons if "retention" in x], reasons
        r = sites.vault.wait_final(sites.vault.send(sites.pri_id, "retention", ITEM, {}), 30)
        assert r["result"] == {"deleted_points": [], "store_side": False}
        assert len(sites.repo().points()) == 3
        r = sites.vault.wait_final(sites.vault.send(
            sec_id, "retention", ITEM, {"store_side": True, "settings": SETTINGS}), 30)
        assert r["status"] == "succeeded" and r["result"]["store_side"] is True, r
        r = sites.vault.wait_final(sites.vault.send(
            sec_id, "retention", ITEM, {"store_side": True, "delete_all": True}), 30)
        assert r["status"] == "succeeded", r
        assert sorted(r["result"]["deleted_points"]) == ["p000000000001", "p000000000002",
                                                          "p000000000003"]
        assert sites.repo().points() == []
        deadline = time.monotonic() + 10
        while len(sites.vault.removed.get(ITEM, set())) < 3:   # the source reports them
            assert time.monotonic() < deadline, sites.vault.removed
            time.sleep(0.1)
        want = {f"items/{ITEM}/points/p00000000000{i}" for i in (1, 2, 3)}
        deadline = time.monotonic() + 10
        while True:   # in the store agent's next heartbeat
            with sites.vault.lock:
                audit = [e for b in sites.vault.heartbeat_log if b["host_id"] == sec_id
                         for e in b.get("audit") or []]
            if want <= {e["key"] for e in audit if e["op"] == "delete"
                        and e["caller"] == sec_id and e["outcome"] == "ok"}:
                break
            assert time.monotonic() < deadline, audit
            time.sleep(0.1)


def test_a_fence_overtakes_a_cycle_hung_on_a_black_holed_store(sites: Sites) -> None:
    """Issue 13: an unplanned failover's fence reaches a live old primary whose cycle hangs on
    the black-holed recovery store (no RST, only the network timeout tells): the fence must not
    wait behind that cycle in the item's lane — the VM is powered off in about a second."""
    vm_id = sites.make_vm(4 * MiB)
    sites.hv.power_on(vm_id)
    port = int(sites.store_url.rsplit(":", 1)[1])
    proxy = Proxy(port)
    primary = Agent(sites.tmp / "pri", hypervisor=sites.hv, heartbeat_interval=0.3)
    t = threading.Thread(target=primary.run, daemon=True)
    t.start()
    try:
        r = sites.vault.wait_final(sites.vault.send(
            sites.pri_id, "protect", ITEM, {"vm_id": vm_id, "target_site": "site-b",
                                            "store_url": proxy.url, "settings": SETTINGS}), 30)
        assert r["status"] == "succeeded", r
        proxy.hold()
        sites.hv.write(vm_id, "d0", 0, b"\x33" * 65536)
        cycle = sites.vault.send(sites.pri_id, "cycle", ITEM, {"app_consistent": False})
        deadline = time.monotonic() + 10
        while cycle not in primary.held_commands():
            assert time.monotonic() < deadline, "the agent did not take the cycle"
            time.sleep(0.05)
        time.sleep(1.0)  # the cycle is shipping into the hole
        t0 = time.monotonic()
        fence = sites.vault.send(sites.pri_id, "failover_fence", ITEM,
                                 {"failover_id": "f1", "recovery_site": "site-b",
                                  "generation": 2})
        r = sites.vault.wait_final(fence, 10)
        took = time.monotonic() - t0
        assert r["status"] == "succeeded" and r["result"]["fenced"] is True, r
        assert took < 3, f"the fence waited {took:.1f} s behind the hung cycle"
        assert sites.hv.get_vm(vm_id).power is PowerState.STOPPED
        assert sites.vault.final(cycle) is None  # the cycle still hangs in the hole
    finally:
        proxy.close()
        primary.stop()
        t.join(60)
        for vm in sites.hv.list_vms():
            sites.hv.power_off(vm.vm_id, force=True)



def test_retention_keeps_the_points_the_vault_names(sites: Sites) -> None:
    """``retention`` with ``keep`` (member points of group points): the store's agent keeps
    them whatever the rule says, removes the rest the rule drops; a malformed ``keep`` fails
    the command and removes nothing."""
    vm_id = sites.make_vm(4 * MiB)
    sec_id = sites.secondary.identity.host_id
    with sites.primary_agent():
        assert sites.vault.wait_final(sites.protect(vm_id), 30)["status"] == "succeeded"
        sites.cycles(vm_id, 2)
        time.sleep(1.0)
        short = {**SETTINGS, "retention_hours": 0.0001}  # 0.36 s: all but the newest go
        r = sites.vault.wait_final(sites.vault.send(
            sec_id, "retention", ITEM, {"store_side": True, "settings": short,
                                        "keep": "p000000000001"}), 30)
        assert r["status"] == "failed" and r["error"]["code"] == "invalid_input", r
        assert len(sites.repo().points()) == 3
        r = sites.vault.wait_final(sites.vault.send(
            sec_id, "retention", ITEM, {"store_side": True, "settings": short,
                                        "keep": ["p000000000001"]}), 30)
        assert r["status"] == "succeeded", r
        assert r["result"]["deleted_points"] == ["p000000000002"]
        assert [p.point_id for p in sites.repo().points()] == ["p000000000001", "p000000000003"]
