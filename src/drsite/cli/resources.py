"""Command groups over the vault's operator API: sites, hosts, vms, groups, policies, items,
points, jobs, health, alerts, tokens. Thin: parse options, call the client, render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn

from drsite.cli.common import (
    EXIT_JOB_FAILED,
    CaOpt,
    JsonOpt,
    TokenOpt,
    VaultOpt,
    client,
    console,
    show,
)
from drsite.core.states import JobState, TaskState

sites = typer.Typer(help="Sites (a site groups hosts).", no_args_is_help=True)
hosts = typer.Typer(help="Hosts running 'drsite agent'.", no_args_is_help=True)
vms = typer.Typer(help="VMs discovered by the agents.", no_args_is_help=True)
groups = typer.Typer(help="Protection groups: a set of VMs one policy applies to.",
                     no_args_is_help=True)
policies = typer.Typer(help="Replication policies.", no_args_is_help=True)
items = typer.Typer(help="Protected items (one per protected VM).", no_args_is_help=True)
jobs = typer.Typer(help="Jobs: every long operation, with its tasks.", no_args_is_help=True)
alerts = typer.Typer(help="Alerts raised by health checks.", no_args_is_help=True)
tokens = typer.Typer(help="API tokens for operators (admin only).", no_args_is_help=True)


# -- sites --------------------------------------------------------------------------------------

@sites.command("list")
def sites_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List sites."""
    with client(vault, token, ca_file) as c:
        show(c.sites(), ["name", "description", "hosts"], title="sites", json_out=json_out)


