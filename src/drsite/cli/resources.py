"""Command groups over the vault's operator API: sites, hosts, items and points, jobs, health,
alerts, events, tokens, audit. Thin: parse options, call the client, render. (VMs: ``vms_cmd``;
policies and groups: ``protection_cmd``; failover: ``failover_cmd``.)"""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table

from drsite.cli.common import (
    EXIT_JOB_FAILED,
    AllOpt,
    Conn,
    ItemArg,
    LimitOpt,
    SortOpt,
    WhereOpt,
    console,
    fetch_list,
    follow_job,
    item_ref,
    list_rows,
    select_rows,
    show,
    show_list,
    vault_command,
)
from drsite.core.errors import InvalidInput, NotFound
from drsite.core.states import ItemProtection, JobState

sites = typer.Typer(help="Sites (a site groups hosts).", no_args_is_help=True)
hosts = typer.Typer(help="Hosts running 'drsite agent'.", no_args_is_help=True)
items = typer.Typer(help="Protected items: one per protected VM and direction of replication "
                         "(failover and re-protect make new ones; 'drsite items history' "
                         "follows a VM across them).", no_args_is_help=True)
jobs = typer.Typer(help="Jobs: every long operation, with its tasks.", no_args_is_help=True)
alerts = typer.Typer(help="Alerts raised by health checks.", no_args_is_help=True)
events = typer.Typer(help="The event trail: what happened to items, jobs, hosts, groups, …",
                     no_args_is_help=True)
tokens = typer.Typer(help="API tokens for operators (admin only).", no_args_is_help=True)
audit = typer.Typer(help="The audit trail: who did what, from where, when (admin only).",
                    no_args_is_help=True)


# -- sites / hosts ------------------------------------------------------------------------------

@vault_command(sites, "list")
def sites_list(conn: Conn) -> None:
    """List sites."""
    with conn.client() as c:
        show(c.sites(), ["name", "description", "hosts", "store_host"], title="sites", json_out=conn.json)


@vault_command(sites, "show")
def sites_show(conn: Conn, name: str) -> None:
    """One site: its fields, its hosts (which one serves the site's store) and its VMs."""
    with conn.client() as c:
        site = next((x for x in c.sites() if x["name"] == name), None)
        if site is None:
            raise NotFound(f"no site {name!r}", hint="List sites with 'drsite sites list'.")
        hosts_ = [h for h in c.hosts() if h["site"] == name]
        vms_ = [v for v in c.vms() if v["site"] == name]
    if conn.json:
        show({**site, "hosts": hosts_, "vms": vms_}, [], title="", json_out=True)
        return
    for k, v in site.items():
        console.print(f"[bold]{k}[/]: {v}")
    show(hosts_, HOST_COLS, title=f"hosts of {name}", json_out=False)
    show(vms_, SITE_VM_COLS, title=f"VMs of {name}", json_out=False)


@vault_command(sites, "create")
def sites_create(conn: Conn, name: str,
                 description: str = typer.Option("", help="Free text.")) -> None:
    """Create a site (admin)."""
    with conn.client() as c:
        show(c.create_site(name, description), ["name", "description"], title="site created",
             json_out=conn.json)


@vault_command(sites, "set-store")
def sites_set_store(conn: Conn, site: str,
                    host: str | None = typer.Argument(None, help="Host id, or host name in "
                                                                 "SITE (omit with --none)."),
                    none: bool = typer.Option(False, "--none", help="The site serves no store."),
                    force: bool = typer.Option(False, help="Move the role although items "
                                                           "replicate to the current store host "
                                                           "(their points stay behind).")) -> None:
    """Give SITE's store role to HOST (admin). Only that host's agent serves the site's
    recovery store: it gets the store's access list and recovery book, and its break-glass
    failovers are believed. A store URL another host announces is ignored and alerted."""
    if (host is None) == (not none):
        raise InvalidInput("give either HOST or --none",
                           hint=f"'drsite sites set-store {site} HOST' (see 'drsite hosts list').")
    with conn.client() as c:
        res = c.set_store_host(site, host, force=force)
    if conn.json:
        print(json.dumps(res, indent=2, sort_keys=True, default=str))
        return
    who = res.get("store_host_name") or "no host"
    console.print(f"site {site}: store role held by {who}"
                  + ("" if res.get("changed") else " (unchanged)"))
    if res.get("moved_items"):
        console.print(f"{len(res['moved_items'])} item(s) stay on the old store host's store "
                      "and must be protected anew: 'drsite items unprotect ITEM', then "
                      "'drsite items protect VM --group GROUP'")


