"""The file VM block layer and driver, in-process (no guest processes): CBW, rotation, crash."""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from drsite.core.errors import (
    Conflict,
    DrsiteError,
    InvalidInput,
    NotFound,
    TrackingLost,
    VmNotFound,
)
from drsite.core.extents import ExtentList
from drsite.core.model import Consistency, DiskSpec, PowerState, TrackingState, VmSpec
from drsite.hypervisors.file import FileHypervisor, FileVm
from drsite.hypervisors.file.layout import CBW_BLOCK, GRANULE, VmPaths
from drsite.hypervisors.file.runtime import GuestRuntime

MiB = 1 << 20


@pytest.fixture()
def hv(tmp_path: Path) -> FileHypervisor:
    return FileHypervisor(tmp_path / "vms")


def make(hv: FileHypervisor, name: str = "vm1", sizes: tuple[int, ...] = (4 * MiB,)) -> str:
    spec = VmSpec(name, disks=tuple(DiskSpec(f"d{i}", s) for i, s in enumerate(sizes)))
    return hv.create_blank(spec).vm_id


def base(hv: FileHypervisor, vm_id: str) -> None:
    """The first cycle of an epoch covers whole disks; release it so later cycles are deltas."""
    c = hv.seal(vm_id)
    assert c.trusted and all(c.changed[d].to_pairs() == [(0, n)] for d, n in c.disk_sizes.items())
    hv.release(c)


def tracked_guest(hv: FileHypervisor, name: str = "vm1",
                  sizes: tuple[int, ...] = (4 * MiB,)) -> tuple[str, GuestRuntime]:
    """A VM made, tracked, running in this process, with its first (whole-disk) cycle
    released: what most tests here start from."""
    vm_id = make(hv, name, sizes)
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    base(hv, vm_id)
    return vm_id, rt


def read_view(hv: FileHypervisor, cycle: object, disk: str, off: int, n: int) -> bytes:
    r = hv.open_cycle_reader(cycle, disk)  # type: ignore[arg-type]
    try:
        buf = bytearray(n)
        r.readinto(off, memoryview(buf))
        return bytes(buf)
    finally:
        r.close()


def test_changed_extents_exact_and_coalesced(hv: FileHypervisor) -> None:
    vm_id, rt = tracked_guest(hv, sizes=(4 * MiB, 1 * MiB))
    rt.vm.write("d0", 100, b"x" * 5)
    rt.vm.write("d0", 105, b"y" * 10)  # touching: merges
    rt.vm.write("d0", 70_000, b"z")
    rt.vm.write("d1", MiB - 3, b"abc")
    st = hv.tracking_status(vm_id)
    assert st.state is TrackingState.ACTIVE and st.pending_bytes == {"d0": 16, "d1": 3}
    c = hv.seal(vm_id)
    assert c.trusted and c.consistency is Consistency.CRASH
    assert c.changed["d0"].to_pairs() == [(100, 15), (70_000, 1)]
    assert c.changed["d1"].to_pairs() == [(MiB - 3, 3)]
    assert c.disk_sizes == {"d0": 4 * MiB, "d1": MiB}
    assert hv.tracking_status(vm_id).pending_bytes == {"d0": 0, "d1": 0}
    rt.vm.write("d0", 0, b"q")
    hv.release(c)
    c2 = hv.seal(vm_id)
    assert c2.changed["d0"].to_pairs() == [(0, 1)] and len(c2.changed["d1"]) == 0
    hv.power_off(vm_id)


def test_frozen_view_is_pre_seal_while_writes_continue(hv: FileHypervisor) -> None:
    size = 2 * MiB
    vm_id = make(hv, sizes=(size,))
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    rng = random.Random(5)
    for _ in range(200):  # unaligned writes, some spanning granules
        off = rng.randrange(0, size - 70_000)
        rt.vm.write("d0", off, rng.randbytes(rng.randrange(1, 70_000)))
    before = rt.vm.read("d0", 0, size)
    c = hv.seal(vm_id)
    stop = threading.Event()

    def writer() -> None:
        r = random.Random(6)
        while not stop.is_set():
            off = r.randrange(0, size - 9000)
            rt.vm.write("d0", off, r.randbytes(r.randrange(1, 9000)))

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(20):  # read the changed set repeatedly under concurrent writes
            for s, n in c.changed["d0"]:
                assert read_view(hv, c, "d0", s, n) == before[s:s + n]
    finally:
        stop.set()
        t.join()
    assert rt.vm.read("d0", 0, size) != before  # the live disk did move on
    assert c.changed["d0"].to_pairs() == [(0, size)]  # first cycle: the whole disk is frozen
    assert read_view(hv, c, "d0", 0, size) == before
    # a delta cycle: frozen over its changed extents
    hv.release(c)
    for off in (5, GRANULE - 3, 10 * GRANULE + 7):
        rt.vm.write("d0", off, b"D" * 100)
    before2 = rt.vm.read("d0", 0, size)
    c2 = hv.seal(vm_id)
    for off in (0, GRANULE - 50, 10 * GRANULE):
        rt.vm.write("d0", off, b"E" * 300)
    # the concurrent writer's writes after the first seal are in this cycle too
    assert len(ExtentList.of([(5, 100), (GRANULE - 3, 100), (10 * GRANULE + 7, 100)])
               .subtract(c2.changed["d0"])) == 0
    for s, n in c2.changed["d0"]:
        assert read_view(hv, c2, "d0", s, n) == before2[s:s + n]
    hv.power_off(vm_id)


