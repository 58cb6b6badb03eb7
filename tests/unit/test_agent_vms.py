"""The agent's VM lifecycle commands (``agent/vms.py``) on the real file driver: create with
disks, NICs and a workload, import (copy or move) from the import directory only, power and
delete; a re-delivered command finds the VM it made, a name taken before is refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.agent.link import Command
from drsite.agent.vms import VmCommands, lane_of
from drsite.core.errors import Conflict, InvalidInput, VmNotFound
from drsite.core.model import PowerState
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.testing.memory import MemoryHypervisor

MiB = 1 << 20


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[FileHypervisor]:
    h = FileHypervisor(tmp_path / "vms")
    yield h
    for vm in h.list_vms():
        h.delete_vm(vm.vm_id)


@pytest.fixture
def vms(hv: FileHypervisor, tmp_path: Path) -> VmCommands:
    (tmp_path / "import").mkdir()
    return VmCommands(hv, tmp_path / "agent", tmp_path / "import")


def cmd(kind: str, cid: str = "c-1", **args: object) -> Command:
    return Command(cid, kind, "", dict(args))


def create_args(name: str = "app-01", **kw: object) -> dict[str, object]:
    return {"name": name, "vcpus": 2, "memory_mib": 256,
            "nics": [{"network": "prod", "ip": "10.0.0.5", "mac": "52:54:00:00:00:05"}],
            "disks": [{"disk_id": "d0", "size": 4 * MiB}, {"disk_id": "d1", "size": 2 * MiB}],
            **kw}


def test_create_start_and_a_redelivered_create(vms: VmCommands, hv: FileHypervisor) -> None:
    c = cmd("vm_create", **create_args(workload={"rate": 64 * 1024, "io_size": 4096},
                                       start=True))
    out = vms.handle(c)["vm"]
    assert out["name"] == "app-01" and out["power"] == "running" and out["vcpus"] == 2
    assert [(d["disk_id"], d["size"]) for d in out["disks"]] == [("d0", 4 * MiB), ("d1", 2 * MiB)]
    assert out["nics"][0]["ip"] == "10.0.0.5"
    status = hv.guest_status(out["vm_id"])
    assert status is not None and status.get("workload")  # the guest writes
    # the same command again (an agent restart re-delivered it): the same VM, nothing new
    assert vms.handle(c)["vm"]["vm_id"] == out["vm_id"]
    assert len(hv.list_vms()) == 1
    # another command for a name already taken: refused, with the command to free it
    with pytest.raises(Conflict) as e:
        vms.handle(cmd("vm_create", "c-2", **create_args()))
    assert "drsite vms delete app-01" in (e.value.hint or "")
    assert lane_of(c) == "vm:app-01"


def test_stop_start_delete_are_idempotent(vms: VmCommands, hv: FileHypervisor) -> None:
    vm_id = vms.handle(cmd("vm_create", **create_args(start=True)))["vm"]["vm_id"]
    for _ in range(2):
        assert vms.handle(cmd("vm_stop", "s", vm_id=vm_id, timeout_s=10))["vm"]["power"] \
            == "stopped"
    assert hv.get_vm(vm_id).power is PowerState.STOPPED
    assert vms.handle(cmd("vm_start", "t", vm_id=vm_id))["vm"]["power"] == "running"
    for _ in range(2):
        assert vms.handle(cmd("vm_delete", "d", vm_id=vm_id)) == {"vm": None, "deleted": vm_id}
    with pytest.raises(VmNotFound):
        hv.get_vm(vm_id)
    with pytest.raises(VmNotFound):
        vms.handle(cmd("vm_start", "u", vm_id=vm_id))


def test_bad_arguments_are_refused_before_anything_is_made(vms: VmCommands,
                                                           hv: FileHypervisor) -> None:
    for args in (create_args(name="bad name"), create_args(disks=[]),
                 create_args(disks=[{"disk_id": "d0", "size": 0}]),
                 create_args(vcpus=0), create_args(workload={"rate": -1}),
                 {"vcpus": 1}):
        with pytest.raises(InvalidInput):
            vms.handle(cmd("vm_create", "x", **args))
    with pytest.raises(InvalidInput):
        vms.handle(cmd("vm_stop", "y"))
    assert hv.list_vms() == []


def test_import_copies_or_moves_from_the_import_directory_only(
        vms: VmCommands, hv: FileHypervisor, tmp_path: Path) -> None:
    imp = tmp_path / "import"
    img = imp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"imported data")
    out = vms.handle(cmd("vm_import", "i1", name="imp", disks=[{"disk_id": "d0",
                                                               "path": "disk.img"}]))["vm"]
    assert [(d["disk_id"], d["size"]) for d in out["disks"]] == [("d0", 8 * MiB)]
    r = hv.open_live_reader(out["vm_id"], "d0")
    buf = bytearray(13)
    r.readinto(MiB, memoryview(buf))
    r.close()
    assert bytes(buf) == b"imported data" and img.exists()  # copied: the operator keeps it
    out2 = vms.handle(cmd("vm_import", "i2", name="moved", move=True, start=True,
                          disks=[{"disk_id": "d0", "path": str(img)}]))["vm"]
    assert not img.exists() and out2["power"] == "running"  # moved into the VM
    # never anything outside the import directory, whichever way it is named
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"\0" * 4096)
    os.symlink(secret, imp / "link.img")
    for path in ("../secret.img", str(secret), "link.img", "", "missing.img", "."):
        with pytest.raises(InvalidInput):
            vms.handle(cmd("vm_import", f"i-{len(path)}", name="evil",
                           disks=[{"disk_id": "d0", "path": path}]))
    # a qcow2 image is not a file VM's disk
    (imp / "q.qcow2").write_bytes(b"QFI\xfb" + b"\0" * 4092)
    with pytest.raises(InvalidInput) as e:
        vms.handle(cmd("vm_import", "i3", name="q", disks=[{"disk_id": "d0",
                                                            "path": "q.qcow2"}]))
    assert "qemu-img convert" in (e.value.hint or "")
    assert sorted(v.name for v in hv.list_vms()) == ["imp", "moved"]


def test_no_import_directory_and_no_workload_on_other_drivers(tmp_path: Path) -> None:
    mem = VmCommands(MemoryHypervisor(), tmp_path / "agent", None)
    with pytest.raises(InvalidInput) as e:
        mem.handle(cmd("vm_import", name="x", disks=[{"disk_id": "d0", "path": "a.img"}]))
    assert "--import-dir" in (e.value.hint or "")
    with pytest.raises(InvalidInput) as e:
        mem.handle(cmd("vm_create", **create_args(workload={"rate": 1000})))
    assert "file VMs only" in e.value.message
    assert mem.handle(cmd("vm_create", "c-9", **create_args()))["vm"]["name"] == "app-01"


def test_qemu_vms_through_the_same_commands(tmp_path: Path) -> None:
    """QEMU VMs: created (qcow2 disks), imported from a qcow2 image, started (a QEMU process),
    stopped, deleted — the same commands, the other driver."""
    from tests.contract.test_driver_conformance import require_qemu

    require_qemu()
    from drsite.hypervisors.qemu.driver import QemuHypervisor
    from drsite.hypervisors.qemu.tools import run_tool

    hv = QemuHypervisor(tmp_path / "vms")
    (tmp_path / "import").mkdir()
    vms = VmCommands(hv, tmp_path / "agent", tmp_path / "import")
    try:
        made = vms.handle(cmd("vm_create", **create_args(memory_mib=64, start=True)))["vm"]
        assert made["power"] == "running" and hv.runner(made["vm_id"]) is not None
        assert vms.handle(cmd("vm_stop", "s", vm_id=made["vm_id"], timeout_s=5))["vm"]["power"] \
            == "stopped"
        img = tmp_path / "import" / "base.qcow2"
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(8 * MiB)])
        imp = vms.handle(cmd("vm_import", "i", name="imp", memory_mib=64,
                             disks=[{"disk_id": "d0", "path": "base.qcow2"}]))["vm"]
        assert [(d["disk_id"], d["size"]) for d in imp["disks"]] == [("d0", 8 * MiB)]
        assert img.exists()
        with pytest.raises(InvalidInput):  # the stand-in guest is for file VMs
            vms.handle(cmd("vm_create", "w", **create_args(name="w", workload={"rate": 10})))
        for vm_id in (made["vm_id"], imp["vm_id"]):
            vms.handle(cmd("vm_delete", f"d-{vm_id}", vm_id=vm_id))
        assert hv.list_vms() == []
    finally:
        for vm in hv.list_vms():
            hv.delete_vm(vm.vm_id)
        hv.close()
