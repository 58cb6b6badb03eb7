"""``drsite vms …``: the VM inventory and the VM lifecycle on hosts (create, import, start,
stop, delete — file VMs and QEMU VMs alike, through the host's agent). Thin: parse options,
call the client, follow the job, render."""

from __future__ import annotations

from typing import Any

import typer

from drsite.cli.common import (
    Conn,
    SortOpt,
    WhereOpt,
    console,
    follow_job,
    parse_size,
    select_rows,
    show,
    vault_command,
)
from drsite.cli.resources import resolve_host
from drsite.core.errors import InvalidInput, NotFound

vms = typer.Typer(help="VMs: the inventory the agents report, and creating, importing, "
                       "starting, stopping and deleting VMs on a host.", no_args_is_help=True)

HostOpt = typer.Option(None, "--host", help="Host id or name (default: the only host of "
                                            "--site).")
SiteOpt = typer.Option(None, "--site", help="Site of the host.")
WaitOpt = typer.Option(True, help="Follow the job until it ends.")
VM_COLS = ["name", "site", "host", "power", "disks", "nics", "item_id", "vm_id", "warning"]


def _row(v: dict[str, Any]) -> dict[str, Any]:
    disks = ", ".join(f"{d.get('disk_id')} {_size(int(d.get('size') or 0))}"
                      for d in v.get("disks") or [])
    nics = ", ".join(f"{n.get('network')}" + (f" {n['ip']}" if n.get("ip") else "")
                     for n in v.get("nics") or [])
    return {**v, "power": v.get("power") if v.get("present", True) else "gone (not reported)",
            "disks": disks or "-", "nics": nics or "-"}


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{x:.4g} {unit}"
        x /= 1024
    return f"{x:.4g} TiB"


