"""The agent's half of a group barrier against a fake vault (real TLS, a real guest process):
``group_prepare`` holds the guest's writes (refused after the deadline), ``group_seal`` seals
under the hold, ends it and commits the point with ``held: true``; a seal after the guest's
bound is a per-VM point (``held: false``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


@contextmanager
def protected_guest(sites: Sites) -> Iterator[str]:
    """A running guest process, protected by a primary agent that runs meanwhile."""
    vm = sites.hv.create_blank(VmSpec(name="db", disks=(DiskSpec("d0", 4 * MiB),)))
    sites.hv.power_on(vm.vm_id)
    primary = Agent(sites.tmp / "pri", hypervisor=sites.hv, heartbeat_interval=0.3)
    t = threading.Thread(target=primary.run, daemon=True)
    t.start()
    try:
        assert sites.vault.wait_final(sites.protect(vm.vm_id), 30)["status"] == "succeeded"
        yield vm.vm_id
    finally:
        primary.stop()
        t.join(30)
        sites.hv.power_off(vm.vm_id, force=True)


def test_prepare_hold_seal_release(sites: Sites) -> None:
    v = sites.vault
    with protected_guest(sites) as vm_id:   # a guest process
        late = v.wait_final(v.send(sites.pri_id, "group_prepare", ITEM, {
            "barrier_id": "gb-late", "hold_s": 1.0, "deadline": time.time() - 1}), 10)
        assert late["status"] == "failed" and late["error"]["code"] == "conflict", late

        # held: a write waits (does not fail) until the seal
        r = v.wait_final(v.send(sites.pri_id, "group_prepare", ITEM, {
            "barrier_id": "gb-1", "hold_s": 5.0, "deadline": time.time() + 5}), 10)
        assert r["status"] == "succeeded", r
        assert sites.hv.guest_status(vm_id)["held_by"] == "gb-1"  # type: ignore[index]
        wrote = threading.Event()
        threading.Thread(target=lambda: (sites.hv.write(vm_id, "d0", 0, b"x" * 4096),
                                         wrote.set()), daemon=True).start()
        assert not wrote.wait(0.5)
        r = v.wait_final(v.send(sites.pri_id, "group_seal", ITEM, {"barrier_id": "gb-1"}), 30)
        assert r["status"] == "succeeded", r
        assert r["result"]["barrier"]["held"] is True, r
        assert 0.5 <= r["result"]["barrier"]["paused_s"] < 5.0
        assert r["result"]["point"]["seq"] == 2
        assert wrote.wait(5)  # released by the seal
        assert sites.hv.guest_status(vm_id)["held_by"] is None  # type: ignore[index]

        # the guest's own bound ends a hold nobody seals; the late seal is a per-VM point.
        # The seal's result can reach the vault a moment before its task leaves the item's
        # lane: a prepare then is refused "busy" (the member misses that barrier, as it
        # should); the next barrier's prepare is taken
        deadline = time.monotonic() + 10
        while True:
            r = v.wait_final(v.send(sites.pri_id, "group_prepare", ITEM, {
                "barrier_id": "gb-2", "hold_s": 0.3, "deadline": time.time() + 5}), 10)
            if r["status"] == "succeeded" or (r.get("error") or {}).get("code") != "busy" \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r["status"] == "succeeded", r
        t0 = time.monotonic()
        sites.hv.write(vm_id, "d0", 8192, b"y" * 512)
        assert time.monotonic() - t0 < 2.0
        r = v.wait_final(v.send(sites.pri_id, "group_seal", ITEM, {"barrier_id": "gb-2"}), 30)
        assert r["status"] == "succeeded" and r["result"]["barrier"]["held"] is False, r
        assert r["result"]["point"]["seq"] == 3

def test_clock_cut_holds_around_the_cut_or_misses_it(sites: Sites) -> None:
    """A clock cut (``group_seal`` with ``cut_at``): the agent reads the vault's cut clock
    (here 1000 s off its own), holds the guest just around the cut (a short pause, a write
    issued meanwhile waits) and claims it; a cut that comes too soon, or is named in a
    clock the agent cannot read, is missed: a per-VM point that says why."""
    v = sites.vault
    v.clock_offset = 1000.0
    with protected_guest(sites) as vm_id:

        def cut(bid: str, lead: float, clock_id: str = "fake-clock") -> dict[str, Any]:
            args = {"barrier_id": bid, "cut_at": v.cut_clock() + lead, "clock_id": clock_id,
                    "margin_s": 0.05, "hold_s": 2.0, "app_consistent": False}
            return v.wait_final(v.send(sites.pri_id, "group_seal", ITEM, args), 30)

        writes: list[float] = []
        stop = threading.Event()

        def writer() -> None:  # a write every 5 ms; the longest one shows the pause
            while not stop.is_set():
                t0 = time.monotonic()
                sites.hv.write(vm_id, "d0", 0, b"w" * 512)
                writes.append(time.monotonic() - t0)
                stop.wait(0.005)

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        r = cut("gb-c1", 1.5)
        stop.set()
        w.join(5)
        assert r["status"] == "succeeded", r
        b = r["result"]["barrier"]
        assert b["held"] is True and "missed" not in b, b
        assert 0.0 < b["paused_s"] < 1.0 and r["result"]["point"]["seq"] == 2
        assert max(writes) < 1.0 and len(writes) > 20

        r = cut("gb-c2", 0.0)  # the cut is past when the command arrives
        assert r["status"] == "succeeded", r
        b = r["result"]["barrier"]
        assert b["held"] is False and "too soon" in b["missed"], b
        assert r["result"]["point"]["seq"] == 3  # still a (per-VM) point

        r = cut("gb-c3", 1.5, clock_id="clk-other")  # another vault machine's clock
        b = r["result"]["barrier"]
        assert b["held"] is False and "no reading" in b["missed"], b
        assert sites.hv.guest_status(vm_id)["held_by"] is None  # type: ignore[index]


def test_guest_killed_while_a_cut_is_armed(sites: Sites) -> None:
    """SIGKILL of the guest process while a clock cut's hold is armed in it (the cut 1.5 s
    ahead): the agent's ``group_seal`` ends — it never waits for a guest that is gone — and
    says so; the VM, started again, holds nothing and the item's next cycle commits a point."""
    v = sites.vault
    with protected_guest(sites) as vm_id:
        pid = int((sites.hv.vm_dir(vm_id) / "guest.pid").read_text().strip())
        args = {"barrier_id": "gb-k", "cut_at": v.cut_clock() + 1.5, "clock_id": "fake-clock",
                "margin_s": 0.05, "hold_s": 2.0, "app_consistent": False}
        cid = v.send(sites.pri_id, "group_seal", ITEM, args)
        deadline = time.monotonic() + 10
        while any(c["command_id"] == cid for c in v.queue.get(sites.pri_id, [])) \
                and time.monotonic() < deadline:
            time.sleep(0.02)   # until the agent took it (then the hold is armed in the guest)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        r = v.wait_final(cid, 60)
        assert time.monotonic() - t0 < 30, r
        print("group_seal after the kill:", r)
        if r["status"] == "succeeded":   # sealed as a stopped VM: a per-VM point, not held
            assert r["result"]["barrier"]["held"] is False, r
        else:
            assert r["error"] and r["error"]["message"], r
        sites.hv.power_on(vm_id)
        assert sites.hv.guest_status(vm_id)["held_by"] is None  # type: ignore[index]
        t1 = time.monotonic()
        sites.hv.write(vm_id, "d0", 0, b"z" * 4096)   # not held
        assert time.monotonic() - t1 < 2.0
        r = v.wait_final(v.send(sites.pri_id, "cycle", ITEM, {}), 60)
        assert r["status"] == "succeeded", r
        assert r["result"]["point"]["kind"] in ("delta", "resync"), r