def test_cbw_preserves_written_blocks_only_and_batched_reads_agree(hv: FileHypervisor) -> None:
    """Copy-before-write is per 4 KiB block, for the blocks of the cycle's changed extents only
    (a 4 KiB write preserves 4 KiB, not 64 KiB); readv of scattered extents equals readinto of each, with
    preserved blocks, unpreserved blocks and granules outside the cycle mixed in one batch; a
    cycle recorded with the old 64 KiB blocks still reads right."""
    size = 4 * MiB
    vm_id, rt = tracked_guest(hv, sizes=(size,))
    rng = random.Random(9)
    pre = [(g * GRANULE + b * CBW_BLOCK, rng.randbytes(CBW_BLOCK))
           for g in (1, 5, 9) for b in (0, 3, 15)]
    rt.vm.write_many([("d0", o, d) for o, d in pre])
    before = rt.vm.read("d0", 0, size)
    c = hv.seal(vm_id)
    assert hv.cycle_record(c)["cbw_block"] == CBW_BLOCK
    # after the seal: a changed block; a write over three blocks of a dirty granule of which
    # only the last was changed in the cycle (the others are not read from the view, so not
    # preserved: they would cost a disk read each); a write outside every dirty granule
    rt.vm.write("d0", GRANULE + 3 * CBW_BLOCK, b"N" * CBW_BLOCK)
    rt.vm.write("d0", 5 * GRANULE + CBW_BLOCK + 100, b"M" * (2 * CBW_BLOCK))
    rt.vm.write("d0", 20 * GRANULE, b"O" * CBW_BLOCK)
    assert rt.vm.status()["cbw_copied"]["d0"] == 1 + 1
    offs = np.array([s for s, _ in c.changed["d0"]] + [20 * GRANULE, 3 * CBW_BLOCK + 7],
                    np.int64)
    lens = np.array([n for _, n in c.changed["d0"]] + [CBW_BLOCK, 5000], np.int64)
    order = np.random.default_rng(2).permutation(offs.size)  # any order
    offs, lens = offs[order], lens[order]
    r = hv.open_cycle_reader(c, "d0")
    try:
        buf = bytearray(int(lens.sum()))
        r.readv(offs, lens, memoryview(buf))  # type: ignore[attr-defined]
    finally:
        r.close()
    pos = 0
    for o, n in zip(offs.tolist(), lens.tolist(), strict=True):
        want = before[o:o + n] if o != 20 * GRANULE else b"O" * n  # unprotected: live data
        assert bytes(buf[pos:pos + n]) == want, o
        assert read_view(hv, c, "d0", o, n) == want
        pos += n
    hv.release(c)
    hv.power_off(vm_id)


def test_cycle_with_64k_blocks_from_before_still_reads(hv: FileHypervisor) -> None:
    """A guest restarted on a cycle sealed with 64 KiB copy-before-write blocks keeps them."""
    vm_id, rt = tracked_guest(hv)
    rt.vm.write("d0", 2 * GRANULE, b"A" * GRANULE)
    c = hv.seal(vm_id)
    hv.power_off(vm_id)
    paths = VmPaths(hv.vm_dir(vm_id))
    rec = hv.cycle_record(c)
    del rec["cbw_block"]  # as written before copy-before-write blocks existed
    del rec["cbw_slots"]  # (and before packed fleeces)
    paths.cycle_file(rec["epoch"]).write_text(json.dumps(rec))
    for f in (paths.tracking / rec["epoch"]).glob("*.slots"):
        f.unlink()
    for f in (paths.tracking / rec["epoch"]).glob("*.cbw"):
        f.write_bytes(bytes(64))  # one byte per 64 KiB granule of the 4 MiB disk
    rt = hv.guest(vm_id)
    rt.vm.write("d0", 2 * GRANULE + 10, b"B")
    assert rt.vm.status()["cbw_copied"]["d0"] == 1  # one 64 KiB block
    assert read_view(hv, c, "d0", 2 * GRANULE, GRANULE) == b"A" * GRANULE
    hv.release(c)
    hv.power_off(vm_id)