@vault_command(vms, "list")
def vms_list(conn: Conn,
             all_vms: bool = typer.Option(False, "--all", help="Also VMs no longer reported "
                                                               "(deleted)."),
             where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List VMs reported by the agents (power, disks, networks, the item protecting each)."""
    with conn.client() as c:
        rows = select_rows(c.vms(all_vms=all_vms), where, sort)
    show([_row(v) for v in rows] if not conn.json else rows, VM_COLS, title="VMs",
         json_out=conn.json)


def find_vm(c: Any, vm: str, host: str | None, site: str | None) -> dict[str, Any]:
    """A VM of the inventory by id, or by name (on ``host`` / in ``site`` when names repeat)."""
    rows = c.vms()
    by_id = [v for v in rows if v["vm_id"] == vm]
    if by_id:
        return dict(by_id[0])
    named = [v for v in rows if v["name"] == vm and (site is None or v["site"] == site)
             and (host is None or host in (v["host"], v["host_id"]))]
    if len(named) == 1:
        return dict(named[0])
    if not named:
        raise NotFound(f"no VM {vm!r} in the inventory" + (f" of site {site}" if site else ""),
                       hint="List VMs with 'drsite vms list'.")
    raise InvalidInput(f"{len(named)} VMs are named {vm} (on {', '.join(v['host'] for v in named)})",
                       hint="Give --host HOST, or the VM's id.")


def parse_nic(text: str) -> dict[str, Any]:
    """``NETWORK[:IP[:MAC]]`` (a MAC has colons too: everything after the IP is the MAC)."""
    network, _, rest = text.partition(":")
    ip, _, mac = rest.partition(":")
    if not network:
        raise InvalidInput(f"--nic {text!r}: give NETWORK[:IP[:MAC]]",
                           hint="e.g. --nic prod:10.0.0.5")
    return {"network": network, "ip": ip or None, "mac": mac or None}


def parse_disk(text: str, i: int) -> dict[str, Any]:
    """``SIZE`` or ``ID=SIZE`` (create)."""
    disk_id, sep, size = text.rpartition("=")
    return {"disk_id": disk_id if sep else f"d{i}", "size": parse_size(size, "disk size")}


def parse_image(text: str, i: int) -> dict[str, Any]:
    """``IMAGE`` or ``ID=IMAGE`` (import), the image relative to the host's import
    directory."""
    disk_id, sep, path = text.partition("=")
    if not sep:
        disk_id, path = f"d{i}", text
    return {"disk_id": disk_id, "path": path}


def parse_workload(text: str | None) -> dict[str, Any] | None:
    """``RATE`` (bytes/s: ``256KiB/s``, ``1M``) of random 4 KiB writes, or ``none``."""
    if text is None or text.lower() in ("none", "0", "off"):
        return None
    rate = parse_size(text.removesuffix("/s"), "workload rate")
    return {"pattern": "random", "io_size": 4096, "rate": rate}


def _new(conn: Conn, c: Any, name: str, host: str | None, site: str | None, cpus: int,
         memory: int, nics: list[str], start: bool) -> dict[str, Any]:
    h = resolve_host(c.hosts(), host, site)
    return {"host": h["id"], "name": name, "vcpus": cpus, "memory_mib": memory,
            "nics": [parse_nic(n) for n in nics], "start": start}


def _done(conn: Conn, c: Any, job: dict[str, Any], name: str) -> None:
    if conn.json:
        return
    rows = [v for v in c.vms() if v["name"] == name]
    if rows:
        show([_row(v) for v in rows], VM_COLS, title="VM", json_out=False)


@vault_command(vms, "create")
def vms_create(
    conn: Conn, name: str,
    host: str | None = HostOpt, site: str | None = SiteOpt,
    disk: list[str] = typer.Option(..., "--disk", help="A disk: SIZE or ID=SIZE (1G = 1 GiB; "
                                                       "repeatable; ids default to d0, d1, …)."),
    nic: list[str] = typer.Option([], "--nic", help="A NIC: NETWORK[:IP[:MAC]] (repeatable; "
                                                    "the MAC defaults to a stable one)."),
    cpus: int = typer.Option(1, min=1, max=256, help="vCPUs."),
    memory: int = typer.Option(512, min=16, help="Memory in MiB."),
    workload: str | None = typer.Option(None, help="File VMs: a guest writing random 4 KiB "
                                                   "blocks at RATE bytes/s (e.g. 256KiB/s)."),
    start: bool = typer.Option(False, help="Power the VM on once created."),
    wait: bool = WaitOpt,
) -> None:
    """Create a VM with empty disks on a host (file VMs, or QEMU VMs on a --hypervisor qemu
    host), through its agent (CreateVm job)."""
    with conn.client() as c:
        body = {**_new(conn, c, name, host, site, cpus, memory, nic, start),
                "disks": [parse_disk(d, i) for i, d in enumerate(disk)],
                "workload": parse_workload(workload)}
        job = follow_job(c, str(c.create_vm(body)["id"]), conn.json, wait)
        _done(conn, c, job, name)


@vault_command(vms, "import")
def vms_import(
    conn: Conn, name: str,
    host: str | None = HostOpt, site: str | None = SiteOpt,
    disk: list[str] = typer.Option(..., "--disk", help="A disk image: IMAGE or ID=IMAGE, "
                                                       "relative to the host's import directory "
                                                       "(drsite up: SITE/import; raw, or qcow2 "
                                                       "for QEMU VMs; repeatable)."),
    move: bool = typer.Option(False, help="Move the images into the VM instead of copying "
                                          "them."),
    nic: list[str] = typer.Option([], "--nic", help="A NIC: NETWORK[:IP[:MAC]] (repeatable)."),
    cpus: int = typer.Option(1, min=1, max=256, help="vCPUs."),
    memory: int = typer.Option(512, min=16, help="Memory in MiB."),
    start: bool = typer.Option(False, help="Power the VM on once imported."),
    wait: bool = WaitOpt,
) -> None:
    """Create a VM on a host from existing disk images (ImportVm job)."""
    with conn.client() as c:
        body = {**_new(conn, c, name, host, site, cpus, memory, nic, start),
                "disks": [parse_image(d, i) for i, d in enumerate(disk)], "move": move}
        job = follow_job(c, str(c.import_vm(body)["id"]), conn.json, wait)
        _done(conn, c, job, name)


@vault_command(vms, "start")
def vms_start(conn: Conn, vm: str = typer.Argument(..., help="VM name or id."),
              host: str | None = HostOpt, site: str | None = SiteOpt,
              wait: bool = WaitOpt) -> None:
    """Power a VM on (StartVm job)."""
    with conn.client() as c:
        v = find_vm(c, vm, host, site)
        job = follow_job(c, str(c.start_vm(v["vm_id"])["id"]), conn.json, wait)
        _done(conn, c, job, v["name"])


@vault_command(vms, "stop")
def vms_stop(conn: Conn, vm: str = typer.Argument(..., help="VM name or id."),
             host: str | None = HostOpt, site: str | None = SiteOpt,
             force: bool = typer.Option(False, help="Power off at once (no guest shutdown)."),
             timeout: float = typer.Option(60.0, min=1, max=3600,
                                           help="Seconds for the guest to shut down before the "
                                                "power-off is forced."),
             wait: bool = WaitOpt) -> None:
    """Power a VM off, gracefully (StopVm job)."""
    with conn.client() as c:
        v = find_vm(c, vm, host, site)
        job = follow_job(c, str(c.stop_vm(v["vm_id"], force=force, timeout_s=timeout)["id"]),
                         conn.json, wait)
        _done(conn, c, job, v["name"])


@vault_command(vms, "delete")
def vms_delete(conn: Conn, vm: str = typer.Argument(..., help="VM name or id."),
               host: str | None = HostOpt, site: str | None = SiteOpt,
               wait: bool = WaitOpt) -> None:
    """Delete a VM and its disks (DeleteVm job). A protected VM is refused: disable its
    protection first ('drsite items unprotect ITEM')."""
    with conn.client() as c:
        v = find_vm(c, vm, host, site)
        follow_job(c, str(c.delete_vm(v["vm_id"])["id"]), conn.json, wait)
    if not conn.json:
        console.print(f"VM {v['name']} deleted from host {v['host']}")
