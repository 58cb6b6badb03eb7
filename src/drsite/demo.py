"""``drsite demo``: two sites on this machine, file VMs with live workloads, initial replication,
delta cycles, recovery points, and a bit-for-bit proof that the replica equals the source."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from drsite.core.model import DiskSpec, Nic, SealedCycle, VmSpec
from drsite.core.retention import RetentionRule
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.store.digest import file_digest, image_digest
from drsite.store.format import PointInfo
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

MiB = 1024 * 1024


@dataclass
class DemoOptions:
    workdir: Path
    vms: int = 2
    disks: int = 2
    disk_mib: int = 256
    fill: float = 0.4
    cycles: int = 3
    frequency_s: float = 5.0
    write_rate: int = 2 * MiB
    json_out: bool = False


@dataclass
class DemoResult:
    ok: bool
    seconds: float
    vms: list[dict[str, Any]] = field(default_factory=list)


def seed_disk(path: Path, size: int, fill: float, rng: np.random.Generator) -> None:
    """Write an 'installed OS' into a sparse image: scattered 1 MiB runs of mixed data."""
    n_chunks = size // MiB
    chosen = rng.choice(n_chunks, size=max(1, int(n_chunks * fill)), replace=False)
    words = np.frombuffer(b"drsite demo guest data: the quick brown fox jumps over lazy dogs. ",
                          dtype=np.uint8)
    with open(path, "r+b") as f:
        for i, c in enumerate(sorted(chosen.tolist())):
            if i % 2:
                data = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
            else:
                data = np.resize(words, MiB).tobytes()
            os.pwrite(f.fileno(), data, c * MiB)
        os.fsync(f.fileno())


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoResult:
    con = console or Console(stderr=opts.json_out)
    t0 = time.monotonic()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = opts.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    primary = work / "primary"
    secondary = work / "secondary"
    con.print(Panel.fit(
        f"[bold]drsite demo[/]: primary site [cyan]{primary}[/] → secondary site "
        f"[cyan]{secondary}[/]\n{opts.vms} file VMs × {opts.disks} disks × {opts.disk_mib} MiB, "
        f"live random 4 KiB writes at {opts.write_rate // 1024} KiB/s each, "
        f"delta cycles every {opts.frequency_s:g} s", title="two sites on this machine"))

    hv = FileHypervisor(primary / "vms")
    store = LocalObjectStore(secondary / "store")
    rng = np.random.default_rng(20261123)
    size = opts.disk_mib * MiB
    vm_ids: list[str] = []
    for i in range(opts.vms):
        name = f"app-{i + 1:02d}"
        spec = VmSpec(name=name, vcpus=2, memory_mib=2048,
                      nics=(Nic("prod-net", f"52:54:00:00:00:{i + 1:02x}", f"10.0.0.{i + 11}"),),
                      disks=tuple(DiskSpec(f"disk{d}", size) for d in range(opts.disks)))
        vm = hv.create_blank(spec)
        for d in vm.disks:
            seed_disk(hv.disk_path(vm.vm_id, d.disk_id), d.size, opts.fill, rng)
        hv.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096,
                                               rate=opts.write_rate, seed=i + 1))
        hv.power_on(vm.vm_id)
        vm_ids.append(vm.vm_id)
    con.print(f"[green]✓[/] created and started {opts.vms} VMs on the primary site "
              f"(guest processes writing)")

    settings = ReplicationSettings(frequency_s=opts.frequency_s, app_consistent_every_s=opts.frequency_s * 2,
                                   rpo_threshold_s=opts.frequency_s * 6, resync_window=ALWAYS,
                                   retention=RetentionRule(retention_s=24 * 3600, keep_all_s=3600))
    mid_ok: list[bool] = []
    items: list[ItemReplicator] = []
    hydrators: dict[str, ReplicaHydrator] = {}
    repos: dict[str, Repository] = {}
    for vm_id in vm_ids:
        vm = hv.get_vm(vm_id)
        item_id = f"item-{vm.name}"
        repo = Repository(store, item_id)
        hydrator = ReplicaHydrator(repo, secondary / "replicas" / item_id)
        hydrators[item_id] = hydrator
        repos[vm_id] = repo
        items.append(ItemReplicator(item_id=item_id, vm_id=vm_id, driver=hv,
                                    target=LocalTarget(repo, hydrator),
                                    state_dir=primary / "engine", settings=settings))

    # -- initial replication ------------------------------------------------------------------
    con.rule("[bold]enable protection: initial replication")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=con,
                  transient=False) as progress:
        for it in items:
            task = progress.add_task(f"{it.rec.vm_name:8}", total=None)

            def on_progress(rep: Any, _task: Any = task) -> None:
                progress.update(_task, total=rep.bytes_total or None, completed=rep.bytes_done)

            it.on_progress = on_progress
            point = it.run_initial()
            progress.update(task, total=it.report.bytes_total or 1,
                            completed=it.report.bytes_total or 1)
            it.on_progress = None
        del point
    for it in items:
        rep = it.report
        con.print(f"[green]✓[/] {rep.vm_name}: first recovery point {rep.last_point_id} "
                  f"({rep.bytes_sent / MiB:.1f} MiB read, {rep.bytes_stored / MiB:.1f} MiB stored "
                  f"after zstd; holes and zero blocks skipped)")

    # -- delta cycles -----------------------------------------------------------------------------
    con.rule(f"[bold]delta replication: {opts.cycles} cycles every {opts.frequency_s:g} s")
    # one mid-run point is checked against the source as it was at its instant: the frozen
    # view of the source at the seal, read before the view is released
    probe_cycle = min(2, opts.cycles)
    mid_proof: list[tuple[str, str, str, str, str]] = []

    def probe(cycle: SealedCycle, point: PointInfo) -> None:
        for disk_id in sorted(cycle.disk_sizes):
            src = image_digest(hv.open_cycle_reader(cycle, disk_id))
            pt = image_digest(repos[cycle.vm_id].reader(point.point_id, disk_id))
            mid_proof.append((hv.get_vm(cycle.vm_id).name, point.point_id, disk_id, src, pt))

    for n in range(opts.cycles):
        due = min(it.next_due() for it in items)
        time.sleep(max(0.0, due - time.time()))
        for it in items:
            before = it.report.bytes_sent
            if n + 1 == probe_cycle:
                # a resync by hand freezes the whole disk, so the whole source image at the seal
                # instant can be read and compared with the point it produced
                it.before_release = probe
                compared = it.report.bytes_compared
                p = it.run_resync("demo: verify by checksums")
                it.before_release = None
                con.print(f"  cycle {n + 1}: {it.rec.vm_name} point {p.point_id} (resync by hand) "
                          f"compared {(it.report.bytes_compared - compared) / MiB:.0f} MiB of "
                          f"checksums, sent only {(it.report.bytes_sent - before) / 1024:.0f} KiB "
                          f"of differing 64 KiB blocks")
                continue
            p = it.run_cycle()
            con.print(f"  cycle {n + 1}: {it.rec.vm_name} point {p.point_id} "
                      f"({p.consistency.value}-consistent) shipped "
                      f"{(it.report.bytes_sent - before) / 1024:.0f} KiB, "
                      f"stored {p.bytes_stored / 1024:.0f} KiB, RPO {it.report.rpo_s or 0:.1f} s")
    mid = Table(title=f"cycle {probe_cycle}, taken while the guests were writing: the point vs "
                      "the source as it was at that instant")
    for col in ("VM", "point", "disk", "source at seal", "point (store)", "equal"):
        mid.add_column(col)
    for vm_name, pid, disk_id, src, pt in mid_proof:
        same = src == pt
        mid_ok.append(same)
        mid.add_row(vm_name, pid, disk_id, src[:16], pt[:16], "[green]yes[/]" if same else "[red]NO[/]")
    con.print(mid)

    # -- planned stop and the proof -------------------------------------------------------------
    con.rule("[bold]proof: shut the sources down, ship the last changes, compare digests")
    for it in items:
        hv.power_off(it.rec.vm_id)
        it.run_cycle()
        it.settle_replica()   # recorded at the final point even if that cycle overran
    ok = all(mid_ok)
    result = DemoResult(ok=True, seconds=0.0)
    proof = Table(title="replica at the final point vs the source (blake3 of each disk image)")
    for col in ("VM", "disk", "source disk", "point (store)", "replica", "equal"):
        proof.add_column(col)
    for it in items:
        latest = it.target.repo.latest()
        assert latest is not None
        vm = hv.get_vm(it.rec.vm_id)
        vm_entry: dict[str, Any] = {"vm": vm.name, "point": latest.point_id, "disks": []}
        hydr = hydrators[it.rec.item_id]
        for d in vm.disks:
            src = file_digest(hv.disk_path(vm.vm_id, d.disk_id), d.size)
            pt = image_digest(it.target.repo.reader(latest.point_id, d.disk_id))
            rep_d = file_digest(hydr.disk_path(d.disk_id), d.size)
            same = src == pt == rep_d
            ok = ok and same
            proof.add_row(vm.name, d.disk_id, src[:16], pt[:16], rep_d[:16],
                          "[green]yes[/]" if same else "[red]NO[/]")
            vm_entry["disks"].append({"disk": d.disk_id, "source": src, "point": pt,
                                      "replica": rep_d, "equal": same})
        result.vms.append(vm_entry)
    con.print(proof)

    # -- points and storage -----------------------------------------------------------------------
    pts = Table(title="recovery points and storage")
    for col in ("VM", "points", "app", "sent", "stored", "store size", "size × points"):
        pts.add_column(col, justify="left" if col == "VM" else "right")
    for it, entry in zip(items, result.vms, strict=True):
        points = it.target.repo.points()
        app = sum(1 for p in points if p.consistency.value == "app")
        rep = it.report
        logical = sum(points[-1].disk_sizes.values())
        stored = it.target.repo.storage_bytes()
        pts.add_row(rep.vm_name, str(len(points)), str(app), f"{rep.bytes_sent / MiB:.0f} MiB",
                    f"{rep.bytes_stored / MiB:.0f} MiB", f"{stored / MiB:.0f} MiB",
                    f"{logical * len(points) / MiB:.0f} MiB")
        entry.update({"points": [p.to_dict() for p in points], "report": rep.to_dict(),
                      "store_bytes": stored})
    con.print(pts)
    result.ok = ok
    result.seconds = time.monotonic() - t0
    if ok:
        con.print(Panel.fit(f"[bold green]replicas equal their sources bit for bit[/] "
                            f"({result.seconds:.1f} s). Work directory: {work}"))
    else:
        con.print(Panel.fit("[bold red]MISMATCH between source and replica[/]"))
    if opts.json_out:
        print(json.dumps({"ok": result.ok, "seconds": result.seconds, "vms": result.vms}, indent=1))
    return result
