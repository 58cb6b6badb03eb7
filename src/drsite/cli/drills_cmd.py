"""``drsite drills list|show|run`` and ``drsite drills schedule --group``: recovery drills of
plans and of protection groups (test failover, proven)."""

from __future__ import annotations

import json
from typing import Any

import typer

from drsite.cli.common import (
    EXIT_JOB_FAILED,
    Conn,
    SortOpt,
    WhereOpt,
    select_rows,
    show,
    vault_command,
)

drills = typer.Typer(no_args_is_help=True, help="Recovery drills: scheduled, proven test failovers.")

COLS = ["id", "plan", "group", "state", "trigger", "started_at", "rto_s", "rpo_s"]
VM_COLS = ["vm", "point_id", "rpo_s", "rto_s", "verified", "guest_ready", "ok", "reason"]


@vault_command(drills, "list")
def drills_list(conn: Conn,
                plan: str | None = typer.Option(None, help="Only this plan's drills."),
                group: str | None = typer.Option(None, help="Only this group's drills."),
                where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """The drill history, newest first."""
    with conn.client() as c:
        show(select_rows(c.drills(plan, group=group), where, sort), COLS, title="drills", json_out=conn.json)


def _show(d: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(d, indent=1, default=str))
        return
    show(d, COLS, title=f"drill {d.get('id')}", json_out=False)
    rows = [{**v, "probe": (v.get("probe") or {}).get("rc")}
            for v in (d.get("report") or {}).get("vms") or []]
    show(rows, [*VM_COLS, "probe"], title="per VM (RPO: age of the point; RTO: to running and "
                                          "answering)", json_out=False)


@vault_command(drills, "show")
def drills_show(conn: Conn, drill_id: str) -> None:
    """One drill with its report."""
    with conn.client() as c:
        _show(c.drill(drill_id), conn.json)


@vault_command(drills, "run")
def drills_run(conn: Conn, plan: str | None = typer.Argument(None, help="The recovery plan to "
                                                                          "drill."),
               group: str | None = typer.Option(None, help="Drill a protection group's VMs "
                                                "instead of a plan."),
               wait: bool = typer.Option(True, help="Follow the drill until it ends.")) -> None:
    """Run a drill of a plan (or of a group) now; exit code 1 when it fails."""
    if (plan is None) == (group is None):
        raise typer.BadParameter("give a plan, or --group GROUP (one of them)")
    with conn.client() as c:
        started = c.run_drill(plan, group=group)
        if not wait:
            show(started, ["drill_id", "job_id"], title="drill started", json_out=conn.json)
            return
        c.wait_job(str(started["job_id"]), timeout=24 * 3600.0)
        d = c.drill(str(started["drill_id"]))
    _show(d, conn.json)
    if d.get("state") != "passed":
        raise typer.Exit(EXIT_JOB_FAILED)


@vault_command(drills, "schedule")
def drills_schedule(
    conn: Conn,
    group: str = typer.Option(..., help="The protection group whose VMs are drilled."),
    every: str | None = typer.Option(None, help="Seconds, 'daily' or 'weekly'; omit with "
                                     "--off."),
    window: str | None = typer.Option(None, help="Local time window, HH:MM-HH:MM."),
    boot_timeout: float = typer.Option(120.0, help="Seconds for a test VM to answer."),
    probe: str | None = typer.Option(None, help="Shell script run on the recovery host; "
                                     "exit 0 = the VM works (env: DRSITE_DRILL_IPS, ...)."),
    probe_timeout: float = typer.Option(60.0, help="Seconds for one probe run."),
    off: bool = typer.Option(False, "--off", help="End the group's drill schedule."),
) -> None:
    """Give a protection group a drill schedule (plans carry theirs in the plan document)."""
    if off == (every is not None):
        raise typer.BadParameter("give --every, or --off")
    spec: dict[str, Any] | None = None if off else {
        "every_s": every, "window": window, "boot_timeout_s": boot_timeout,
        "probe": {"script": probe, "timeout_s": probe_timeout} if probe else None}
    with conn.client() as c:
        g = c.set_group_drill(group, spec)
    show({"group": g.get("name"), "drill": json.dumps(g.get("drill"))}, ["group", "drill"],
         title="drill schedule", json_out=conn.json)