def test_fleece_is_packed_in_copy_order(hv: FileHypervisor) -> None:
    """Preserved blocks are appended to the fleece in the order they are copied (its size is
    what was copied, not the disk's: scattered blocks at their own offsets made fleeces whose
    unlink took seconds), the slot index names each slot's block, an all-zero block is a hole,
    and the view reads every preserved block back from its slot."""
    size = 16 * MiB
    vm_id, rt = tracked_guest(hv, sizes=(size,))
    rng = random.Random(11)
    blocks = rng.sample(range(size // CBW_BLOCK), 40)
    rt.vm.write_many([("d0", b * CBW_BLOCK, rng.randbytes(CBW_BLOCK)) for b in blocks])
    rt.vm.write("d0", 3 * CBW_BLOCK, bytes(CBW_BLOCK))   # changed, to zeros
    before = rt.vm.read("d0", 0, size)
    c = hv.seal(vm_id)
    assert hv.cycle_record(c)["cbw_slots"] is True
    order = [*reversed(blocks[:30]), 3]   # overwritten after the seal, in this order
    for b in order:
        rt.vm.write("d0", b * CBW_BLOCK, b"W" * CBW_BLOCK)
    paths = VmPaths(hv.vm_dir(vm_id))
    fleece = paths.fleece(c.epoch, c.cycle_id, "d0", packed=True)
    slots = np.frombuffer(paths.cbw_slots(c.epoch, c.cycle_id, "d0").read_bytes(), "<i8") - 1
    assert slots.tolist() == order
    assert fleece.stat().st_size == 30 * CBW_BLOCK   # the zero block (slot 30) is not written
    assert fleece.read_bytes()[:CBW_BLOCK] == before[order[0] * CBW_BLOCK:][:CBW_BLOCK]
    for s, n in c.changed["d0"]:
        assert read_view(hv, c, "d0", s, n) == before[s:s + n]
    r = hv.open_cycle_reader(c, "d0")
    try:
        assert len(ExtentList.of([(b * CBW_BLOCK, CBW_BLOCK) for b in order])
                   .subtract(r.data_extents())) == 0
    finally:
        r.close()
    hv.release(c)
    assert not fleece.exists() and not paths.cbw_slots(c.epoch, c.cycle_id, "d0").exists()
    hv.power_off(vm_id)


def test_packed_fleece_resumes_after_a_guest_kill(hv: FileHypervisor) -> None:
    """A guest killed with a cycle unreleased: the restarted guest takes slots after the ones
    listed and cuts a copy whose entry was never appended (else an all-zero block given that
    slot would read the orphan's bytes); a block listed but never marked (an orphan: copied,
    killed before its byte was set) is copied again to a later slot, and reads right."""
    vm_id, rt = tracked_guest(hv, sizes=(4 * MiB,))
    rt.vm.write("d0", 0, b"A" * CBW_BLOCK)
    rt.vm.write("d0", 8 * CBW_BLOCK, bytes(CBW_BLOCK))   # changed to zeros
    rt.vm.write("d0", 16 * CBW_BLOCK, b"C" * CBW_BLOCK)
    c = hv.seal(vm_id)
    rt.vm.write("d0", 0, b"a" * CBW_BLOCK)                # slot 0
    hv.power_off(vm_id, force=True)   # in-process SIGKILL
    paths = VmPaths(hv.vm_dir(vm_id))
    fleece = paths.fleece(c.epoch, c.cycle_id, "d0", packed=True)
    slots = paths.cbw_slots(c.epoch, c.cycle_id, "d0")
    with open(fleece, "r+b") as f:   # block 16 copied to slot 1, listed, its byte never set
        f.seek(CBW_BLOCK)
        f.write(b"C" * CBW_BLOCK)
    with open(slots, "ab") as f:
        f.write(np.array([16 + 1], "<i8").tobytes())
    with open(fleece, "r+b") as f:   # a copy into slot 2 whose entry the kill cut off
        f.seek(2 * CBW_BLOCK)
        f.write(b"X" * CBW_BLOCK)
    rt = hv.guest(vm_id)
    rt.vm.write("d0", 8 * CBW_BLOCK, b"z" * CBW_BLOCK)    # all-zero pre-seal: slot 2, a hole
    rt.vm.write("d0", 16 * CBW_BLOCK, b"c" * CBW_BLOCK)   # slot 3
    assert (np.frombuffer(slots.read_bytes(), "<i8") - 1).tolist() == [0, 16, 8, 16]
    assert read_view(hv, c, "d0", 0, CBW_BLOCK) == b"A" * CBW_BLOCK
    assert read_view(hv, c, "d0", 8 * CBW_BLOCK, CBW_BLOCK) == bytes(CBW_BLOCK)
    assert read_view(hv, c, "d0", 16 * CBW_BLOCK, CBW_BLOCK) == b"C" * CBW_BLOCK
    hv.release(c)
    hv.power_off(vm_id)


def test_a_copy_that_fails_leaves_its_slots_unused(hv: FileHypervisor,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while a block is copied: the guest's write fails, and the slot that copy
    took is never given to another block (an all-zero block there would read its bytes), nor
    read as naming one (its entry, never written, is a hole: 0 is no block, not block 0)."""
    from drsite.hypervisors.file import cbw

    vm_id, rt = tracked_guest(hv, sizes=(4 * MiB,))
    rt.vm.write("d0", 0, b"A" * CBW_BLOCK)
    rt.vm.write("d0", 3 * CBW_BLOCK, b"B" * CBW_BLOCK)
    rt.vm.write("d0", 5 * CBW_BLOCK, bytes(CBW_BLOCK))   # changed to zeros
    c = hv.seal(vm_id)
    slots = VmPaths(hv.vm_dir(vm_id)).cbw_slots(c.epoch, c.cycle_id, "d0")
    real = cbw.pwrite_all
    calls = {"n": 0}

    def full_on_index(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        if os.path.samefile(f"/proc/self/fd/{fd}", slots) and not calls["n"]:
            calls["n"] += 1   # block 3's copy landed in slot 0; its entry finds the disk full
            raise OSError(28, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(cbw, "pwrite_all", full_on_index)
    with pytest.raises(DrsiteError):
        rt.vm.write("d0", 3 * CBW_BLOCK, b"b" * CBW_BLOCK)
    rt.vm.write("d0", 5 * CBW_BLOCK, b"z" * CBW_BLOCK)   # all-zero pre-seal: slot 1, not 0
    r = hv.open_cycle_reader(c, "d0")
    try:
        def view(block: int) -> bytes:
            buf = bytearray(CBW_BLOCK)
            r.readinto(block * CBW_BLOCK, memoryview(buf))
            return bytes(buf)

        assert view(5) == bytes(CBW_BLOCK)   # this reader has now read the index's hole
        rt.vm.write("d0", 0, b"a" * CBW_BLOCK)                 # slot 2
        rt.vm.write("d0", 3 * CBW_BLOCK, b"b" * CBW_BLOCK)     # retried: slot 3
        assert view(0) == b"A" * CBW_BLOCK
        assert view(3) == b"B" * CBW_BLOCK
    finally:
        r.close()
    entries = (np.frombuffer(slots.read_bytes(), "<i8") - 1).tolist()
    assert entries == [-1, 5, 0, 3] and calls["n"] == 1
    hv.release(c)
    hv.power_off(vm_id)


def test_a_slot_index_missing_a_preserved_block_is_tracking_lost(hv: FileHypervisor) -> None:
    vm_id, rt = tracked_guest(hv)
    rt.vm.write("d0", 0, b"A" * CBW_BLOCK)
    c = hv.seal(vm_id)
    rt.vm.write("d0", 0, b"B" * CBW_BLOCK)
    VmPaths(hv.vm_dir(vm_id)).cbw_slots(c.epoch, c.cycle_id, "d0").write_bytes(b"")
    with pytest.raises(TrackingLost, match="slot index"):
        read_view(hv, c, "d0", 0, CBW_BLOCK)
    hv.release(c)
    hv.power_off(vm_id)


def test_release_is_idempotent_and_drops_files(hv: FileHypervisor) -> None:
    vm_id = make(hv)
    hv.start_tracking(vm_id)
    hv.write(vm_id, "d0", 0, b"a" * 10)  # stopped VM: tracked write under the lock
    c = hv.seal(vm_id)
    paths = VmPaths(hv.vm_dir(vm_id))
    assert paths.cycle_file(c.epoch).exists()
    with pytest.raises(Conflict):
        hv.seal(vm_id)
    hv.release(c)
    hv.release(c)
    assert hv.pending_cycle(vm_id) is None
    assert sorted(p.name for p in paths.epoch_dir(c.epoch).iterdir()) == ["d0.active.hrl", "epoch.json"]
    with pytest.raises(NotFound):
        hv.open_cycle_reader(c, "d0")


def test_pending_cycle_after_engine_crash(hv: FileHypervisor) -> None:
    vm_id, rt = tracked_guest(hv)
    rt.vm.write("d0", GRANULE + 5, b"old!")
    c = hv.seal(vm_id)
    rt.vm.write("d0", GRANULE + 5, b"new!")
    engine2 = FileHypervisor(hv.root)  # the engine restarted: a fresh driver object
    p = engine2.pending_cycle(vm_id)
    assert p is not None and (p.cycle_id, p.sealed_at, p.trusted) == (c.cycle_id, c.sealed_at, True)
    assert p.changed["d0"].to_pairs() == c.changed["d0"].to_pairs() == [(GRANULE + 5, 4)]
    assert read_view(engine2, p, "d0", GRANULE + 5, 4) == b"old!"
    engine2.release(p)
    assert hv.pending_cycle(vm_id) is None
    hv.power_off(vm_id)


def test_unclean_stop_same_boot_trusted_and_cbw_resumes(hv: FileHypervisor) -> None:
    vm_id = make(hv)
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    rt.vm.write("d0", 0, b"A" * 100)
    c = hv.seal(vm_id)
    rt.vm.write("d0", 3 * GRANULE, b"B" * 10)  # tracked in the new log
    hv.power_off(vm_id, force=True)  # in-process SIGKILL: nothing flushed or marked clean
    assert hv.get_vm(vm_id).power is PowerState.STOPPED
    st = hv.tracking_status(vm_id)
    assert st.state is TrackingState.ACTIVE and st.pending_bytes["d0"] == 10
    rt = hv.guest(vm_id)  # restart: logs reopened and validated, CBW resumed for the cycle
    assert rt.vm.recovery_notes == ["previous session ended uncleanly"]
    rt.vm.write("d0", 50, b"C" * 10)
    assert read_view(hv, c, "d0", 0, 100) == b"A" * 100
    hv.release(c)
    c2 = hv.seal(vm_id)
    assert c2.trusted and c2.changed["d0"].to_pairs() == [(50, 10), (3 * GRANULE, 10)]
    hv.power_off(vm_id)


def test_host_crash_untrusted_and_cycle_dropped(hv: FileHypervisor) -> None:
    vm_id, rt = tracked_guest(hv)
    rt.vm.write("d0", 0, b"A" * 100)
    c = hv.seal(vm_id)
    rt.vm.write("d0", 5 * GRANULE, b"B")
    hv.power_off(vm_id, force=True)
    # the host "reboots": the next owner sees another boot id
    vm = FileVm.open(hv.vm_dir(vm_id), boot_id=str(uuid.uuid4()))
    assert any("host restart" in n for n in vm.recovery_notes)
    vm.close()
    st = hv.tracking_status(vm_id)
    assert st.state is TrackingState.UNTRUSTED and "host restarted" in st.reason
    assert st.pending_bytes["d0"] == 4 * MiB  # conservative: the 50% rule triggers a resync
    assert hv.pending_cycle(vm_id) is None  # its frozen view could not be trusted
    c2 = hv.seal(vm_id)
    assert not c2.trusted and c2.cycle_id != c.cycle_id and "host restarted" in c2.note
    # the dropped cycle's logs were carried into this one
    assert (0, 100) in c2.changed["d0"].to_pairs()
    # an untrusted cycle is read in full: CBW protects every granule, not only the changed set
    rt = hv.guest(vm_id)
    before = rt.vm.read("d0", 0, 4 * MiB)
    rt.vm.write("d0", 2 * MiB, b"Z" * 70_000)
    assert read_view(hv, c2, "d0", 0, 4 * MiB) == before
    hv.release(c2)
    rt.vm.write("d0", 9, b"1")
    c3 = hv.seal(vm_id)
    assert c3.trusted  # the new log after the seal was clean
    hv.power_off(vm_id)


def test_interrupted_seal_logs_are_carried(hv: FileHypervisor) -> None:
    vm_id = make(hv)
    hv.start_tracking(vm_id)
    base(hv, vm_id)
    hv.write(vm_id, "d0", 10, b"x")
    c = hv.seal(vm_id)
    paths = VmPaths(hv.vm_dir(vm_id))
    paths.cycle_file(c.epoch).unlink()  # as if the seal died before its commit point
    assert hv.pending_cycle(vm_id) is None
    assert hv.tracking_status(vm_id).pending_bytes["d0"] == 1
    hv.write(vm_id, "d0", 20, b"y")
    c2 = hv.seal(vm_id)
    assert c2.trusted and c2.changed["d0"].to_pairs() == [(10, 1), (20, 1)]
    assert not paths.fleece(c.epoch, c.cycle_id, "d0").exists()
    assert not paths.fleece(c.epoch, c.cycle_id, "d0", packed=True).exists()


def test_seal_errors_and_epochs(hv: FileHypervisor) -> None:
    vm_id = make(hv)
    with pytest.raises(TrackingLost):
        hv.seal(vm_id)
    e1 = hv.start_tracking(vm_id)
    hv.write(vm_id, "d0", 0, b"1")
    c = hv.seal(vm_id)
    e2 = hv.start_tracking(vm_id)  # drops the old epoch and its unreleased cycle
    assert e1 != e2 and hv.pending_cycle(vm_id) is None
    assert not VmPaths(hv.vm_dir(vm_id)).epoch_dir(e1).exists()
    hv.release(c)  # releasing a dropped cycle is a no-op
    assert hv.tracking_status(vm_id).epoch == e2


def test_app_consistent_hooks(hv: FileHypervisor, tmp_path: Path) -> None:
    vm_id = make(hv)
    hv.start_tracking(vm_id)
    hooks = hv.vm_dir(vm_id) / "hooks"
    hooks.mkdir()
    marks = tmp_path / "marks"
    for name in ("freeze", "thaw"):
        (hooks / name).write_text(f"#!/bin/sh\necho {name} >> {marks}\n")
        (hooks / name).chmod(0o755)
    rt = hv.guest(vm_id)
    rt.vm.write("d0", 0, b"1")
    c = hv.seal(vm_id, app_consistent=True)
    assert c.consistency is Consistency.APP and marks.read_text().split() == ["freeze", "thaw"]
    assert not rt.vm.frozen
    hv.release(c)
    (hooks / "freeze").write_text("#!/bin/sh\necho nope >&2\nexit 3\n")
    c = hv.seal(vm_id, app_consistent=True)
    assert c.consistency is Consistency.CRASH and "freeze hook exited 3: nope" in c.note
    hv.release(c)
    hv.power_off(vm_id)  # clean stop: quiesced at rest
    c = hv.seal(vm_id, app_consistent=True)
    assert c.consistency is Consistency.APP
    hv.release(c)
    hv.guest(vm_id)
    hv.power_off(vm_id, force=True)
    c = hv.seal(vm_id, app_consistent=True)
    assert c.consistency is Consistency.CRASH and "uncleanly" in c.note


def test_freeze_blocks_writes_until_thaw(hv: FileHypervisor) -> None:
    vm_id = make(hv)
    rt = hv.guest(vm_id)
    rt.vm.freeze()
    done = threading.Event()

    def write() -> None:
        rt.vm.write("d0", 0, b"x")
        done.set()

    t = threading.Thread(target=write)
    t.start()
    assert not done.wait(0.2)
    rt.vm.thaw()
    assert done.wait(5)
    t.join()
    hv.power_off(vm_id)


def test_readers(hv: FileHypervisor) -> None:
    vm_id = make(hv, sizes=(8 * MiB,))
    hv.write(vm_id, "d0", 3 * MiB, b"\x01" * 4096)
    r = hv.open_live_reader(vm_id, "d0")
    assert r.size == 8 * MiB
    ext = r.data_extents()
    assert ext.total >= 4096 and ext.total < 8 * MiB
    assert any(s <= 3 * MiB < s + n for s, n in ext)
    big = np.empty(8 * MiB, np.uint8)
    r.readinto(0, big.data)
    assert int(big.sum()) == 4096
    with pytest.raises(InvalidInput):
        r.readinto(8 * MiB - 1, memoryview(bytearray(2)))
    r.close()


def test_bad_names_and_unknown_vms(hv: FileHypervisor) -> None:
    for bad in ("../x", "a/b", "..", "", ".hidden", "x" * 64):
        with pytest.raises(InvalidInput):
            hv.create_blank(VmSpec(bad, disks=(DiskSpec("d0", MiB),)))
    with pytest.raises(InvalidInput):
        hv.create_blank(VmSpec("ok", disks=(DiskSpec("../d0", MiB),)))
    assert hv.list_vms() == []
    with pytest.raises(VmNotFound):
        hv.get_vm(str(uuid.uuid4()))
    with pytest.raises(VmNotFound):
        hv.power_on("nope")
    make(hv, "dup")
    with pytest.raises(Conflict):
        make(hv, "dup")


def test_create_vm_moves_images(hv: FileHypervisor, tmp_path: Path) -> None:
    img = tmp_path / "src.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
        f.seek(4096)
        f.write(b"payload")
    ino = img.stat().st_ino
    info = hv.create_vm(VmSpec("restored", disks=(DiskSpec("d0", 2 * MiB),)), {"d0": str(img)})
    dst = hv.disk_path(info.vm_id, "d0")
    assert not img.exists() and dst.stat().st_ino == ino and dst.stat().st_size == 2 * MiB
    assert info.power is PowerState.STOPPED
    with open(dst, "rb") as f:
        f.seek(4096)
        assert f.read(7) == b"payload"
    hv.delete_vm(info.vm_id)
    hv.delete_vm(info.vm_id)
    assert hv.list_vms() == [] and not os.path.exists(dst)


def test_full_cycle_until_a_base_is_released(hv: FileHypervisor) -> None:
    vm_id = make(hv)
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    rt.vm.write("d0", 0, b"1")
    c = hv.seal(vm_id)
    assert c.changed["d0"].to_pairs() == [(0, 4 * MiB)] and "whole disks" in c.note
    hv.power_off(vm_id, force=True)
    FileVm.open(hv.vm_dir(vm_id), boot_id=str(uuid.uuid4())).close()  # host crash drops it
    c2 = hv.seal(vm_id)  # still no base on the target: whole disks again, and complete
    assert c2.trusted and c2.changed["d0"].to_pairs() == [(0, 4 * MiB)]
    hv.release(c2)
    hv.write(vm_id, "d0", 7, b"x")
    c3 = hv.seal(vm_id)
    assert c3.changed["d0"].to_pairs() == [(7, 1)]


def test_change_log_cap_follows_the_policy(hv: FileHypervisor) -> None:
    """Issue 13 part 5: the cap is derived from the policy's interval (≥ the old fixed 64 MiB,
    several intervals of 4 KiB writes at 20 MB/s) and applies from the next seal."""
    from drsite.tracking.changelog import (
        DEFAULT_MAX_BYTES,
        HEADER_SIZE,
        MAX_CAP_BYTES,
        RECORD_SIZE,
        cap_for_interval,
    )
    assert cap_for_interval(30) == DEFAULT_MAX_BYTES
    assert cap_for_interval(900) >= RECORD_SIZE * 5000 * 900 * 2   # two 15-min intervals
    assert cap_for_interval(10 ** 9) == MAX_CAP_BYTES
    vm_id = make(hv)
    hv.start_tracking(vm_id)
    cap = cap_for_interval(900)
    hv.set_change_log_limit(vm_id, cap)
    assert hv.get_vm(vm_id).name == "vm1"   # vm.json still readable, other fields kept
    hv.power_on(vm_id)
    try:
        hv.write(vm_id, "d0", 0, b"x" * 4096)
        c = hv.seal(vm_id)
        hv.release(c)
    finally:
        hv.power_off(vm_id)
    vm = FileVm.open(hv.root / "vm1", role="driver")
    try:
        assert vm._log_cap() == cap
        log = vm.disks["d0"].log
        assert log is not None and log.max_records == (cap - HEADER_SIZE) // RECORD_SIZE
    finally:
        vm.close()


def _instant_only(vm: FileVm) -> dict[str, object]:
    """A seal's instant without its commit (as if the guest died right after the hold
    ended): logs rotated, not yet fsynced or marked clean, no cycle record."""
    with vm._io_lock:
        return vm._seal_locked(Consistency.CRASH, [])


def test_a_seal_holds_writes_without_a_single_fsync(hv: FileHypervisor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Group barrier pause (issue 18): every fsync of a seal (the next logs, made ahead after
    the previous release; the sealed logs' records and CLEAN header; the directory; the cycle
    record) happens while writes flow, none while the hold keeps them waiting. The cycle is
    durable and clean all the same when seal_held returns."""
    from drsite.tracking.changelog import LogState, load_log
    vm_id, rt = tracked_guest(hv, sizes=(4 * MiB, 1 * MiB))
    paths = VmPaths(hv.vm_dir(vm_id))
    epoch = hv.tracking_status(vm_id).epoch
    assert epoch is not None
    assert paths.next_log(epoch, "d0").exists()   # made ahead at the release
    in_hold: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if rt.vm._hold is not None:
            in_hold.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for i in range(3):
        rt.vm.write("d0", i * GRANULE, b"w" * 10)
        rt.vm.hold(f"b{i}", 5.0)
        rec = rt.vm.seal_held(f"b{i}")
        assert rec["barrier"]["held"]
        assert json.loads(paths.cycle_file(epoch).read_text())["cycle_id"] == rec["cycle_id"]
        for d, names in rec["logs"].items():
            c = load_log(paths.epoch_dir(epoch) / names[-1])
            assert c.trusted and c.state is LogState.CLEAN, (d, c)
        assert rt.vm.release(rec["cycle_id"])
    monkeypatch.undo()
    assert in_hold == []
    c = hv.seal(vm_id)
    assert c.trusted and c.changed["d0"].to_pairs() == []
    hv.release(c)
    hv.power_off(vm_id)


def test_a_guest_killed_between_the_instant_and_the_commit(hv: FileHypervisor) -> None:
    """The seal's logs are renamed, not yet closed, and writes went on into the new logs: a
    process crash (same boot) finds no cycle, carries the sealed logs (open, of this boot:
    trusted after validation) into the next seal with what was written since; a host crash
    (another boot) distrusts them (a resync)."""
    for host_crash in (False, True):
        vm_id = make(hv, name=f"k{int(host_crash)}")
        hv.start_tracking(vm_id)
        rt = hv.guest(vm_id)
        base(hv, vm_id)
        rt.vm.write("d0", 10, b"a")
        rec = _instant_only(rt.vm)
        rt.vm.write("d0", 2 * GRANULE, b"b")   # after the instant: in the new active log
        rt.vm.crash()
        paths = VmPaths(hv.vm_dir(vm_id))
        assert not paths.cycle_file(str(rec["epoch"])).exists()
        vm = FileVm.open(hv.vm_dir(vm_id),
                         boot_id=str(uuid.uuid4()) if host_crash else None)
        try:
            assert vm.cycle is None
        finally:
            vm.close()
        c = hv.seal(vm_id)
        assert c.cycle_id != rec["cycle_id"]
        if host_crash:
            assert not c.trusted
        else:
            assert c.trusted and c.changed["d0"].to_pairs() == [(10, 1), (2 * GRANULE, 1)]
        hv.release(c)


def test_next_logs_made_ahead_are_dropped_at_open_and_take_the_cap_in_force(
        hv: FileHypervisor) -> None:
    from drsite.tracking.changelog import HEADER_SIZE, RECORD_SIZE, cap_for_interval
    vm_id, rt = tracked_guest(hv)
    paths = VmPaths(hv.vm_dir(vm_id))
    epoch = hv.tracking_status(vm_id).epoch
    assert epoch is not None and paths.next_log(epoch, "d0").exists()
    cap = cap_for_interval(900)
    hv.set_change_log_limit(vm_id, cap)   # after the next logs were made
    rt.vm.write("d0", 0, b"x")
    c = hv.seal(vm_id)
    log = rt.vm.disks["d0"].log
    assert log is not None and log.max_records == (cap - HEADER_SIZE) // RECORD_SIZE
    hv.release(c)
    assert paths.next_log(epoch, "d0").exists()
    rt.vm.write("d0", 5, b"y")
    rt.vm.crash()   # an active log and a next one: the next one goes at the open
    vm = FileVm.open(hv.vm_dir(vm_id), role="driver")
    try:
        assert not paths.next_log(epoch, "d0").exists()
    finally:
        vm.close()
    c = hv.seal(vm_id)
    assert c.trusted and c.changed["d0"].to_pairs() == [(5, 1)]
    hv.release(c)


def test_a_stale_pid_file_naming_another_process_is_never_signalled(hv: FileHypervisor) -> None:
    """A guest that died leaves its pid file; its pid may since name any process. With the VM's
    lock held by someone else (not a guest), the VM still counts as stopped, and power_off
    returns without signalling that process (it used to SIGTERM it, then refuse to go on)."""
    import subprocess

    from drsite.fsutil import flock_exclusive

    vm_id = make(hv)
    paths = VmPaths(hv.vm_dir(vm_id))
    other = subprocess.Popen(["sleep", "60"])
    try:
        paths.pid.write_text(f"{other.pid}\n")
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert flock_exclusive(fd, 0)
            assert hv.get_vm(vm_id).power is PowerState.STOPPED
            hv.power_off(vm_id)
            hv.power_off(vm_id, force=True)
        finally:
            os.close(fd)
        assert other.poll() is None, "an unrelated process was signalled"
    finally:
        other.kill()
        other.wait()


def test_slot_index_shared_by_reading_threads(tmp_path: Path) -> None:
    """A frozen view's read-ahead threads share its slot index while the guest appends to it:
    every block published (its entry appended, then its byte set) is found at its slot. Two
    loads at once once counted the same entries twice and skipped the ones after them."""
    from drsite.hypervisors.file.cbw import SLOT_ENTRY, SlotIndex

    path = tmp_path / "x.slots"
    wfd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    rfd = os.open(path, os.O_RDONLY)
    published: list[int] = []   # blocks whose entry is in the file (the "bitmap")
    errors: list[BaseException] = []
    done = threading.Event()
    n = 20_000
    idx = SlotIndex(rfd, n * 7 + 4)

    def guest() -> None:
        for s in range(n):
            os.pwrite(wfd, np.array([s * 7 + 3 + 1], "<i8").tobytes(), s * SLOT_ENTRY)
            published.append(s)
        done.set()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not done.is_set() or r.random() < 0.5:
                if published:
                    s = published[-1 - r.randrange(min(len(published), 50))]
                    assert idx.offset(s * 7 + 3, CBW_BLOCK) == s * CBW_BLOCK
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    guest()
    for t in threads:
        t.join()
    os.close(wfd)
    os.close(rfd)
    assert not errors, errors[0]


def test_packed_view_data_extents_while_the_guest_marks_blocks(hv: FileHypervisor) -> None:
    """The initial copy asks a packed view for its data extents while the guest (another
    process) keeps setting bitmap bytes: numpy's nonzero over the live map raised "number of
    non-zero array elements changed", and the traceback's view then kept the map from closing
    (the demo's first failure with the packed fleece)."""
    import subprocess
    import sys
    import time

    vm_id = make(hv, sizes=(64 * MiB,))
    hv.start_tracking(vm_id)
    c = hv.seal(vm_id)   # the first cycle: the whole disk is protected
    bitmap = VmPaths(hv.vm_dir(vm_id)).cbw_bitmap(c.epoch, c.cycle_id, "d0")
    marker = subprocess.Popen([sys.executable, "-c", (   # the guest's stores, as fast as it can
        "import mmap, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "m = mmap.mmap(fd, os.fstat(fd).st_size)\n"
        "end, i = time.monotonic() + 3, 0\n"
        "while time.monotonic() < end:\n"
        "    m[i % len(m)] = 1 - m[i % len(m)]\n"
        "    i += 7919\n"), str(bitmap)])
    try:
        time.sleep(0.3)
        for _ in range(40):
            r = hv.open_cycle_reader(c, "d0")
            try:
                r.data_extents()
            finally:
                r.close()
    finally:
        marker.wait()
    hv.release(c)


def test_slot_index_memory_follows_the_slots_not_the_disk(tmp_path: Path) -> None:
    """A reader's slot index costs per listed slot, not per block of the disk: 50,000
    scattered preserved blocks of a 1 TiB disk (a per-block table touched a page for nearly
    each: ~200 MiB). Every block is found at its slot through the merges of the two levels; a
    hole and a damaged entry name no block; a block listed twice maps to one of its slots."""
    import tracemalloc

    from drsite.hypervisors.file.cbw import SLOT_ENTRY, SlotIndex

    disk_blocks = (1 << 40) // CBW_BLOCK
    rng = np.random.default_rng(7)
    blocks = rng.choice(disk_blocks, 50_000, replace=False).astype(np.int64)
    entries = blocks + 1
    entries[100] = 0                      # a hole (a copy that failed before its entry)
    entries[200] = disk_blocks + 5        # damage: no block of this disk
    entries[300] = blocks[299] + 1        # block 299 listed twice (slots 299 and 300)
    path = tmp_path / "x.slots"
    wfd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    rfd = os.open(path, os.O_RDONLY)
    tracemalloc.start()
    try:
        idx = SlotIndex(rfd, disk_blocks)
        at = 0
        for chunk in np.array_split(np.arange(entries.size), 37):   # the guest appends
            os.pwrite(wfd, entries[chunk].astype("<i8").tobytes(), at * SLOT_ENTRY)
            at += chunk.size
            last = int(chunk[-1])
            if entries[last] == blocks[last] + 1:
                assert idx.offset(int(blocks[last]), CBW_BLOCK) == last * CBW_BLOCK
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 8 * MiB, f"slot index peaked at {peak / MiB:.1f} MiB"
        for s in rng.choice(entries.size, 2_000, replace=False).tolist():
            if s in (100, 200, 300):
                continue
            assert idx.offset(int(blocks[s]), CBW_BLOCK) == s * CBW_BLOCK
        assert idx.offset(int(blocks[299]), CBW_BLOCK) in (299 * CBW_BLOCK, 300 * CBW_BLOCK)
        assert idx.listed == entries.size - 2
        with pytest.raises(TrackingLost):
            idx.offset(int(blocks[100]), CBW_BLOCK)   # its only entry is a hole
    finally:
        tracemalloc.stop()
        os.close(wfd)
        os.close(rfd)
