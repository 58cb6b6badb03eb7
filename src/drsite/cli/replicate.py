"""``drsite replicate``: run the replication engine for one file VM on this host."""

from __future__ import annotations

import contextlib
import json
import time
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from drsite.core.errors import DrsiteError
from drsite.replication.report import ItemReport

# the replication engine (numpy, the store, the file driver) is imported by the command that
# runs it, not by every ``drsite`` invocation


class Until(StrEnum):
    initial = "initial"
    cycles = "cycles"
    forever = "forever"


def replicate(
    vms: Path = typer.Option(..., help="Root directory of the file hypervisor (primary host)."),
    vm: str = typer.Option(..., help="Name of the VM to protect."),
    store: Path = typer.Option(..., help="Recovery store directory."),
    state: Path = typer.Option(..., help="Directory for the engine's item records."),
    replicas: Path | None = typer.Option(None, help="Keep a hydrated replica here."),
    frequency: float = typer.Option(30.0, min=5.0, help="Seconds between delta cycles (>= 5)."),
    until: Until = typer.Option(Until.initial, help="Stop after the initial point, after --cycles "
                                                    "delta cycles, or never."),
    cycles: int = typer.Option(1, min=0, help="Delta cycles to run with --until cycles."),
    resync: bool = typer.Option(False, help="Start a resync by hand first."),
    resync_window: str = typer.Option("always", help="'always' or HH:MM-HH:MM (local time)."),
    retention_hours: float = typer.Option(
        24.0, min=0.001, help="Keep recovery points this long (every point of the first hour; "
                              "older ones thinned to one per hour)."),
    json_out: bool = typer.Option(False, "--json", help="Print the item's report as JSON."),
) -> None:
    """Replicate one file VM to a local recovery store (resumes whatever a crash left)."""
    from drsite.core.retention import rule_for_hours
    from drsite.memtune import tune_malloc
    from drsite.replication.driver import ReplicationSettings
    from drsite.replication.local import LocalPaths, open_item
    from drsite.replication.planner import ALWAYS, ResyncWindow

    tune_malloc()   # before the engine's threads exist
    window = ALWAYS if resync_window == "always" else ResyncWindow(*resync_window.split("-", 1))
    settings = ReplicationSettings(frequency_s=frequency, resync_window=window,
                                   retention=rule_for_hours(retention_hours))
    item = open_item(LocalPaths(vms, store, replicas, state), vm, settings)
    con = Console(stderr=True)
    if resync:
        item.request_resync()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=con, disable=json_out) as progress:
        task = progress.add_task(vm, total=None)

        def show(rep: ItemReport) -> None:
            progress.update(task, description=f"{vm}: {rep.step or rep.state.value}",
                            total=rep.bytes_total or None, completed=rep.bytes_done)

        item.on_progress = show
        try:
            if resync:
                item.run_resync()
            item.run_initial()
            done = 0
            while until is Until.forever or (until is Until.cycles and done < cycles):
                time.sleep(max(0.0, item.next_due() - time.time()))
                item.run_cycle()
                done += 1
        except BaseException:
            with contextlib.suppress(DrsiteError):
                item.settle_replica()   # best effort; the next run's catch-up settles the rest
            raise
        item.settle_replica()   # the last cycle's replica, if it overran and deferred it
    rep = item.report
    if json_out:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        con.print(f"{rep.vm_name}: {rep.state.value}, health {rep.health.value}, last point "
                  f"{rep.last_point_id}, sent {rep.bytes_sent} bytes, stored {rep.bytes_stored}")
