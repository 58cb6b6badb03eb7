"""Copy-on-write disks of the file driver (the backing of test-failover VMs)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from drsite.core.errors import InvalidInput
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.hypervisors.file import FileHypervisor, FileVm
from drsite.hypervisors.file.layout import GRANULE, VmPaths
from drsite.store.digest import file_digest, image_digest

MiB = 1 << 20


def backing_image(path: Path, size: int, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    data = bytearray(size)
    for off in (0, 3 * GRANULE + 100, size - 5000):
        chunk = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
        data[off:off + 5000] = chunk
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, 3 * GRANULE + 100, size - 5000):
            os.pwrite(f.fileno(), data[off:off + 5000], off)
    return bytes(data)


def read_all(hv: FileHypervisor, vm_id: str, disk: str) -> bytes:
    r = hv.open_live_reader(vm_id, disk)
    try:
        buf = bytearray(r.size)
        r.readinto(0, memoryview(buf))
        return bytes(buf)
    finally:
        r.close()


def test_cow_reads_writes_and_never_touches_backing(tmp_path: Path) -> None:
    size = 2 * MiB
    b = tmp_path / "base.img"
    expect = bytearray(backing_image(b, size))
    digest = file_digest(b)
    hv = FileHypervisor(tmp_path / "vms")
    vm = hv.create_vm_cow(VmSpec("t1", nics=(Nic("test-net", "52:54:00:00:00:09", "10.9.0.11"),),
                                 disks=(DiskSpec("d0", size),)), {"d0": b})
    assert read_all(hv, vm.vm_id, "d0") == bytes(expect)
    cfg = json.loads((tmp_path / "vms" / "t1" / "vm.json").read_text())
    assert cfg["disks"][0]["backing"] == str(b.absolute())
    # partial writes: inside a backed granule, across a granule boundary, in a hole
    writes = [(3 * GRANULE + 50, b"A" * 10), (2 * GRANULE - 7, b"B" * 20), (10 * GRANULE, b"C")]
    rt = hv.guest(vm.vm_id)
    for off, data in writes:
        rt.vm.write("d0", off, data)
        expect[off:off + len(data)] = data
    rt.vm.write("d0", 3 * GRANULE + 55, b"D" * 3)  # an already allocated granule
    expect[3 * GRANULE + 55:3 * GRANULE + 58] = b"DDD"
    assert rt.vm.read("d0", 0, size) == bytes(expect)
    assert read_all(hv, vm.vm_id, "d0") == bytes(expect)  # reader from another "process" view
    hv.power_off(vm.vm_id)
    assert file_digest(b) == digest  # backing untouched
    alloc = (tmp_path / "vms" / "t1" / "d0.alloc").read_bytes()
    assert sorted(np.flatnonzero(np.frombuffer(alloc, np.uint8)).tolist()) == [1, 2, 3, 10]
    # persisted: a reopened VM (driver role, stopped) reads the same
    with FileVm.open(tmp_path / "vms" / "t1", role="driver") as fvm:
        assert fvm.read("d0", 0, size) == bytes(expect)
    hv.write(vm.vm_id, "d0", size - 10, b"E" * 10)  # stopped: direct write under the lock
    expect[size - 10:] = b"E" * 10
    assert image_digest(hv.open_live_reader(vm.vm_id, "d0")) == image_digest(
        _Bytes(bytes(expect)))
    hv.delete_vm(vm.vm_id)
    assert b.exists() and file_digest(b) == digest


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


def test_backing_shorter_than_disk_reads_zero_extended(tmp_path: Path) -> None:
    b = tmp_path / "small.img"
    b.write_bytes(b"\x07" * 1000)
    hv = FileHypervisor(tmp_path / "vms")
    vm = hv.create_vm_cow(VmSpec("t2", disks=(DiskSpec("d0", 4 * GRANULE),)), {"d0": b})
    data = read_all(hv, vm.vm_id, "d0")
    assert data[:1000] == b"\x07" * 1000 and not any(data[1000:])
    hv.write(vm.vm_id, "d0", 900, b"z" * 200)
    data = read_all(hv, vm.vm_id, "d0")
    assert data[:900] == b"\x07" * 900 and data[900:1100] == b"z" * 200 and not any(data[1100:])


def test_tracking_is_refused_on_cow_disks(tmp_path: Path) -> None:
    b = tmp_path / "b.img"
    b.write_bytes(bytes(GRANULE))
    hv = FileHypervisor(tmp_path / "vms")
    vm = hv.create_vm_cow(VmSpec("t3", disks=()), {"d0": b})  # sizes from the images
    assert vm.disks == (DiskSpec("d0", GRANULE),)
    with pytest.raises(InvalidInput, match="copy-on-write") as e:
        hv.start_tracking(vm.vm_id)
    assert "not replicated" in e.value.hint
    assert hv.disk_backing(vm.vm_id) == {"d0": b.absolute()}


def test_create_vm_cow_validates(tmp_path: Path) -> None:
    hv = FileHypervisor(tmp_path / "vms")
    big = tmp_path / "big.img"
    big.write_bytes(b"x" * 2 * GRANULE)
    with pytest.raises(InvalidInput, match="larger"):
        hv.create_vm_cow(VmSpec("t4", disks=(DiskSpec("d0", GRANULE),)), {"d0": big})
    with pytest.raises(InvalidInput, match="not a file"):
        hv.create_vm_cow(VmSpec("t4", disks=(DiskSpec("d0", GRANULE),)), {"d0": tmp_path / "no"})
    with pytest.raises(InvalidInput, match="do not match"):
        hv.create_vm_cow(VmSpec("t4", disks=(DiskSpec("d1", 4 * GRANULE),)), {"d0": big})
    assert hv.list_vms() == []


def test_cow_creation_is_size_independent(tmp_path: Path) -> None:
    hv = FileHypervisor(tmp_path / "vms")
    times: dict[int, float] = {}
    for size in (64 * MiB, 4096 * MiB):
        b = tmp_path / f"b{size}.img"
        with open(b, "wb") as f:
            f.truncate(size)
            os.pwrite(f.fileno(), b"data" * 1024, size // 2)
        best = float("inf")
        for i in range(3):
            t0 = time.perf_counter()
            vm = hv.create_vm_cow(VmSpec(f"s{size}-{i}", disks=(DiskSpec("d0", size),)), {"d0": b})
            best = min(best, time.perf_counter() - t0)
            overlay = VmPaths(hv.vm_dir(vm.vm_id)).disk("d0")
            assert os.stat(overlay).st_blocks == 0  # nothing copied, nothing allocated
        times[size] = best
    assert times[4096 * MiB] < 0.25
    assert times[4096 * MiB] < 5 * times[64 * MiB] + 0.02, times
