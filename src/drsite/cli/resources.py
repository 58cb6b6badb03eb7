"""Command groups over the vault's operator API: sites, hosts, vms, groups, policies, items,
points, jobs, health, alerts, tokens. Thin: parse options, call the client, render."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn

from drsite.cli.common import (
    EXIT_JOB_FAILED,
    AllOpt,
    CaOpt,
    JsonOpt,
    LimitOpt,
    TokenOpt,
    VaultOpt,
    client,
    console,
    fetch_list,
    show,
    show_list,
)
from drsite.core.errors import InvalidInput, NotFound
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
audit = typer.Typer(help="The audit trail: who did what, from where, when (admin only).",
                    no_args_is_help=True)


# -- sites --------------------------------------------------------------------------------------

@sites.command("list")
def sites_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List sites."""
    with client(vault, token, ca_file) as c:
        show(c.sites(), ["name", "description", "hosts", "store_host"], title="sites",
             json_out=json_out)


@sites.command("create")
def sites_create(name: str, description: str = typer.Option("", help="Free text."),
                 vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Create a site."""
    with client(vault, token, ca_file) as c:
        show(c.create_site(name, description), ["name", "description"], title="site created",
             json_out=json_out)


@sites.command("set-store")
def sites_set_store(site: str,
                    host: str | None = typer.Argument(None, help="Host id, or host name in "
                                                                 "SITE (omit with --none)."),
                    none: bool = typer.Option(False, "--none", help="The site serves no store."),
                    force: bool = typer.Option(False, help="Move the role although items "
                                                           "replicate to the current store host "
                                                           "(their points stay behind)."),
                    vault: str | None = VaultOpt, token: str | None = TokenOpt,
                    ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Give SITE's store role to HOST (admin). Only that host's agent serves the site's
    recovery store: it gets the store's access list and recovery book, and its break-glass
    failovers are believed. A store URL another host announces is ignored and alerted."""
    if (host is None) == (not none):
        raise InvalidInput("give either HOST or --none",
                           hint=f"'drsite sites set-store {site} HOST' (see 'drsite hosts list').")
    with client(vault, token, ca_file) as c:
        res = c.set_store_host(site, host, force=force)
        if json_out:
            show(res, [], title="", json_out=True)
            return
        who = res.get("store_host_name") or "no host"
        typer.echo(f"site {site}: store role held by {who}"
                   + ("" if res.get("changed") else " (unchanged)"))
        if res.get("moved_items"):
            typer.echo(f"{len(res['moved_items'])} item(s) stay on the old store host's store "
                       "and must be protected anew: 'drsite items unprotect ITEM', then "
                       "'drsite items protect VM --group GROUP'")


# -- hosts / vms --------------------------------------------------------------------------------

@hosts.command("list")
def hosts_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List registered hosts and whether their agent is up."""
    with client(vault, token, ca_file) as c:
        show(c.hosts(), ["id", "name", "site", "up", "last_heartbeat", "store_role", "store_url"],
             title="hosts", json_out=json_out)


def resolve_host(hosts_: list[dict[str, Any]], host: str, site: str | None) -> dict[str, Any]:
    """The host named ``host`` (its id, or its name in ``site``)."""
    by_id = [h for h in hosts_ if h["id"] == host]
    if by_id:
        return by_id[0]
    named = [h for h in hosts_ if h["name"] == host and (site is None or h["site"] == site)]
    if len(named) == 1:
        return named[0]
    if not named:
        raise NotFound(f"no host {host!r}" + (f" in site {site}" if site else ""),
                       hint="List hosts with 'drsite hosts list'.")
    raise InvalidInput(f"{len(named)} hosts are named {host} (sites "
                       f"{', '.join(sorted(h['site'] for h in named))})",
                       hint="Give the host id, or --site SITE.")


@hosts.command("reissue")
def hosts_reissue(host: str = typer.Argument(..., help="Host id, or host name."),
                  site: str | None = typer.Option(None, help="Site of the host (when names "
                                                              "repeat across sites)."),
                  ttl: int = typer.Option(3600, min=60, max=30 * 86400,
                                          help="Seconds until the key expires."),
                  vault: str | None = VaultOpt, token: str | None = TokenOpt,
                  ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Print a one-time key that replaces HOST's certificate (admin). On the host, run
    'drsite agent register --vault URL --key KEY --data DIR': a new key pair and certificate
    replace the old ones, which stop working."""
    with client(vault, token, ca_file) as c:
        h = resolve_host(c.hosts(), host, site)
        res = c.reissue_host(h["id"], ttl)
        if json_out:
            show(res, [], title="", json_out=True)
        else:
            typer.echo(res["key"])


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
    scrub_interval: float | None = typer.Option(86400.0, help="Seconds between scrubs of the "
                                                "recovery store (every object hash-checked)."),
    scrub_rate: int | None = typer.Option(32 << 20, help="Bytes/s a scrub may read."),
    vault: str | None = VaultOpt, token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create a replication policy."""
    body: dict[str, Any] = {"name": name, "frequency_s": frequency,
                            "retention_hours": retention_hours,
                            "app_consistent_every_s": app_consistent_every,
                            "rpo_threshold_s": rpo_threshold, "resync_window": resync_window,
                            "compression": compression, "encryption": encryption,
                            "bandwidth_limit_bps": bandwidth_limit,
                            "scrub_interval_s": scrub_interval, "scrub_rate_bps": scrub_rate}
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
def items_list(health: str | None = typer.Option(None, help="normal, warning or critical."),
               state: str | None = typer.Option(None, help="Replication state, e.g. "
                                                           "protected, resyncing, critical."),
               host: str | None = typer.Option(None, help="Source host (name or id)."),
               site: str | None = typer.Option(None, help="Source site."),
               group: str | None = typer.Option(None, help="Protection group."),
               search: str | None = typer.Option(None, help="Part of the VM name (any case)."),
               include_removed: bool = typer.Option(False, help="Also removed and failed items."),
               limit: int = LimitOpt, all_pages: bool = AllOpt,
               vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List protected items (by VM name) with health and measured RPO."""
    with client(vault, token, ca_file) as c:
        rows, total = fetch_list(c, "/items", limit=limit, all_pages=all_pages, health=health,
                                 state=state, host=host, site=site, group=group, q=search,
                                 all="true" if include_removed else None)
        show_list(rows, total, ITEM_COLS, title="protected items", what="items",
                  json_out=json_out)


@items.command("show")
def items_show(item_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Show one item with its report."""
    with client(vault, token, ca_file) as c:
        it = c.item(item_id)
        show(it, [*ITEM_COLS, "health_reasons"], title=f"item {item_id}", json_out=json_out)


@items.command("points")
def items_points(item_id: str,
                 consistency: str | None = typer.Option(None, help="crash or app."),
                 limit: int = typer.Option(1000, "--limit", min=1, help="How many (oldest "
                                                                       "first)."),
                 all_pages: bool = AllOpt,
                 vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List an item's recovery points, oldest first."""
    with client(vault, token, ca_file) as c:
        rows, total = fetch_list(c, f"/items/{item_id}/points", limit=limit,
                                 all_pages=all_pages, consistency=consistency)
        rows = [{**p, "damaged": (p.get("damage") or {}).get("reason") or ""} for p in rows]
        show_list(rows, total, ["point_id", "created_at", "consistency", "kind",
                                "bytes_written", "bytes_stored", "damaged"],
                  title=f"recovery points of {item_id}", what="points", json_out=json_out)


@items.command("verify")
def items_verify(item_id: str,
                 point: str | None = typer.Option(None, "--point", help="One point id."),
                 all_points: bool = typer.Option(False, "--all", help="Every kept point."),
                 vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Prove recovery points restore exactly to what their manifests say (default: the
    newest). Reads every disk whole in the store; exit code 1 when a point is damaged."""
    with client(vault, token, ca_file) as c:
        job_id = c.verify(item_id, point=point, all_points=all_points)["job_id"]
        job = c.wait_job(job_id, timeout=24 * 3600.0)
        res = c.verification(item_id, job_id)
    rep = dict(res.get("report") or {})
    rows = [{"point_id": p.get("point_id"), "ok": p.get("ok"), "disk": d.get("disk_id"),
             "bytes_read": d.get("bytes_read"), "digest": (d.get("digest") or "")[:16],
             "damaged": d.get("damaged") or (d.get("errors") or [""])[0]}
            for p in rep.get("points") or [] for d in p.get("disks") or [{}]]
    if json_out:
        print(json.dumps(res, indent=1, default=str))
    else:
        show(rows, ["point_id", "ok", "disk", "bytes_read", "digest", "damaged"],
             title=f"verification of {item_id}: {job.get('message')}", json_out=False)
    if job.get("state") != JobState.SUCCEEDED:
        raise typer.Exit(EXIT_JOB_FAILED)


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
def jobs_list(state: str | None = typer.Option(None, help="A job state, or active."),
              kind: str | None = typer.Option(None, help="A job kind, e.g. EnableProtection."),
              item: str | None = typer.Option(None, help="Only this item's jobs (item id)."),
              limit: int = typer.Option(50, "--limit", min=1, help="How many, newest first."),
              all_pages: bool = AllOpt, vault: str | None = VaultOpt,
              token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
              json_out: bool = JsonOpt) -> None:
    """List jobs, newest first."""
    with client(vault, token, ca_file) as c:
        rows, total = fetch_list(c, "/jobs", limit=limit, all_pages=all_pages, state=state,
                                 kind=kind, item=item)
        show_list(rows, total, ["id", "kind", "target", "state", "progress", "created_at"],
                  title="jobs", what="jobs", json_out=json_out)


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
def alerts_list(state: str | None = typer.Option(None, help="active or cleared (default: both)."),
                severity: str | None = typer.Option(None, help="warning or critical."),
                limit: int = LimitOpt, all_pages: bool = AllOpt,
                vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List alerts, newest first."""
    with client(vault, token, ca_file) as c:
        rows, total = fetch_list(c, "/alerts", limit=limit, all_pages=all_pages, state=state,
                                 severity=severity)
        show_list(rows, total, ["id", "severity", "kind", "subject", "message", "raised_at",
                                "active"], title="alerts", what="alerts", json_out=json_out)


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


# -- audit --------------------------------------------------------------------------------------

def parse_since(value: str | None, now: float) -> float | None:
    """``--since``: epoch seconds, or a duration back from now (``90s``, ``15m``, ``2h``, ``1d``)."""
    if value is None:
        return None
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    text = value.strip().lower()
    try:
        if text and text[-1] in units:
            return now - float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise InvalidInput(f"--since {value!r} is neither epoch seconds nor a duration",
                           hint="Use e.g. 15m, 2h, 1d, or epoch seconds.") from None


@audit.command("list")
def audit_list(limit: int = typer.Option(100, min=1, max=1000, help="Entries to show."),
               since: str | None = typer.Option(None, help="Only entries since then: epoch "
                                                           "seconds or a duration (15m, 2h, 1d)."),
               actor: str | None = typer.Option(None, help="Only this token name or host id."),
               all_pages: bool = typer.Option(False, "--all", help="Every page, not only the "
                                                                   "newest LIMIT entries."),
               vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List the audit trail, newest first."""
    with client(vault, token, ca_file) as c:
        rows, total = fetch_list(c, "/audit", limit=limit, all_pages=all_pages,
                                 since=parse_since(since, time.time()), actor=actor)
        show_list(rows, total, ["at", "actor_kind", "actor", "client", "action", "target",
                                "outcome", "error_code"], title="audit", what="entries",
                  json_out=json_out)