@sites.command("create")
def sites_create(name: str, description: str = typer.Option("", help="Free text."),
                 vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Create a site."""
    with client(vault, token, ca_file) as c:
        show(c.create_site(name, description), ["name", "description"], title="site created",
             json_out=json_out)


# -- hosts / vms --------------------------------------------------------------------------------

@hosts.command("list")
def hosts_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List registered hosts and whether their agent is up."""
    with client(vault, token, ca_file) as c:
        show(c.hosts(), ["id", "name", "site", "up", "last_heartbeat", "store_url"],
             title="hosts", json_out=json_out)


@vms.command("list")
def vms_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
             ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List VMs reported by the agents."""
    with client(vault, token, ca_file) as c:
        show(c.vms(), ["vm_id", "name", "site", "host", "power", "item_id", "warning"], title="VMs",
             json_out=json_out)


# -- policies / groups --------------------------------------------------------------------------

@policies.command("list")
def policies_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
                  ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List policies."""
    with client(vault, token, ca_file) as c:
        show(c.policies(), ["name", "frequency_s", "retention_hours", "app_consistent_every_s",
                            "rpo_threshold_s", "resync_window"], title="policies",
             json_out=json_out)


@policies.command("create")
def policies_create(
    name: str,
    frequency: float = typer.Option(300.0, help="Seconds between cycles: 30, 300, 900 or any >= 5."),
    retention_hours: float = typer.Option(24.0, help="How long recovery points are kept."),
    app_consistent_every: float | None = typer.Option(3600.0, help="Seconds between "
                                                      "app-consistent points (omit: never)."),
    rpo_threshold: float = typer.Option(1800.0, help="Alert when the RPO passes this (s)."),
    resync_window: str = typer.Option("18:00-08:00", help="When automatic resyncs may run."),
    compression: bool = typer.Option(True, help="zstd compression of shipped data."),
    encryption: bool = typer.Option(False, help="Encrypt data at rest in the store."),
    bandwidth_limit: int | None = typer.Option(None, help="Bytes/s cap for replication traffic."),
    vault: str | None = VaultOpt, token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create a replication policy."""
    body: dict[str, Any] = {"name": name, "frequency_s": frequency,
                            "retention_hours": retention_hours,
                            "app_consistent_every_s": app_consistent_every,
                            "rpo_threshold_s": rpo_threshold, "resync_window": resync_window,
                            "compression": compression, "encryption": encryption,
                            "bandwidth_limit_bps": bandwidth_limit}
    with client(vault, token, ca_file) as c:
        show(c.create_policy(body), ["name", "frequency_s", "retention_hours"],
             title="policy created", json_out=json_out)


@groups.command("list")
def groups_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List protection groups."""
    with client(vault, token, ca_file) as c:
        show(c.groups(), ["name", "site", "target_site", "policy", "match"],
             title="protection groups", json_out=json_out)


@groups.command("create")
def groups_create(
    name: str,
    site: str = typer.Option(..., help="Site whose VMs this group holds."),
    target_site: str = typer.Option(..., help="Recovery site."),
    policy: str | None = typer.Option(None, help="Policy to associate (protects matching VMs)."),
    vm: list[str] = typer.Option([], help="VM names to include (repeatable)."),
    host: list[str] = typer.Option([], help="Host names whose VMs are included (repeatable)."),
    vault: str | None = VaultOpt, token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create a protection group (with a policy, its VMs are protected, also VMs found later)."""
    body = {"name": name, "site": site, "target_site": target_site, "policy": policy,
            "match": {"vm_names": vm, "hosts": host, "labels": []}}
    with client(vault, token, ca_file) as c:
        show(c.create_group(body), ["name", "site", "target_site", "policy"],
             title="group created", json_out=json_out)


# -- items / points -----------------------------------------------------------------------------

ITEM_COLS = ["id", "vm_name", "group", "protection", "state", "health", "rpo_s",
             "last_point_time"]


@items.command("list")
def items_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List protected items with health and measured RPO."""
    with client(vault, token, ca_file) as c:
        show(c.items(), ITEM_COLS, title="protected items", json_out=json_out)


@items.command("show")
def items_show(item_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Show one item with its report."""
    with client(vault, token, ca_file) as c:
        it = c.item(item_id)
        show(it, [*ITEM_COLS, "health_reasons"], title=f"item {item_id}", json_out=json_out)


@items.command("points")
def items_points(item_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List an item's recovery points."""
    with client(vault, token, ca_file) as c:
        show(c.points(item_id), ["point_id", "created_at", "consistency", "kind",
                                 "bytes_written", "bytes_stored"],
             title=f"recovery points of {item_id}", json_out=json_out)


def _follow(c: Any, job_id: str, json_out: bool, wait: bool) -> None:
    if not wait:
        show({"job_id": job_id}, ["job_id"], title="job started", json_out=json_out)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console, disable=json_out) as progress:
        task = progress.add_task(job_id, total=100)

        def update(job: dict[str, Any]) -> None:
            running = [t for t in job.get("tasks", []) if t.get("state") == TaskState.RUNNING]
            step = running[0].get("title") or running[0]["name"] if running else job.get("state")
            desc = f"{job.get('kind')} {job.get('target') or ''}: {step}"
            progress.update(task, description=desc, completed=float(job.get("progress") or 0))

        job = c.wait_job(job_id, on_update=update)
    show(job, ["id", "kind", "target", "state", "progress", "error"], title="job", json_out=json_out)
    if job.get("state") != JobState.SUCCEEDED:
        raise typer.Exit(EXIT_JOB_FAILED)


@items.command("protect")
def items_protect(vm_id: str, group: str = typer.Option(..., help="Protection group."),
                  wait: bool = typer.Option(True, help="Follow the job until it ends."),
                  vault: str | None = VaultOpt, token: str | None = TokenOpt,
                  ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Enable protection of a VM (EnableProtection job)."""
    with client(vault, token, ca_file) as c:
        _follow(c, c.protect(vm_id, group)["job_id"], json_out, wait)


@items.command("unprotect")
def items_unprotect(item_id: str, wait: bool = typer.Option(True),
                    vault: str | None = VaultOpt, token: str | None = TokenOpt,
                    ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Disable protection (DisableProtection job)."""
    with client(vault, token, ca_file) as c:
        _follow(c, c.unprotect(item_id)["job_id"], json_out, wait)


@items.command("resync")
def items_resync(item_id: str, wait: bool = typer.Option(True),
                 vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Resynchronise now by checksums (outside the window too)."""
    with client(vault, token, ca_file) as c:
        _follow(c, c.resync(item_id)["job_id"], json_out, wait)


# -- jobs ---------------------------------------------------------------------------------------

@jobs.command("list")
def jobs_list(state: str | None = typer.Option(None), kind: str | None = typer.Option(None),
              limit: int = typer.Option(50), vault: str | None = VaultOpt,
              token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
              json_out: bool = JsonOpt) -> None:
    """List jobs, newest first."""
    with client(vault, token, ca_file) as c:
        show(c.jobs(state=state, kind=kind, limit=limit),
             ["id", "kind", "target", "state", "progress", "created_at"], title="jobs",
             json_out=json_out)


@jobs.command("show")
def jobs_show(job_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
              ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Show a job and its ordered tasks."""
    with client(vault, token, ca_file) as c:
        job = c.job(job_id)
        if json_out:
            show(job, [], title="", json_out=True)
            return
        show(job, ["id", "kind", "target", "state", "progress", "message", "error"], title="job",
             json_out=False)
        show(job.get("tasks", []), ["name", "state", "progress", "started_at", "ended_at",
                                    "message"], title="tasks", json_out=False)


@jobs.command("cancel")
def jobs_cancel(job_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Ask a running job to stop at its next safe point."""
    with client(vault, token, ca_file) as c:
        show(c.cancel_job(job_id) or {"job_id": job_id}, ["job_id", "state"],
             title="cancel requested", json_out=json_out)


# -- health / alerts / tokens -------------------------------------------------------------------

def health(vault: str | None = VaultOpt, token: str | None = TokenOpt,
           ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Health summary: items by health, worst RPOs, agents up/down."""
    with client(vault, token, ca_file) as c:
        h = c.health()
        if json_out:
            show(h, [], title="", json_out=True)
            return
        console.print(h)


@alerts.command("list")
def alerts_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List open alerts."""
    with client(vault, token, ca_file) as c:
        show(c.alerts(), ["id", "severity", "kind", "subject", "message", "raised_at"],
             title="alerts", json_out=json_out)


@tokens.command("create")
def tokens_create(name: str, role: str = typer.Option("reader", help="admin, operator or reader."),
                  vault: str | None = VaultOpt, token: str | None = TokenOpt,
                  ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Create an API token (its secret is shown once)."""
    with client(vault, token, ca_file) as c:
        show(c.create_token(name, role), ["name", "role", "token"], title="token created",
             json_out=json_out)


@tokens.command("list")
def tokens_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List API tokens (never their secrets)."""
    with client(vault, token, ca_file) as c:
        show(c.tokens(), ["name", "role", "created_at", "last_used_at"], title="tokens",
             json_out=json_out)