HOST_COLS = ["id", "name", "site", "up", "last_heartbeat", "store_role", "store_url"]
SITE_VM_COLS = ["vm_id", "name", "host", "power", "item_id", "warning"]


@vault_command(hosts, "list")
def hosts_list(conn: Conn, where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List registered hosts and whether their agent is up."""
    with conn.client() as c:
        show(select_rows(c.hosts(), where, sort), HOST_COLS, title="hosts", json_out=conn.json)


@vault_command(hosts, "show")
def hosts_show(conn: Conn, host: str = typer.Argument(..., help="Host id, or host name."),
               site: str | None = typer.Option(None, help="Site of the host (when names "
                                                           "repeat across sites).")) -> None:
    """One host: every field (agent version, certificate revoked?, store role) and its VMs."""
    with conn.client() as c:
        h = resolve_host(c.hosts(), host, site, revoked=True)
        vms_ = [v for v in c.vms() if v["host_id"] == h["id"]]
    if conn.json:
        show({**h, "vms": vms_}, [], title="", json_out=True)
        return
    for k, v in h.items():
        console.print(f"[bold]{k}[/]: {v}")
    show(vms_, SITE_VM_COLS, title=f"VMs on {h['name']}", json_out=False)


def resolve_host(hosts_: list[dict[str, Any]], host: str | None, site: str | None, *,
                 revoked: bool = False) -> dict[str, Any]:
    """The host named ``host`` (its id, or its name in ``site``); without ``host``, the one
    host of ``site``. Revoked hosts are found only with ``revoked`` (to show or re-issue
    them), and only by id or when no live host has the name."""
    live = [h for h in hosts_ if not h.get("revoked")]
    if revoked and host is not None and not any(
            h["id"] == host or (h["name"] == host and (site is None or h["site"] == site))
            for h in live):
        live = list(hosts_)
    if host is None:
        if site is None:
            raise InvalidInput("which host?", hint="Give --host HOST or --site SITE "
                                                   "('drsite hosts list' lists them).")
        here = [h for h in live if h["site"] == site]
        if len(here) == 1:
            return here[0]
        raise InvalidInput(f"site {site} has {len(here)} hosts" + (
            f" ({', '.join(h['name'] for h in here)})" if here else ""),
            hint="Give --host HOST ('drsite hosts list' lists them).")
    by_id = [h for h in live if h["id"] == host]
    if by_id:
        return by_id[0]
    named = [h for h in live if h["name"] == host and (site is None or h["site"] == site)]
    if len(named) == 1:
        return named[0]
    if not named:
        raise NotFound(f"no host {host!r}" + (f" in site {site}" if site else ""),
                       hint="List hosts with 'drsite hosts list'.")
    raise InvalidInput(f"{len(named)} hosts are named {host} (sites "
                       f"{', '.join(sorted(h['site'] for h in named))})",
                       hint="Give the host id, or --site SITE.")


@vault_command(hosts, "reissue")
def hosts_reissue(conn: Conn, host: str = typer.Argument(..., help="Host id, or host name."),
                  site: str | None = typer.Option(None, help="Site of the host (when names "
                                                              "repeat across sites)."),
                  ttl: int = typer.Option(3600, min=60, max=30 * 86400,
                                          help="Seconds until the key expires.")) -> None:
    """Print a one-time key that replaces HOST's certificate (admin). On the host, run
    'drsite agent register --vault URL --key KEY --data DIR': a new key pair and certificate
    replace the old ones, which stop working."""
    with conn.client() as c:
        h = resolve_host(c.hosts(), host, site, revoked=True)
        res = c.reissue_host(h["id"], ttl)
        if conn.json:
            show(res, [], title="", json_out=True)
        else:
            typer.echo(res["key"])


# -- items / points -----------------------------------------------------------------------------

ITEM_COLS = ["id", "vm_name", "group", "status", "health", "rpo_s", "last_point_time"]


def item_status(it: dict[str, Any]) -> str:
    """One word for where an item stands: its protection while a failover holds it (or it
    is being enabled or removed), else its replication state."""
    if it.get("protection") != ItemProtection.PROTECTED:
        return str(it.get("protection"))
    return str(it.get("state"))


def item_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**it, "status": item_status(it)} for it in rows]


@vault_command(items, "list")
def items_list(conn: Conn,
               health: str | None = typer.Option(None, help="normal, warning or critical."),
               state: str | None = typer.Option(None, help="Replication state, e.g. "
                                                           "protected, resyncing, critical."),
               host: str | None = typer.Option(None, help="Source host (name or id)."),
               site: str | None = typer.Option(None, help="Source site."),
               group: str | None = typer.Option(None, help="Protection group."),
               search: str | None = typer.Option(None, help="Part of the VM name (any case)."),
               include_removed: bool = typer.Option(False, help="Also removed, failed and "
                                                                "re-protected items."),
               limit: int = LimitOpt, all_pages: bool = AllOpt,
               where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List protected items (by VM name) with health and measured RPO. Status: the replication
    state of a protected item (protected, resyncing, …), or where a failover holds it
    (failed_over, committed, reprotected). --where health=, state= or protection= is filtered
    by the vault; any other --where, and --sort, read every page (--sort sorts every matching
    item, then --limit cuts)."""
    with conn.client() as c:
        rows, total = list_rows(c, "/items", limit=limit, all_pages=all_pages, where=where,
                                sort=sort, server_fields=("health", "state", "protection"),
                                rows_of=item_rows, health=health, state=state, host=host,
                                site=site, group=group, q=search,
                                all="true" if include_removed else None)
        show_list(rows, total, ITEM_COLS, title="protected items", what="items",
                  json_out=conn.json)


@vault_command(items, "show")
def items_show(conn: Conn, item_id: str = ItemArg) -> None:
    """Show one item with its health reasons."""
    with conn.client() as c:
        it = c.item(item_ref(c, item_id))
    if conn.json:
        show(it, [], title="", json_out=True)
        return
    show(item_rows([it]), [*ITEM_COLS, "lineage_id"], title=f"item {item_id}", json_out=False)
    mode = sync_columns(it.get("sync"))
    console.print(f"  mode: {mode['mode']}" + (f" · {mode['sync']}" if mode["sync"] != "-"
                                                else ""), markup=False, highlight=False)
    cycle = cycle_line((it.get("report") or {}).get("last_cycle"))
    if cycle:
        console.print(f"  last cycle: {cycle}", markup=False, highlight=False)
    for reason in it.get("health_reasons") or []:
        console.print(f"  [yellow]•[/] {reason}")


def cycle_line(phases: Any) -> str:
    """"7.2 s: seal 0.1 · ship 5.0 · …" from a report's ``last_cycle`` (phases under 0.05 s
    left out), or "" when there is none."""
    if not isinstance(phases, dict) or not isinstance(phases.get("total"), int | float):
        return ""
    parts = [f"{k} {float(v):.1f}" for k, v in phases.items()
             if k != "total" and isinstance(v, int | float) and v >= 0.05]
    return f"{float(phases['total']):.1f} s" + (": " + " · ".join(parts) if parts else "")


def sync_columns(sync: dict[str, Any] | None) -> dict[str, str]:
    """``mode`` ("sync, 50 ms budget" | "async") and ``sync`` (in sync | suspended: why |
    unknown: why | -) of an item's ``sync`` (the vault's view; absent from older vaults):
    a line under the item's table (a reason does not fit a column)."""
    if not sync:
        return {"mode": "-", "sync": "-"}
    if sync.get("mode") != "sync":
        return {"mode": str(sync.get("mode") or "async"), "sync": "-"}
    state = str(sync.get("state") or "unknown").replace("_", " ")
    reason = sync.get("reason")
    return {"mode": f"sync, {sync.get('budget_ms')} ms budget",
            "sync": f"{state}: {reason}" if reason else state}


@vault_command(items, "history")
def items_history(conn: Conn, item_id: str = typer.Argument(
        ..., metavar="ITEM", help="The VM's name, or any item of the VM: its first item, a "
                                  "reverse item, the current one.")) -> None:
    """A VM's history across failover and failback: the items it had (one per direction of
    replication), its failovers and jobs, newest first."""
    with conn.client() as c:
        h = c.item_history(item_ref(c, item_id))
    if conn.json:
        show(h, [], title="", json_out=True)
        return
    console.print(f"VM [bold]{h['vm_name']}[/]: lineage {h['lineage_id']}, current item "
                  f"{h.get('current_item_id') or '-'}")
    show(h["items"], ["id", "protection", "source_site", "target_site", "group", "created_at"],
         title="items (newest first)", json_out=False)
    show(h["failovers"], ["id", "item_id", "kind", "state", "point_id", "vm_name", "rto_s",
                          "created_at"], title="failovers", json_out=False)
    show(h["jobs"], ["id", "kind", "item_id", "state", "created_at"], title="jobs",
         json_out=False)


@vault_command(items, "points")
def items_points(conn: Conn, item_id: str = ItemArg,
                 consistency: str | None = typer.Option(None, help="crash or app."),
                 limit: int = typer.Option(1000, "--limit", min=1, help="How many (oldest "
                                                                       "first)."),
                 all_pages: bool = AllOpt) -> None:
    """List an item's recovery points (oldest first) with their absolute times."""
    with conn.client() as c:
        item_id = item_ref(c, item_id)
        rows, total = fetch_list(c, f"/items/{item_id}/points", limit=limit,
                                 all_pages=all_pages, consistency=consistency)
        # "utc", not "at": a column named "at" is shown as an age ("5m ago"), and a formatted
        # time there showed as "-"
        rows = [{**p, "utc": _utc(p.get("created_at")),
                 "damaged": (p.get("damage") or {}).get("reason") or ""} for p in rows]
        show_list(rows, total, ["point_id", "utc", "created_at", "consistency", "kind",
                                "bytes_written", "bytes_stored", "damaged"],
                  title=f"recovery points of {item_id}", what="points", json_out=conn.json)


def _utc(t: Any) -> str:
    if not isinstance(t, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(t)))


