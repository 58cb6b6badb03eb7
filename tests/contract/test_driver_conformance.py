"""Conformance suite for :class:`~drsite.hypervisors.contract.HypervisorDriver`.

Every driver joins by adding a harness factory to ``HARNESSES``: it yields a :class:`Harness`
with the driver, a way to make a stopped VM with N disks, a way to do tracked writes to a
running VM (as its guest OS would), and a way to get a fresh driver object (an engine restart).
Assertions hold for any driver: changed extents may be widened to the driver's granularity
(``granule``) but never miss a write. The suite covers the whole contract: what the
replication engine uses (inventory, power, tracking cycles, readers) and what failover uses
(``find_vm``, ``create_vm``, ``create_vm_cow``, ``delete_vm``). The in-memory driver of the
unit tests runs it too, so a fake never drifts from the real drivers.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drsite.core.errors import Conflict, InvalidInput, TrackingLost, VmNotFound
from drsite.core.extents import ExtentList
from drsite.core.model import DiskSpec, Nic, PowerState, SealedCycle, TrackingState, VmSpec
from drsite.hypervisors.contract import DiskReader, HypervisorDriver
from drsite.hypervisors.file import FileHypervisor
from drsite.hypervisors.qemu.tools import missing_tools
from drsite.hypervisors.testing.memory import MemoryHypervisor

MiB = 1 << 20


@dataclass
class Harness:
    driver: HypervisorDriver
    make_vm: Callable[[str, list[int]], str]  # name, disk sizes → vm_id of a stopped VM
    write: Callable[[str, str, int, bytes], None]  # tracked write to a running VM
    fresh_driver: Callable[[], HypervisorDriver]
    scratch: Path
    granule: int  # the driver's change-tracking granularity (1 = exact)


def file_harness(tmp_path: Path) -> Iterator[Harness]:
    hv = FileHypervisor(tmp_path / "vms")

    def make_vm(name: str, sizes: list[int]) -> str:
        spec = VmSpec(name, disks=tuple(DiskSpec(f"disk{i}", s) for i, s in enumerate(sizes)))
        return hv.create_blank(spec).vm_id

    yield Harness(hv, make_vm, hv.write, lambda: FileHypervisor(hv.root), tmp_path, 1)
    for vm in hv.list_vms():
        hv.delete_vm(vm.vm_id)


def require_qemu() -> None:
    """Skip without QEMU (fail instead when DRSITE_TEST_QEMU=1, as in CI)."""
    missing = missing_tools(("qemu-img", "qemu-storage-daemon", "qemu-system-x86_64"))
    if not missing:
        return
    msg = (f"QEMU tools missing: {', '.join(missing)} (apt-get install qemu-utils "
           "qemu-system-common qemu-system-x86)")
    if os.environ.get("DRSITE_TEST_QEMU") == "1":
        pytest.fail("DRSITE_TEST_QEMU=1 but " + msg)
    pytest.skip(msg)


def qemu_harness(tmp_path: Path) -> Iterator[Harness]:
    require_qemu()
    from drsite.hypervisors.qemu.driver import QemuHypervisor
    from drsite.hypervisors.qemu.tracking import GRANULARITY

    hv = QemuHypervisor(tmp_path / "vms")

    def make_vm(name: str, sizes: list[int]) -> str:
        spec = VmSpec(name, memory_mib=64,
                      disks=tuple(DiskSpec(f"disk{i}", s) for i, s in enumerate(sizes)))
        return hv.create_blank(spec).vm_id

    try:
        yield Harness(hv, make_vm, hv.write, lambda: QemuHypervisor(hv.root), tmp_path,
                      GRANULARITY)
    finally:
        for vm in hv.list_vms():
            hv.delete_vm(vm.vm_id)
        hv.close()


def memory_harness(tmp_path: Path) -> Iterator[Harness]:
    hv = MemoryHypervisor()

    def make_vm(name: str, sizes: list[int]) -> str:
        spec = VmSpec(name, disks=tuple(DiskSpec(f"disk{i}", s) for i, s in enumerate(sizes)))
        return hv.create_blank(spec).vm_id

    # the host's state lives in the driver object: an engine restart keeps the same one
    yield Harness(hv, make_vm, hv.write, lambda: hv, tmp_path, 1)


HARNESSES = {"file": file_harness, "memory": memory_harness, "qemu": qemu_harness}


@pytest.fixture(params=sorted(HARNESSES))
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    yield from HARNESSES[request.param](tmp_path)


def read(reader: DiskReader, off: int, n: int) -> bytes:
    buf = bytearray(n)
    reader.readinto(off, memoryview(buf))
    return bytes(buf)


def assert_covers(h: Harness, cycle: SealedCycle, disk: str, writes: list[tuple[int, int]]) -> None:
    w = ExtentList.of(writes)
    changed = cycle.changed[disk]
    assert len(w.subtract(changed)) == 0, "a write is missing from the changed extents"
    widened = w.align(h.granule, cycle.disk_sizes[disk]) if h.granule > 1 else w
    assert len(changed.subtract(widened)) == 0, "changed extents list bytes nobody wrote"


def test_implements_the_contract(h: Harness) -> None:
    assert isinstance(h.driver, HypervisorDriver)  # every method of the protocol is there


def test_inventory(h: Harness) -> None:
    vm_id = h.make_vm("inv", [MiB, 2 * MiB])
    info = h.driver.get_vm(vm_id)
    assert info.name == "inv" and info.power is PowerState.STOPPED
    assert [(d.disk_id, d.size) for d in info.disks] == [("disk0", MiB), ("disk1", 2 * MiB)]
    assert vm_id in [v.vm_id for v in h.driver.list_vms()]
    assert h.driver.find_vm("inv") == info
    missing = str(uuid.uuid4())
    for call in (lambda: h.driver.get_vm(missing), lambda: h.driver.power_on(missing),
                 lambda: h.driver.power_off(missing),
                 lambda: h.driver.start_tracking(missing), lambda: h.driver.seal(missing),
                 lambda: h.driver.tracking_status(missing), lambda: h.driver.pending_cycle(missing),
                 lambda: h.driver.open_live_reader(missing, "disk0"),
                 lambda: h.driver.find_vm("no-such-vm")):
        with pytest.raises(VmNotFound):
            call()
    with pytest.raises(InvalidInput):
        h.driver.find_vm("../etc")
    h.driver.delete_vm(missing)  # idempotent: nothing to do


def test_power_is_idempotent(h: Harness) -> None:
    vm_id = h.make_vm("pwr", [MiB])
    h.driver.power_off(vm_id)
    h.driver.power_on(vm_id)
    h.driver.power_on(vm_id)
    assert h.driver.get_vm(vm_id).power is PowerState.RUNNING
    h.driver.power_off(vm_id)
    h.driver.power_off(vm_id)
    assert h.driver.get_vm(vm_id).power is PowerState.STOPPED
    h.driver.power_on(vm_id)
    h.driver.power_off(vm_id, force=True)
    assert h.driver.get_vm(vm_id).power is PowerState.STOPPED


def test_tracking_cycle(h: Harness) -> None:
    vm_id = h.make_vm("trk", [4 * MiB, MiB])
    assert h.driver.tracking_status(vm_id).state is TrackingState.NOT_STARTED
    with pytest.raises(TrackingLost):
        h.driver.seal(vm_id)
    epoch = h.driver.start_tracking(vm_id)
    h.driver.power_on(vm_id)
    first = h.driver.seal(vm_id)  # the epoch's base: whole disks (the target has nothing yet)
    assert first.trusted and first.epoch == epoch
    assert {d: e.to_pairs() for d, e in first.changed.items()} == {"disk0": [(0, 4 * MiB)],
                                                                  "disk1": [(0, MiB)]}
    h.driver.release(first)
    writes = [(0, 512), (70_000, 3000), (3 * MiB + 1, 100)]
    for off, n in writes:
        h.write(vm_id, "disk0", off, bytes([7]) * n)
    st = h.driver.tracking_status(vm_id)
    assert st.state is TrackingState.ACTIVE and st.epoch == epoch
    assert st.pending_bytes["disk0"] >= 3612 and st.pending_bytes["disk1"] == 0
    c = h.driver.seal(vm_id)
    assert c.vm_id == vm_id and c.epoch == epoch and c.trusted
    assert c.disk_sizes == {"disk0": 4 * MiB, "disk1": MiB}
    assert_covers(h, c, "disk0", writes)
    assert len(c.changed["disk1"]) == 0
    with pytest.raises(Conflict):
        h.driver.seal(vm_id)
    h.write(vm_id, "disk1", 10, b"x")
    h.driver.release(c)
    h.driver.release(c)  # idempotent
    assert h.driver.pending_cycle(vm_id) is None
    c2 = h.driver.seal(vm_id)
    assert_covers(h, c2, "disk1", [(10, 1)])
    assert len(c2.changed["disk0"]) == 0
    h.driver.release(c2)
    h.driver.power_off(vm_id)


@pytest.mark.parametrize("first", [True, False], ids=["base-cycle", "delta-cycle"])
def test_frozen_view_stable_under_concurrent_writes(h: Harness, first: bool) -> None:
    size = 2 * MiB
    vm_id = h.make_vm("frz", [size])
    h.driver.start_tracking(vm_id)
    h.driver.power_on(vm_id)
    if not first:
        h.driver.release(h.driver.seal(vm_id))
    rng = random.Random(1)
    writes = [(rng.randrange(0, size - 20_000), rng.randrange(1, 20_000)) for _ in range(30)]
    for off, n in writes:
        h.write(vm_id, "disk0", off, rng.randbytes(n))
    live = h.driver.open_live_reader(vm_id, "disk0")
    before = read(live, 0, size)
    c = h.driver.seal(vm_id)
    if first:
        assert c.changed["disk0"].to_pairs() == [(0, size)]
    else:
        assert_covers(h, c, "disk0", writes)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        r = random.Random(2)
        try:
            while not stop.is_set():
                off, n = r.choice(writes)
                h.write(vm_id, "disk0", off, r.randbytes(n))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        view = h.driver.open_cycle_reader(c, "disk0")
        for _ in range(5):
            for s, n in c.changed["disk0"]:
                assert read(view, s, n) == before[s:s + n]
        view.close()
    finally:
        stop.set()
        t.join()
    assert not errors
    assert read(live, 0, size) != before
    live.close()
    h.driver.release(c)
    h.driver.power_off(vm_id)


def test_pending_cycle_survives_engine_restart(h: Harness) -> None:
    vm_id = h.make_vm("pend", [MiB])
    h.driver.start_tracking(vm_id)
    h.driver.power_on(vm_id)
    h.driver.release(h.driver.seal(vm_id))
    h.write(vm_id, "disk0", 4096, b"before")
    c = h.driver.seal(vm_id)
    h.write(vm_id, "disk0", 4096, b"after!")
    d2 = h.fresh_driver()
    p = d2.pending_cycle(vm_id)
    assert p is not None and p.cycle_id == c.cycle_id
    assert p.changed["disk0"].to_pairs() == c.changed["disk0"].to_pairs()
    r = d2.open_cycle_reader(p, "disk0")
    assert read(r, 4096, 6) == b"before"
    r.close()
    d2.release(p)
    assert h.driver.pending_cycle(vm_id) is None
    h.driver.power_off(vm_id)


def test_start_tracking_drops_old_cycle(h: Harness) -> None:
    vm_id = h.make_vm("epo", [MiB])
    e1 = h.driver.start_tracking(vm_id)
    h.driver.power_on(vm_id)
    h.write(vm_id, "disk0", 0, b"1")
    h.driver.seal(vm_id)
    e2 = h.driver.start_tracking(vm_id)
    assert e1 != e2 and h.driver.pending_cycle(vm_id) is None
    st = h.driver.tracking_status(vm_id)
    assert st.state is TrackingState.ACTIVE and st.epoch == e2 and st.pending_bytes["disk0"] == 0
    h.driver.power_off(vm_id)


def test_create_blank_vm(h: Harness) -> None:
    spec = VmSpec("blank", vcpus=2, memory_mib=64,
                  nics=(Nic("prod", "52:54:00:00:00:31", "10.0.0.31"),),
                  disks=(DiskSpec("d0", 2 * MiB), DiskSpec("d1", MiB)))
    info = h.driver.create_blank(spec)
    assert info.power is PowerState.STOPPED and info.name == "blank"
    assert (info.vcpus, info.memory_mib) == (2, 64)
    assert [(n.network, n.ip) for n in info.nics] == [("prod", "10.0.0.31")]
    assert [(d.disk_id, d.size) for d in h.driver.get_vm(info.vm_id).disks] == [
        ("d0", 2 * MiB), ("d1", MiB)]
    r = h.driver.open_live_reader(info.vm_id, "d0")
    assert r.size == 2 * MiB and read(r, 0, 4096) == bytes(4096) and read(r, MiB, 16) == bytes(16)
    assert r.data_extents().total < MiB  # sparse: nothing written yet
    r.close()
    with pytest.raises(Conflict):
        h.driver.create_blank(VmSpec("blank", disks=(DiskSpec("d0", MiB),)))
    for bad in (VmSpec("bad name!", disks=(DiskSpec("d0", MiB),)),
                VmSpec("dup", disks=(DiskSpec("d0", MiB), DiskSpec("d0", MiB))),
                VmSpec("zero", disks=(DiskSpec("d0", 0),))):
        with pytest.raises(InvalidInput):
            h.driver.create_blank(bad)
    assert sorted(v.name for v in h.driver.list_vms()) == ["blank"]  # nothing left behind
    h.driver.power_on(info.vm_id)
    assert h.driver.get_vm(info.vm_id).power is PowerState.RUNNING
    h.driver.delete_vm(info.vm_id)
    with pytest.raises(VmNotFound):
        h.driver.find_vm("blank")


def test_create_and_delete_vm(h: Harness) -> None:
    img = h.scratch / "img0.raw"
    with open(img, "wb") as f:
        f.truncate(MiB)
        f.seek(65536)
        f.write(b"hello")
    info = h.driver.create_vm(VmSpec("made", disks=(DiskSpec("disk0", MiB),)), {"disk0": str(img)})
    assert info.power is PowerState.STOPPED and h.driver.get_vm(info.vm_id).name == "made"
    r = h.driver.open_live_reader(info.vm_id, "disk0")
    assert r.size == MiB and read(r, 65536, 5) == b"hello"
    ext = r.data_extents()
    assert len(ExtentList.of([(65536, 5)]).subtract(ext)) == 0
    r.close()
    other = h.scratch / "img1.raw"
    other.write_bytes(b"\0" * 4096)
    with pytest.raises(Conflict):
        h.driver.create_vm(VmSpec("made", disks=(DiskSpec("disk0", MiB),)), {"disk0": str(other)})
    h.driver.power_on(info.vm_id)
    h.driver.delete_vm(info.vm_id)
    h.driver.delete_vm(info.vm_id)
    with pytest.raises(VmNotFound):
        h.driver.get_vm(info.vm_id)
    assert os.path.exists(other)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_image(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)
    return path


def test_find_vm_follows_create_and_delete(h: Harness) -> None:
    vm_id = h.make_vm("findme", [MiB])
    other = h.make_vm("other", [MiB])
    found = h.driver.find_vm("findme")
    assert found.vm_id == vm_id and found.power is PowerState.STOPPED
    h.driver.power_on(vm_id)
    assert h.driver.find_vm("findme").power is PowerState.RUNNING
    h.driver.delete_vm(vm_id)
    with pytest.raises(VmNotFound):
        h.driver.find_vm("findme")
    assert h.driver.find_vm("other").vm_id == other


def test_create_vm_sizes_and_bad_input(h: Harness) -> None:
    small = raw_image(h.scratch / "small.raw", 64 * 1024, {4096: b"tail-extended"})
    info = h.driver.create_vm(VmSpec("grown", disks=(DiskSpec("disk0", MiB),)),
                              {"disk0": str(small)})
    r = h.driver.open_live_reader(info.vm_id, "disk0")
    assert r.size == MiB and read(r, 4096, 13) == b"tail-extended"
    assert read(r, 64 * 1024, MiB - 64 * 1024) == bytes(MiB - 64 * 1024)  # zero-extended
    r.close()
    sized = raw_image(h.scratch / "sized.raw", 2 * MiB, {MiB: b"own size"})
    info2 = h.driver.create_vm(VmSpec("imgsize"), {"disk0": str(sized)})  # no spec.disks
    assert [(d.disk_id, d.size) for d in info2.disks] == [("disk0", 2 * MiB)]
    r = h.driver.open_live_reader(info2.vm_id, "disk0")
    assert read(r, MiB, 8) == b"own size"
    r.close()
    big = raw_image(h.scratch / "big.raw", 2 * MiB, {0: b"x"})
    before = digest(big)
    for spec, images in (
            (VmSpec("toobig", disks=(DiskSpec("disk0", MiB),)), {"disk0": str(big)}),
            (VmSpec("wrongids", disks=(DiskSpec("disk0", 2 * MiB),)), {"disk9": str(big)}),
            (VmSpec("bad name!", disks=(DiskSpec("disk0", 2 * MiB),)), {"disk0": str(big)})):
        with pytest.raises(InvalidInput):
            h.driver.create_vm(spec, images)
        assert digest(big) == before  # refused before the image was touched
    with pytest.raises(VmNotFound):
        h.driver.find_vm("toobig")
    for vm in (info, info2):
        h.driver.delete_vm(vm.vm_id)


def test_create_vm_cow_never_writes_its_backing(h: Harness) -> None:
    size = 2 * MiB
    base = raw_image(h.scratch / "base.raw", MiB, {0: b"boot", 300_000: b"data" * 1000})
    before = digest(base)
    info = h.driver.create_vm_cow(VmSpec("cowvm", disks=(DiskSpec("disk0", size),)),
                                  {"disk0": base})
    assert info.power is PowerState.STOPPED and info.name == "cowvm"
    assert [(d.disk_id, d.size) for d in info.disks] == [("disk0", size)]
    assert h.driver.find_vm("cowvm").vm_id == info.vm_id
    r = h.driver.open_live_reader(info.vm_id, "disk0")
    assert r.size == size
    assert read(r, 0, MiB) == base.read_bytes()
    assert read(r, MiB, MiB) == bytes(MiB)  # a smaller backing reads zero-extended
    assert len(ExtentList.of([(0, 4), (300_000, 4000)]).subtract(r.data_extents())) == 0
    r.close()
    h.driver.power_on(info.vm_id)
    h.write(info.vm_id, "disk0", 0, b"BOOT")
    h.write(info.vm_id, "disk0", MiB + 10, b"past the backing")
    r = h.driver.open_live_reader(info.vm_id, "disk0")
    assert read(r, 0, 8) == b"BOOTdata"[:4] + base.read_bytes()[4:8]
    assert read(r, 300_000, 4) == b"data"
    assert read(r, MiB + 10, 16) == b"past the backing"
    r.close()
    assert digest(base) == before
    with pytest.raises(Conflict):
        h.driver.create_vm_cow(VmSpec("cowvm", disks=(DiskSpec("disk0", size),)),
                               {"disk0": base})
    h.driver.delete_vm(info.vm_id)
    with pytest.raises(VmNotFound):
        h.driver.get_vm(info.vm_id)
    assert digest(base) == before  # delete removes the VM's own storage only
    # the images' sizes when the spec names no disks
    own = h.driver.create_vm_cow(VmSpec("cowown"), {"disk0": base})
    assert [(d.disk_id, d.size) for d in own.disks] == [("disk0", MiB)]
    h.driver.delete_vm(own.vm_id)
    assert digest(base) == before


def test_create_vm_cow_bad_input(h: Harness) -> None:
    base = raw_image(h.scratch / "base.raw", 2 * MiB, {0: b"x"})
    for spec, backing in (
            (VmSpec("small", disks=(DiskSpec("disk0", MiB),)), {"disk0": base}),
            (VmSpec("ids", disks=(DiskSpec("disk0", 2 * MiB),)), {"disk1": base}),
            (VmSpec("nofile", disks=(DiskSpec("disk0", 2 * MiB),)),
             {"disk0": h.scratch / "missing.raw"}),
            (VmSpec("adir", disks=(DiskSpec("disk0", 2 * MiB),)), {"disk0": h.scratch})):
        with pytest.raises(InvalidInput):
            h.driver.create_vm_cow(spec, backing)
        with pytest.raises(VmNotFound):
            h.driver.find_vm(spec.name)
