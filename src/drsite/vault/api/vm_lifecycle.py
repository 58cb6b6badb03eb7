"""Operator routes for the VM lifecycle on hosts: create, import, start, stop, delete. Each
starts a job (``vault/jobs/vms.py``) that sends one command to the VM's host through the
command queue; the host's agent acts through its hypervisor driver (``agent/vms.py``).

Refused here, before anything is sent (409 with the command to run instead): a name the host
already has; deleting a VM that is protected, or that a failover still needs (its recovery VM
before commit or cleanup, or the old primary whose disks re-protect reads); starting the old
primary of a VM that failed over (the VM would run on both sites); two jobs on one VM at once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Any

from fastapi import APIRouter, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict, InvalidInput, NotFound
from drsite.core.model import validate_name
from drsite.core.states import ACTIVE_JOB_STATES, FailoverState, ItemProtection
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.vault.api.deps import Operator, VaultDep, name
from drsite.vault.api.schemas import DiskIn, NicIn, VmCreateIn, VmStopIn
from drsite.vault.api.views import job_view
from drsite.vault.db.models import Failover, Host, Item, Job, Site, Vm
from drsite.vault.jobs import kinds as K
from drsite.vault.jobs.create import create_job

router = APIRouter()

MAX_DISK = 64 << 40
MAX_DISKS = 16
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# the VM's item is away (failed over) or its replica runs elsewhere: never start the old copy
_AWAY = (ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER, ItemProtection.COMMITTED,
         ItemProtection.REPROTECTED)
_OPEN_FAILOVER = (FailoverState.STARTING, FailoverState.TEST_RUNNING, FailoverState.PENDING_COMMIT)


def resolve_host(s: Session, host: str, site: str | None) -> Host:
    """A host by id, or by name (in ``site`` when names repeat across sites)."""
    row = s.get(Host, host) if len(host) <= 64 else None
    if row is None:
        q = select(Host).where(Host.name == name("host", host), Host.revoked_at.is_(None))
        if site is not None:
            q = q.join(Site, Site.id == Host.site_id).where(Site.name == name("site", site))
        rows = s.scalars(q).all()
        if len(rows) > 1:
            raise InvalidInput(f"{len(rows)} hosts are named {host}",
                               hint="Give the host id, or --site SITE.")
        row = rows[0] if rows else None
    if row is None or row.revoked_at is not None:
        raise NotFound(f"no host {host!r}" + (f" in site {site}" if site else ""),
                       hint="List hosts with 'drsite hosts list'.")
    return row


def _mac(host: Host, vm_name: str, i: int, given: str | None) -> str:
    if given is not None:
        mac = given.strip().lower()
        if not _MAC.fullmatch(mac):
            raise InvalidInput(f"invalid MAC address {given[:40]!r}",
                               hint="Write it as six hex pairs, e.g. 52:54:00:12:34:56.")
        return mac
    h = hashlib.sha256(f"{host.id}/{vm_name}/{i}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def _nics(host: Host, vm_name: str, nics: list[NicIn]) -> list[dict[str, Any]]:
    out = []
    for i, n in enumerate(nics):
        ip = n.ip
        if ip is not None:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise InvalidInput(f"NIC {i}: invalid IP address {ip[:40]!r}") from None
        out.append({"network": name("network", n.network), "ip": ip,
                    "mac": _mac(host, vm_name, i, n.mac)})
    return out


def _disks(disks: list[DiskIn], *, importing: bool) -> list[dict[str, Any]]:
    if not 1 <= len(disks) <= MAX_DISKS:
        raise InvalidInput(f"a VM needs 1 to {MAX_DISKS} disks",
                           hint="Give --disk SIZE (create) or --disk ID=IMAGE (import).")
    out, seen = [], set()
    for i, d in enumerate(disks):
        disk_id = validate_name("disk", d.disk_id or f"d{i}")
        if disk_id in seen:
            raise InvalidInput(f"disk {disk_id} is given twice")
        seen.add(disk_id)
        if d.size is not None and not (512 <= d.size <= MAX_DISK and d.size % 512 == 0):
            raise InvalidInput(f"disk {disk_id}: size must be a multiple of 512 bytes between "
                               "512 bytes and 64 TiB")
        if importing:
            path = (d.path or "").strip()
            if not path or len(path) > 1024 or any(ord(c) < 32 for c in path):
                raise InvalidInput(f"disk {disk_id}: an import needs the image's path",
                                   hint="Give --disk ID=IMAGE, IMAGE relative to the host's "
                                        "import directory.")
            out.append({"disk_id": disk_id, "path": path, "size": d.size})
        else:
            if d.size is None:
                raise InvalidInput(f"disk {disk_id}: a size is needed", hint="e.g. --disk 1GiB")
            out.append({"disk_id": disk_id, "size": d.size})
    return out


def _busy(s: Session, host: Host, vm_name: str) -> None:
    for job in s.scalars(select(Job).where(Job.kind.in_(K.VM_KINDS), Job.target == vm_name,
                                           Job.state.in_(ACTIVE_JOB_STATES))):
        if job.args.get("host_id") == host.id:
            raise Conflict(f"VM {vm_name} on host {host.name} is busy with job {job.id}",
                           hint=f"Wait for it: drsite jobs show {job.id}")


def _start_job(s: Session, kind: str, host: Host, vm_name: str, command: str,
               args: dict[str, Any], now: float, vm_id: str | None = None) -> dict[str, Any]:
    _busy(s, host, vm_name)
    job = create_job(s, kind, target=vm_name, item_id=None, now=now,
                     args={"host_id": host.id, "host": host.name, "command": command,
                           "command_args": args, **({"vm_id": vm_id} if vm_id else {})})
    return job_view(s, job)


def _new_vm(s: Session, body: VmCreateIn, *, importing: bool) -> tuple[Host, dict[str, Any]]:
    host = resolve_host(s, body.host, body.site)
    vm_name = name("VM", body.name)
    if not 1 <= body.vcpus <= 256 or not 16 <= body.memory_mib <= 4 << 20:
        raise InvalidInput("vcpus must be 1-256 and memory 16 MiB-4 TiB")
    taken = s.scalars(select(Vm).where(Vm.host_id == host.id, Vm.name == vm_name,
                                       Vm.present.is_(True))).first()
    if taken is not None:
        raise Conflict(f"host {host.name} already has a VM named {vm_name} ({taken.vm_id})",
                       hint="Choose another name, or delete that VM first: drsite vms delete "
                            f"{vm_name}")
    args: dict[str, Any] = {"name": vm_name, "vcpus": body.vcpus, "memory_mib": body.memory_mib,
                            "nics": _nics(host, vm_name, body.nics),
                            "disks": _disks(body.disks, importing=importing),
                            "start": body.start}
    if importing:
        args["move"] = body.move
    if body.workload is not None:
        if importing:
            raise InvalidInput("a workload is for new, empty file VMs (create), not imports")
        try:
            args["workload"] = WorkloadSpec.from_dict(dict(body.workload)).to_dict()
        except TypeError as e:
            raise InvalidInput(f"invalid workload: {e}",
                               hint="Fields: rate, io_size, pattern, data, seed, region_offset, "
                                    "region_length, disks.") from None
    return host, args


@router.post("/vms", status_code=status.HTTP_202_ACCEPTED,
             summary="Create a VM with empty disks on a host (CreateVm job)")
def create_vm(body: VmCreateIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        host, args = _new_vm(s, body, importing=False)
        return _start_job(s, K.CREATE_VM, host, args["name"], "vm_create", args, now)


@router.post("/vms/import", status_code=status.HTTP_202_ACCEPTED,
             summary="Create a VM on a host from disk images in the host's import directory "
                     "(ImportVm job)")
def import_vm(body: VmCreateIn, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        host, args = _new_vm(s, body, importing=True)
        return _start_job(s, K.IMPORT_VM, host, args["name"], "vm_import", args, now)


def get_vm(s: Session, vm_id: str) -> tuple[Vm, Host]:
    if not vm_id or len(vm_id) > 128 or any(ord(c) < 32 for c in vm_id):
        raise InvalidInput("invalid vm_id")
    for vm, host in s.execute(select(Vm, Host).join(Host, Host.id == Vm.host_id)
                              .where(Vm.vm_id == vm_id, Host.revoked_at.is_(None))).all():
        if vm.present:
            return vm, host
    raise NotFound(f"no VM {vm_id!r} in the inventory", hint="List VMs with 'drsite vms list'.")


def _items_of(s: Session, host: Host, vm: Vm) -> list[Item]:
    return list(s.scalars(select(Item).where(Item.host_id == host.id, Item.vm_id == vm.vm_id)))


@router.post("/vms/{vm_id}/start", status_code=status.HTTP_202_ACCEPTED,
             summary="Power a VM on (StartVm job)")
def start_vm(vm_id: str, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        vm, host = get_vm(s, vm_id)
        for item in _items_of(s, host, vm):
            if item.status in _AWAY:
                raise Conflict(
                    f"VM {vm.name} on host {host.name} failed over (item {item.id} is "
                    f"{item.status}): starting this copy would run the VM on two sites",
                    hint=f"Cancel the failover (drsite failover cancel {item.id}) or fail back "
                         f"(drsite failover failback {item.id}) instead.")
        return _start_job(s, K.START_VM, host, vm.name, "vm_start", {"vm_id": vm.vm_id,
                                                                     "name": vm.name}, now,
                          vm.vm_id)


@router.post("/vms/{vm_id}/stop", status_code=status.HTTP_202_ACCEPTED,
             summary="Power a VM off: gracefully, forced after timeout_s (StopVm job)")
def stop_vm(vm_id: str, vault: VaultDep, _p: Operator, body: VmStopIn | None = None
            ) -> dict[str, Any]:
    opts = body or VmStopIn()
    if not 0 < opts.timeout_s <= 3600:
        raise InvalidInput("timeout_s must be between 0 and 3600 seconds")
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        vm, host = get_vm(s, vm_id)
        return _start_job(s, K.STOP_VM, host, vm.name, "vm_stop",
                          {"vm_id": vm.vm_id, "name": vm.name, "force": opts.force,
                           "timeout_s": opts.timeout_s}, now, vm.vm_id)


@router.delete("/vms/{vm_id}", status_code=status.HTTP_202_ACCEPTED,
               summary="Delete a VM and its disks (DeleteVm job)")
def delete_vm(vm_id: str, vault: VaultDep, _p: Operator) -> dict[str, Any]:
    now = vault.settings.clock.now()
    with vault.db.tx() as s:
        vm, host = get_vm(s, vm_id)
        for item in _items_of(s, host, vm):
            if item.vm_ref is not None:
                raise Conflict(f"VM {vm.name} is protected (item {item.id})",
                               hint=f"Disable its protection first: drsite items unprotect "
                                    f"{item.id}")
            if item.status in (ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER,
                               ItemProtection.COMMITTED):
                raise Conflict(f"VM {vm.name} is the source of item {item.id} ({item.status}): "
                               "cancel and re-protect use its disks",
                               hint=f"Finish the failover first: drsite failover reprotect "
                                    f"{item.id} (or cancel)")
        fo = s.scalars(select(Failover).where(Failover.vm_id == vm.vm_id,
                                              Failover.recovery_host_id == host.id,
                                              Failover.state.in_(_OPEN_FAILOVER))).first()
        if fo is not None:
            raise Conflict(f"VM {vm.name} is the recovery VM of {fo.kind} failover {fo.id}, "
                           f"which is {fo.state}",
                           hint=f"Clean the test failover up first: drsite failover cleanup "
                                f"{fo.item_id}" if fo.kind == "test" else
                           f"Commit or cancel that failover first: drsite failover cancel "
                           f"{fo.item_id}")
        return _start_job(s, K.DELETE_VM, host, vm.name, "vm_delete",
                          {"vm_id": vm.vm_id, "name": vm.name}, now, vm.vm_id)