@vault_command(items, "verify")
def items_verify(conn: Conn, item_id: str = ItemArg,
                 point: str | None = typer.Option(None, "--point", help="One point id."),
                 all_points: bool = typer.Option(False, "--all", help="Every kept point.")) -> None:
    """Prove recovery points restore exactly to what their manifests say (default: the
    newest). Reads every disk whole in the store; exit code 1 when a point is damaged."""
    with conn.client() as c:
        item_id = item_ref(c, item_id)
        job_id = c.verify(item_id, point=point, all_points=all_points)["job_id"]
        job = c.wait_job(job_id, timeout=24 * 3600.0)
        res = c.verification(item_id, job_id)
    rep = dict(res.get("report") or {})
    rows = [{"point_id": p.get("point_id"), "ok": p.get("ok"), "disk": d.get("disk_id"),
             "bytes_read": d.get("bytes_read"), "digest": (d.get("digest") or "")[:16],
             "damaged": d.get("damaged") or (d.get("errors") or [""])[0]}
            for p in rep.get("points") or [] for d in p.get("disks") or [{}]]
    if conn.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        show(rows, ["point_id", "ok", "disk", "bytes_read", "digest", "damaged"],
             title=f"verification of {item_id}: {job.get('message')}", json_out=False)
    if job.get("state") != JobState.SUCCEEDED:
        raise typer.Exit(EXIT_JOB_FAILED)


