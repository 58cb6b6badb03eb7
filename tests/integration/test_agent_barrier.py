"""The agent's half of a group barrier against a fake vault (real TLS, a real guest process):
``group_prepare`` holds the guest's writes (refused after the deadline), ``group_seal`` seals
under the hold, ends it and commits the point with ``held: true``; a seal after the guest's
bound is a per-VM point (``held: false``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.agent.daemon import Agent
from drsite.core.model import DiskSpec, VmSpec
from tests.integration.test_agent_replication import ITEM, Sites

pytestmark = pytest.mark.slow
MiB = 1 << 20


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    s = Sites(tmp_path)
    yield s
    s.close()


def test_prepare_hold_seal_release(sites: Sites) -> None:
    vm = sites.hv.create_blank(VmSpec(name="db", disks=(DiskSpec("d0", 4 * MiB),)))
    sites.hv.power_on(vm.vm_id)  # a guest process
    primary = Agent(sites.tmp / "pri", hypervisor=sites.hv, heartbeat_interval=0.3)
    t = threading.Thread(target=primary.run, daemon=True)
    t.start()
    v = sites.vault
    try:
        assert v.wait_final(sites.protect(vm.vm_id), 30)["status"] == "succeeded"
        late = v.wait_final(v.send(sites.pri_id, "group_prepare", ITEM, {
            "barrier_id": "gb-late", "hold_s": 1.0, "deadline": time.time() - 1}), 10)
        assert late["status"] == "failed" and late["error"]["code"] == "conflict", late

        # held: a write waits (does not fail) until the seal
        r = v.wait_final(v.send(sites.pri_id, "group_prepare", ITEM, {
            "barrier_id": "gb-1", "hold_s": 5.0, "deadline": time.time() + 5}), 10)
        assert r["status"] == "succeeded", r
        assert sites.hv.guest_status(vm.vm_id)["held_by"] == "gb-1"  # type: ignore[index]
        wrote = threading.Event()
        threading.Thread(target=lambda: (sites.hv.write(vm.vm_id, "d0", 0, b"x" * 4096),
                                         wrote.set()), daemon=True).start()
        assert not wrote.wait(0.5)
        r = v.wait_final(v.send(sites.pri_id, "group_seal", ITEM, {"barrier_id": "gb-1"}), 30)
        assert r["status"] == "succeeded", r
        assert r["result"]["barrier"]["held"] is True, r
        assert 0.5 <= r["result"]["barrier"]["paused_s"] < 5.0
        assert r["result"]["point"]["seq"] == 2
        assert wrote.wait(5)  # released by the seal
        assert sites.hv.guest_status(vm.vm_id)["held_by"] is None  # type: ignore[index]

        # the guest's own bound ends a hold nobody seals; the late seal is a per-VM point
        r = v.wait_final(v.send(sites.pri_id, "group_prepare", ITEM, {
            "barrier_id": "gb-2", "hold_s": 0.3, "deadline": time.time() + 5}), 10)
        assert r["status"] == "succeeded", r
        t0 = time.monotonic()
        sites.hv.write(vm.vm_id, "d0", 8192, b"y" * 512)
        assert time.monotonic() - t0 < 2.0
        r = v.wait_final(v.send(sites.pri_id, "group_seal", ITEM, {"barrier_id": "gb-2"}), 30)
        assert r["status"] == "succeeded" and r["result"]["barrier"]["held"] is False, r
        assert r["result"]["point"]["seq"] == 3
    finally:
        primary.stop()
        t.join(30)
        sites.hv.power_off(vm.vm_id, force=True)
