"""Real guest processes running the seeded workload: the frozen view is one instant, and a
SIGKILLed guest loses no tracked write."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from drsite.core.extents import ExtentList, coalesce
from drsite.core.model import DiskSpec, PowerState, TrackingState, VmSpec
from drsite.hypervisors.file import FileHypervisor, WorkloadSpec
from drsite.hypervisors.file.workload import parse_stamp, plan_writes

pytestmark = pytest.mark.slow
MiB = 1 << 20
IO = 4096


def whole(reader_size: int, reader: object) -> bytes:
    buf = bytearray(reader_size)
    reader.readinto(0, memoryview(buf))  # type: ignore[attr-defined]
    return bytes(buf)


def wait_for_bytes(hv: FileHypervisor, vm_id: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = hv.guest_status(vm_id)
        if st and st["workload"] and st["workload"]["bytes_written"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError("workload did not write")


def test_frozen_view_is_one_instant(tmp_path: Path) -> None:
    size = 4 * MiB
    hv = FileHypervisor(tmp_path / "vms")
    spec = WorkloadSpec(pattern="random", io_size=IO, rate=20_000_000, seed=11)
    vm_id = hv.create_blank(VmSpec("wl", disks=(DiskSpec("d0", size),)), workload=spec).vm_id
    hv.start_tracking(vm_id)
    hv.release(hv.seal(vm_id))  # the epoch's base (whole disk) before the workload starts
    hv.power_on(vm_id)
    try:
        wait_for_bytes(hv, vm_id, 2 * MiB)
        c = hv.seal(vm_id)
        last = int(hv.cycle_record(c)["last_tag"])  # the workload's seq at the seal instant
        wait_for_bytes(hv, vm_id, (last * IO) + 4 * MiB)  # keep writing over the frozen blocks
        view = whole(size, hv.open_cycle_reader(c, "d0"))
        live = whole(size, hv.open_live_reader(vm_id, "d0"))
    finally:
        hv.power_off(vm_id)
    # replay the workload's writes 1..last: the last pre-seal seq of every block
    seqs = np.arange(1, last + 1, dtype=np.uint64)
    _, offs = plan_writes(spec, ["d0"], size, seqs)
    expected = np.zeros(size // IO, np.int64)
    np.maximum.at(expected, offs // IO, seqs.astype(np.int64))
    written = np.flatnonzero(expected)
    # changed extents are exactly the blocks written before the seal, coalesced
    want = coalesce(written * IO, np.full(written.size, IO))
    assert c.changed["d0"].to_pairs() == want.to_pairs()
    post_seal = 0
    for b in written.tolist():
        stamp = parse_stamp(view[b * IO:(b + 1) * IO])
        assert stamp is not None, f"block {b} torn or empty in the frozen view"
        assert stamp == (int(expected[b]), b * IO), f"block {b}: {stamp}, want seq {expected[b]}"
        live_stamp = parse_stamp(live[b * IO:(b + 1) * IO])
        assert live_stamp is not None
        post_seal += live_stamp[0] > last
    assert post_seal > 0, "the workload did not overwrite frozen blocks after the seal"


def test_sigkill_loses_no_tracked_write(tmp_path: Path) -> None:
    size = 8 * MiB
    hv = FileHypervisor(tmp_path / "vms")
    spec = WorkloadSpec(pattern="random", io_size=IO, rate=30_000_000, seed=3)
    vm_id = hv.create_blank(VmSpec("kill", disks=(DiskSpec("a", size), DiskSpec("b", size // 2))),
                            workload=spec).vm_id
    hv.start_tracking(vm_id)
    hv.power_on(vm_id)
    wait_for_bytes(hv, vm_id, 2 * MiB)
    hv.set_workload(vm_id, None)  # quiet: the disks now equal the next seal's instant
    c1 = hv.seal(vm_id)
    base = {d: whole(s, hv.open_live_reader(vm_id, d)) for d, s in c1.disk_sizes.items()}
    hv.release(c1)
    hv.set_workload(vm_id, WorkloadSpec(pattern="random", io_size=IO, rate=30_000_000, seed=4,
                                        start_seq=10**6))
    wait_for_bytes(hv, vm_id, 3 * MiB)
    hv.power_off(vm_id, force=True)  # SIGKILL mid-workload
    assert hv.get_vm(vm_id).power is PowerState.STOPPED
    st = hv.tracking_status(vm_id)
    assert st.state is TrackingState.ACTIVE, st.reason
    hv.power_on(vm_id)  # restarted guest: same boot, log validated and continued
    wait_for_bytes(hv, vm_id, 1 * MiB)
    hv.power_off(vm_id, force=True)  # and once more, then a clean run and stop
    hv.power_on(vm_id)
    wait_for_bytes(hv, vm_id, MiB)
    hv.power_off(vm_id)
    c2 = hv.seal(vm_id)
    assert c2.trusted, c2.note
    for d, s in c2.disk_sizes.items():
        now = whole(s, hv.open_live_reader(vm_id, d))
        a = np.frombuffer(base[d], np.uint8).reshape(-1, IO)
        b = np.frombuffer(now, np.uint8).reshape(-1, IO)
        differ = np.flatnonzero((a != b).any(axis=1))
        assert differ.size > 0
        diff_ext = coalesce(differ * IO, np.full(differ.size, IO))
        missed = diff_ext.subtract(c2.changed[d].align(IO, s))
        assert len(missed) == 0, f"disk {d}: writes missing from the log: {missed.to_pairs()[:5]}"
        # and the log is not wildly larger than what changed (4 KiB writes, exact granularity)
        assert c2.changed[d].total <= ExtentList.of(diff_ext.to_pairs()).total + 64 * IO
    hv.release(c2)