WaitOpt = typer.Option(True, help="Follow the job until it ends.")


@vault_command(items, "protect")
def items_protect(conn: Conn, vm: str = typer.Argument(..., help="VM id, or VM name."),
                  group: str = typer.Option(..., help="Protection group."),
                  wait: bool = WaitOpt) -> None:
    """Enable protection of a VM (EnableProtection job: initial replication)."""
    with conn.client() as c:
        vm_id = vm
        if not any(v["vm_id"] == vm for v in c.vms()):
            named = [v for v in c.vms() if v["name"] == vm]
            if len(named) != 1:
                raise NotFound(f"no single VM {vm!r} in the inventory ({len(named)} match)",
                               hint="List VMs with 'drsite vms list' and give the VM's id.")
            vm_id = named[0]["vm_id"]
        follow_job(c, c.protect(vm_id, group)["job_id"], conn.json, wait)


@vault_command(items, "unprotect")
def items_unprotect(conn: Conn, item_id: str = ItemArg, wait: bool = WaitOpt,
                    delete_points: bool = typer.Option(False, help="Also delete the item's "
                                                                   "recovery points.")) -> None:
    """Disable protection (DisableProtection job)."""
    with conn.client() as c:
        follow_job(c, c.unprotect(item_ref(c, item_id), delete_points=delete_points)["job_id"],
                   conn.json, wait)


