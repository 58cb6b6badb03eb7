"""``drsite drills list|show|run``: recovery drills of plans (test failover, proven)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from drsite.cli.common import (
    EXIT_JOB_FAILED,
    CaOpt,
    JsonOpt,
    TokenOpt,
    VaultOpt,
    client,
    show,
)

drills = typer.Typer(no_args_is_help=True, help="Recovery drills: scheduled, proven test failovers.")

COLS = ["id", "plan", "state", "trigger", "started_at", "rto_s", "rpo_s"]
VM_COLS = ["vm", "point_id", "rpo_s", "rto_s", "verified", "guest_ready", "ok", "reason"]


@drills.command("list")
def drills_list(plan: str | None = typer.Option(None, help="Only this plan's drills."),
                vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """The drill history, newest first."""
    with client(vault, token, ca_file) as c:
        show(c.drills(plan), COLS, title="drills", json_out=json_out)


def _show(d: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(d, indent=1, default=str))
        return
    show(d, COLS, title=f"drill {d.get('id')}", json_out=False)
    rows = [{**v, "probe": (v.get("probe") or {}).get("rc")}
            for v in (d.get("report") or {}).get("vms") or []]
    show(rows, [*VM_COLS, "probe"], title="per VM (RPO: age of the point; RTO: to running and "
                                          "answering)", json_out=False)


@drills.command("show")
def drills_show(drill_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """One drill with its report."""
    with client(vault, token, ca_file) as c:
        _show(c.drill(drill_id), json_out)


@drills.command("run")
def drills_run(plan: str, wait: bool = typer.Option(True, help="Follow the drill until it ends."),
               vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Run a drill of a plan now; exit code 1 when it fails."""
    with client(vault, token, ca_file) as c:
        started = c.run_drill(plan)
        if not wait:
            show(started, ["drill_id", "job_id"], title="drill started", json_out=json_out)
            return
        c.wait_job(str(started["job_id"]), timeout=24 * 3600.0)
        d = c.drill(str(started["drill_id"]))
    _show(d, json_out)
    if d.get("state") != "passed":
        raise typer.Exit(EXIT_JOB_FAILED)
