"""The VM lifecycle commands on an agent: ``vm_create``, ``vm_import``, ``vm_start``,
``vm_stop``, ``vm_delete`` (``drsite vms create|import|start|stop|delete``, through the vault's
VM jobs and the command queue).

They act through the host's hypervisor driver (:class:`~drsite.hypervisors.contract.
HypervisorDriver`: ``create_blank``, ``create_vm``, ``power_on``, ``power_off``,
``delete_vm``). A file VM can be given a workload (the stand-in for a guest OS writing to its
disks); a QEMU VM runs its own OS.

Idempotency (a command may be delivered twice, e.g. across an agent restart): create and
import write ``DATA/vm-commands/<command id>.json`` before they touch the driver, naming the
VM; a re-run finds the VM of that name and takes it as its own — a name that was taken
*before* the record existed is a ``Conflict``, never adopted. Power and delete are idempotent
in the driver.

Imports read disk images only from this host's import directory (``--import-dir``; ``drsite
up``: ``<site>/import``): an operator's token must not make an agent read any file of its host
into a VM whose disks are then replicated. Images are copied (sparse) unless ``move``.

Responsible for: checking arguments, the record, the driver calls, the result (the VM as the
inventory reports it). Not responsible for: whether the VM may be deleted or started (the
vault checks protection and failover state before it sends the command), or the inventory
(the heartbeat reports it).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from drsite.agent.link import Command
from drsite.core.errors import Conflict, InvalidInput, VmNotFound, classify_os_error
from drsite.core.model import DiskSpec, Nic, PowerState, VmInfo, VmSpec, validate_name
from drsite.fsutil import atomic_write_json
from drsite.hypervisors.contract import HypervisorDriver
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.imagefile import copy_sparse

log = logging.getLogger(__name__)

KINDS = ("vm_create", "vm_import", "vm_start", "vm_stop", "vm_delete")
QCOW2_MAGIC = b"QFI\xfb"
MAX_DISKS = 16


@runtime_checkable
class WorkloadDriver(Protocol):
    """A driver whose VMs take a workload (the file driver)."""

    def set_workload(self, vm_id: str, spec: WorkloadSpec | None) -> None: ...


def lane_of(cmd: Command) -> str:
    """The lane of a VM command: one per VM (by name, or id), so two commands of one VM never
    run at once and other VMs' (and items') work does not wait behind them."""
    return f"vm:{cmd.args.get('name') or cmd.args.get('vm_id') or ''}"


def _spec(a: dict[str, Any]) -> VmSpec:
    try:
        name = validate_name("VM", str(a["name"]))
        vcpus, memory = int(a.get("vcpus", 1)), int(a.get("memory_mib", 512))
        nics = tuple(Nic(validate_name("network", str(n["network"])), str(n["mac"]),
                         str(n["ip"]) if n.get("ip") else None) for n in a.get("nics") or [])
        disks = tuple(DiskSpec(validate_name("disk", str(d["disk_id"])), int(d["size"]))
                      for d in a.get("disks") or [] if d.get("size") is not None)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"invalid VM arguments: {e}") from None
    if not 1 <= vcpus <= 256 or not 16 <= memory <= 4 << 20:
        raise InvalidInput("vcpus must be 1-256 and memory 16 MiB-4 TiB")
    return VmSpec(name, vcpus, memory, nics, disks)


class VmCommands:
    """Runs the VM lifecycle commands of one agent (called from the VM's lane)."""

    def __init__(self, hypervisor: HypervisorDriver, data_dir: Path, import_dir: Path | None
                 ) -> None:
        self.hv = hypervisor
        self.records = data_dir / "vm-commands"
        self.scratch = data_dir / "vm-imports"
        self.import_dir = import_dir

    def handle(self, cmd: Command) -> dict[str, Any]:
        fn = {"vm_create": self._create, "vm_import": self._import, "vm_start": self._start,
              "vm_stop": self._stop, "vm_delete": self._delete}.get(cmd.kind)
        if fn is None:
            raise InvalidInput(f"unknown VM command {cmd.kind!r}",
                               hint="The agent is older than the vault; upgrade it.")
        return fn(cmd)

    # ------------------------------------------------------------------------------- helpers

    def _find(self, name: str) -> VmInfo | None:
        try:
            return self.hv.find_vm(name)
        except VmNotFound:
            return None

    def _claim(self, cmd: Command, name: str) -> VmInfo | None:
        """The VM this command already made (a re-run), or None after recording that the
        command is about to make one; ``Conflict`` when the name is someone else's."""
        record = self.records / f"{validate_name('command', cmd.command_id)}.json"
        existing = self._find(name)
        if record.exists():
            if existing is not None:
                log.info("command %s: VM %s was created before a restart", cmd.command_id, name)
            return existing
        if existing is not None:
            raise Conflict(f"a VM named {name} exists on host already ({existing.vm_id})",
                           hint="Choose another name, or delete that VM first: drsite vms "
                                f"delete {name}")
        atomic_write_json(record, {"kind": cmd.kind, "name": name})
        return None

    def _result(self, vm_id: str) -> dict[str, Any]:
        return {"vm": self.hv.get_vm(vm_id).to_dict()}

    def _start_if(self, cmd: Command, vm: VmInfo) -> None:
        if cmd.args.get("start") and vm.power is not PowerState.RUNNING:
            self.hv.power_on(vm.vm_id)

    # ------------------------------------------------------------------------------- commands

    def _create(self, cmd: Command) -> dict[str, Any]:
        spec = _spec(cmd.args)
        if not spec.disks or len(spec.disks) > MAX_DISKS:
            raise InvalidInput(f"a VM needs 1 to {MAX_DISKS} disks, each with a size")
        workload = cmd.args.get("workload")
        wl = WorkloadSpec.from_dict(dict(workload)) if isinstance(workload, dict) else None
        if wl is not None and not isinstance(self.hv, WorkloadDriver):
            raise InvalidInput(f"the {self.hv.name} hypervisor runs the VM's own OS: a workload "
                               "is for file VMs only", hint="Leave out --workload.")
        vm = self._claim(cmd, spec.name) or self.hv.create_blank(spec)
        if wl is not None and isinstance(self.hv, WorkloadDriver):
            self.hv.set_workload(vm.vm_id, wl)
        self._start_if(cmd, vm)
        log.info("VM %s created (%s, %d disk(s))", spec.name, vm.vm_id, len(spec.disks))
        return self._result(vm.vm_id)

    def _image(self, raw: str) -> Path:
        """An image path of the import directory (relative to it, or absolute inside it)."""
        if self.import_dir is None:
            raise InvalidInput("this agent has no import directory",
                               hint="Run its agent with --import-dir DIR, put the images there.")
        root = self.import_dir.resolve()
        path = (root / raw).resolve()
        if not path.is_relative_to(root) or path == root:
            raise InvalidInput(f"disk image {raw!r} is not inside the import directory {root}",
                               hint=f"Copy the image into {root} and name it relative to it.")
        if not path.is_file():
            raise InvalidInput(f"disk image {raw!r} is not a file in {root}",
                               hint=f"Copy the image into {root} first.")
        return path

    def _import(self, cmd: Command) -> dict[str, Any]:
        spec = _spec(cmd.args)
        raw = [d for d in cmd.args.get("disks") or [] if isinstance(d, dict)]
        if not raw or len(raw) > MAX_DISKS:
            raise InvalidInput(f"an import needs 1 to {MAX_DISKS} disk images")
        images: dict[str, Path] = {}
        for d in raw:
            disk_id = validate_name("disk", str(d.get("disk_id") or ""))
            if disk_id in images:
                raise InvalidInput(f"disk {disk_id} is given twice")
            images[disk_id] = self._image(str(d.get("path") or ""))
        if self.hv.name == "file":
            for disk_id, path in images.items():
                with open(path, "rb") as f:
                    if f.read(4) == QCOW2_MAGIC:
                        raise InvalidInput(f"disk image of {disk_id} is qcow2; file VMs take raw "
                                           "images", hint=f"Convert it: qemu-img convert -O raw "
                                                          f"{path.name} {path.stem}.img")
        move = bool(cmd.args.get("move"))
        vm = self._claim(cmd, spec.name)
        if vm is None:
            work = self.scratch / validate_name("command", cmd.command_id)
            try:
                work.mkdir(parents=True, exist_ok=True)
                staged: dict[str, str] = {}
                for disk_id, path in images.items():
                    if move:
                        staged[disk_id] = str(path)
                    else:  # the operator keeps the file: the VM gets a copy
                        dst = work / f"{disk_id}{path.suffix or '.img'}"
                        copy_sparse(path, dst, path.stat().st_size)
                        staged[disk_id] = str(dst)
                vm = self.hv.create_vm(spec, staged)
            except OSError as e:
                raise classify_os_error(e, f"importing VM {spec.name}") from e
            finally:
                shutil.rmtree(work, ignore_errors=True)
        self._start_if(cmd, vm)
        log.info("VM %s imported (%s) from %s", spec.name, vm.vm_id,
                 ", ".join(p.name for p in images.values()))
        return self._result(vm.vm_id)

    def _vm_id(self, cmd: Command) -> str:
        vm_id = str(cmd.args.get("vm_id") or "")
        if not vm_id:
            raise InvalidInput(f"{cmd.kind}: missing argument 'vm_id'")
        return vm_id

    def _start(self, cmd: Command) -> dict[str, Any]:
        vm_id = self._vm_id(cmd)
        self.hv.power_on(vm_id)
        return self._result(vm_id)

    def _stop(self, cmd: Command) -> dict[str, Any]:
        vm_id = self._vm_id(cmd)
        timeout = float(cmd.args.get("timeout_s") or 60.0)
        self.hv.power_off(vm_id, force=bool(cmd.args.get("force")), timeout=timeout)
        return self._result(vm_id)

    def _delete(self, cmd: Command) -> dict[str, Any]:
        vm_id = self._vm_id(cmd)
        self.hv.delete_vm(vm_id)  # idempotent: an unknown id is a no-op
        return {"vm": None, "deleted": vm_id}