@vault_command(items, "resync")
def items_resync(conn: Conn, item_id: str = ItemArg, wait: bool = WaitOpt) -> None:
    """Resynchronise now by checksums (outside the window too)."""
    with conn.client() as c:
        follow_job(c, c.resync(item_ref(c, item_id))["job_id"], conn.json, wait)


# -- jobs ---------------------------------------------------------------------------------------

@vault_command(jobs, "list")
def jobs_list(conn: Conn,
              state: str | None = typer.Option(None, help="A job state, or active."),
              kind: str | None = typer.Option(None, help="A job kind, e.g. EnableProtection."),
              item: str | None = typer.Option(None, help="Only this item's jobs (item id)."),
              limit: int = typer.Option(50, "--limit", min=1, help="How many, newest first."),
              all_pages: bool = AllOpt,
              where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List jobs, newest first. --where state= is filtered by the vault; any other --where,
    and --sort, read every page (--sort sorts every matching job, then --limit cuts)."""
    with conn.client() as c:
        rows, total = list_rows(c, "/jobs", limit=limit, all_pages=all_pages, where=where,
                                sort=sort, server_fields=("state",), state=state, kind=kind,
                                item=item)
        show_list(rows, total, ["id", "kind", "target", "state", "progress", "created_at"],
                  title="jobs", what="jobs", json_out=conn.json)


@vault_command(jobs, "show")
def jobs_show(conn: Conn, job_id: str | None = typer.Argument(
        None, metavar="[JOB]", help="A job id (default: the newest job).")) -> None:
    """Show a job and its ordered tasks (a failed job: its error and what to do)."""
    with conn.client() as c:
        if job_id is None:
            newest = c.jobs(limit=1)
            if not newest:
                raise NotFound("no job yet", hint="Jobs appear as you act: 'drsite jobs list'.")
            job_id = str(newest[0]["id"])
        job = c.job(job_id)
    if conn.json:
        show(job, [], title="", json_out=True)
        return
    show(job, ["id", "kind", "target", "state", "progress", "message"], title="job",
         json_out=False)
    err = job.get("error") or {}
    if err:
        console.print(f"[red]error[/] ({err.get('code')}): {err.get('message')}")
        if err.get("hint"):
            console.print(f"[yellow]hint[/]: {err['hint']}")
    show(job.get("tasks", []), ["name", "state", "progress", "started_at", "ended_at",
                                "message"], title="tasks", json_out=False)


@vault_command(jobs, "cancel")
def jobs_cancel(conn: Conn, job_id: str) -> None:
    """Ask a running job to stop at its next safe point."""
    with conn.client() as c:
        show(c.cancel_job(job_id) or {"job_id": job_id}, ["id", "state"],
             title="cancel requested", json_out=conn.json)


@vault_command(jobs, "resume")
def jobs_resume(conn: Conn, job_id: str) -> None:
    """Let a job waiting for an operator (a plan's manual action) go on."""
    with conn.client() as c:
        show(c.resume_job(job_id), ["id", "kind", "target", "state", "message"],
             title="job resumed", json_out=conn.json)


# -- health / alerts / tokens -------------------------------------------------------------------

def health(conn: Conn) -> None:
    """Health summary: items by health, agents up/down, open alerts, active jobs, the worst
    RPOs."""
    with conn.client() as c:
        h = c.health()
    if conn.json:
        show(h, [], title="", json_out=True)
        return
    n = h.get("items") or {}
    agents = h.get("agents") or {}
    t = Table(title="health", show_header=False)
    t.add_column("")
    t.add_column("")
    t.add_row("items", f"[green]{n.get('normal', 0)} normal[/] · [yellow]{n.get('warning', 0)} "
                       f"warning[/] · [red]{n.get('critical', 0)} critical[/]")
    down = int(agents.get("down") or 0)
    t.add_row("agents", f"{agents.get('up', 0)} up" + (f" · [red]{down} down[/]" if down else ""))
    t.add_row("open alerts", str(h.get("alerts_active", 0)))
    t.add_row("active jobs", str(h.get("jobs_active", 0)))
    console.print(t)
    show(h.get("worst_rpo") or [], ["vm_name", "item_id", "health", "rpo_s"],
         title="worst RPOs", json_out=False)


ALERT_COLS = ["id", "severity", "kind", "subject", "message", "raised_at"]


@vault_command(alerts, "list")
def alerts_list(conn: Conn,
                state: str = typer.Option("active", help="active (open), cleared, or all."),
                severity: str | None = typer.Option(None, help="warning or critical."),
                limit: int = LimitOpt, all_pages: bool = AllOpt,
                where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List alerts, newest first (default: the open ones). --where severity= or kind= is
    filtered by the vault; any other --where, and --sort, read every page (--sort sorts every
    matching alert, then --limit cuts)."""
    if state not in ("active", "cleared", "all"):
        raise InvalidInput(f"unknown alert state {state!r}", hint="Use active, cleared or all.")
    with conn.client() as c:
        rows, total = list_rows(
            c, "/alerts", limit=limit, all_pages=all_pages, where=where, sort=sort,
            server_fields=("severity", "kind"),
            rows_of=lambda rs: [{**a, "state": "open" if a.get("active") else "cleared"}
                                for a in rs],
            state=None if state == "all" else state, severity=severity)
    show_list(rows, total, [*ALERT_COLS, *(["state"] if state != "active" else [])],
              title="open alerts" if state == "active" else "alerts", what="alerts",
              json_out=conn.json)


@vault_command(alerts, "ack")
def alerts_ack(conn: Conn, alert_id: str) -> None:
    """Acknowledge an alert (it stays open while its condition lasts)."""
    with conn.client() as c:
        c.ack_alert(alert_id)
    console.print(f"alert {alert_id} acknowledged")


@vault_command(events, "list")
def events_list(conn: Conn,
                kind: str | None = typer.Option(None, help="Only events of this kind (item, job, "
                                                          "host, group, alert, store, …)."),
                subject: str | None = typer.Option(None, help="Only events about this subject "
                                                             "(an item id, a job id, …)."),
                limit: int = typer.Option(50, "--limit", min=1, help="Events to show, newest "
                                                                     "first."),
                all_pages: bool = AllOpt) -> None:
    """List events, newest first."""
    with conn.client() as c:
        rows, total = fetch_list(c, "/events", limit=limit, all_pages=all_pages, kind=kind,
                                 subject=subject)
        show_list(rows, total, ["at", "kind", "subject", "message"], title="events",
                  what="events", json_out=conn.json)


@vault_command(tokens, "create")
def tokens_create(conn: Conn, name: str,
                  role: str = typer.Option("reader", help="admin, operator or reader.")) -> None:
    """Create an API token (its secret is shown once)."""
    with conn.client() as c:
        show(c.create_token(name, role), ["name", "role", "token"], title="token created",
             json_out=conn.json)


@vault_command(tokens, "list")
def tokens_list(conn: Conn) -> None:
    """List API tokens (never their secrets)."""
    with conn.client() as c:
        show(c.tokens(), ["name", "role", "created_at", "last_used_at"], title="tokens",
             json_out=conn.json)


@vault_command(tokens, "delete")
def tokens_delete(conn: Conn, name: str) -> None:
    """Delete an API token (its sessions end at once)."""
    with conn.client() as c:
        c.delete_token(name)
    console.print(f"token {name} deleted")


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


@vault_command(audit, "list")
def audit_list(conn: Conn,
               limit: int = typer.Option(100, min=1, max=1000, help="Entries to show."),
               since: str | None = typer.Option(None, help="Only entries since then: epoch "
                                                           "seconds or a duration (15m, 2h, 1d)."),
               actor: str | None = typer.Option(None, help="Only this token name or host id."),
               all_pages: bool = typer.Option(False, "--all", help="Every page, not only the "
                                                                   "newest LIMIT entries.")
               ) -> None:
    """List the audit trail, newest first."""
    with conn.client() as c:
        rows, total = fetch_list(c, "/audit", limit=limit, all_pages=all_pages,
                                 since=parse_since(since, time.time()), actor=actor)
        show_list(rows, total, ["at", "actor_kind", "actor", "client", "action", "target",
                                "outcome", "error_code"], title="audit", what="entries",
                  json_out=conn.json)
