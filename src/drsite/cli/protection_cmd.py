"""``drsite policies …`` and ``drsite groups …``: replication policies and protection groups.
Thin: parse options, call the client, render."""

from __future__ import annotations

import json
from typing import Any

import typer

from drsite.cli.common import (
    Conn,
    SortOpt,
    WhereOpt,
    console,
    follow_job,
    select_rows,
    show,
    vault_command,
)
from drsite.core.compression import compression_mode
from drsite.core.errors import InvalidInput, NotFound

policies = typer.Typer(help="Replication policies: how often, how long points are kept, "
                            "app-consistent points, RPO threshold, resync window, scrub.",
                       no_args_is_help=True)
groups = typer.Typer(help="Protection groups: the VMs of a site (by name or host) replicated "
                          "to a target site under a policy.", no_args_is_help=True)

POLICY_COLS = ["name", "frequency_s", "retention_hours", "app_consistent_every_s",
               "rpo_threshold_s", "resync_window", "mode", "sync_budget_ms"]


def _never(v: float | None) -> float | None:
    """0 means never (``app_consistent_every_s``, ``scrub_interval_s``: null in the API)."""
    return None if v is None or v == 0 else v


@vault_command(policies, "list")
def policies_list(conn: Conn, where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List policies."""
    with conn.client() as c:
        show(select_rows(c.policies(), where, sort), POLICY_COLS, title="policies", json_out=conn.json)


@vault_command(policies, "show")
def policies_show(conn: Conn, name: str) -> None:
    """Show every value of a policy."""
    with conn.client() as c:
        p = c.policy(name)
    if conn.json:
        show(p, [], title="", json_out=True)
        return
    for k, v in p.items():
        console.print(f"[bold]{k}[/]: {v}")


# the values of a policy: option → (API field, default, help)
FIELDS: dict[str, tuple[str, Any, str]] = {
    "frequency": ("frequency_s", 300.0, "Seconds between cycles: 30, 300, 900 or any >= 5."),
    "retention_hours": ("retention_hours", 24.0, "How long recovery points are kept."),
    "app_consistent_every": ("app_consistent_every_s", 3600.0,
                             "Seconds between app-consistent points (0: never)."),
    "rpo_threshold": ("rpo_threshold_s", 1800.0, "Alert when the RPO passes this (s)."),
    "resync_window": ("resync_window", "18:00-08:00", "When automatic resyncs may run "
                                                      "(HH:MM-HH:MM, local time)."),
    "compression": ("compression", "auto", "auto (zstd unless the CPU, not the store, holds "
                                           "the copy up: a fast local store gets some frames "
                                           "raw), zstd (every frame) or off."),
    "encryption": ("encryption", False, "Encrypt data at rest in the store (cloud stores "
                                        "with keys only)."),
    "bandwidth_limit": ("bandwidth_limit_bps", None, "Bytes/s cap for replication traffic "
                                                     "(0: none)."),
    "scrub_interval": ("scrub_interval_s", 86400.0, "Seconds between scrubs of the recovery "
                                                    "store (0: never)."),
    "scrub_rate": ("scrub_rate_bps", 32 << 20, "Bytes/s a scrub may read (0: unpaced)."),
    "mode": ("mode", "async", "async (cycles only) or sync (a guest write waits for the "
                              "recovery site; file and QEMU VMs on an agent store)."),
    "sync_budget_ms": ("sync_budget_ms", 50, "sync: the most a guest write waits for the "
                                             "recovery site before falling back to async."),
}


def _body(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for opt, v in values.items():
        field = FIELDS[opt][0]
        if field in ("app_consistent_every_s", "scrub_interval_s", "bandwidth_limit_bps",
                     "scrub_rate_bps"):
            v = _never(v)
        elif field == "compression":
            v = compression_mode(v)  # a clear error before any request
        out[field] = v
    return out


@vault_command(policies, "create")
def policies_create(
    conn: Conn, name: str,
    frequency: float = typer.Option(300.0, help=FIELDS["frequency"][2]),
    retention_hours: float = typer.Option(24.0, help=FIELDS["retention_hours"][2]),
    app_consistent_every: float = typer.Option(3600.0, help=FIELDS["app_consistent_every"][2]),
    rpo_threshold: float = typer.Option(1800.0, help=FIELDS["rpo_threshold"][2]),
    resync_window: str = typer.Option("18:00-08:00", help=FIELDS["resync_window"][2]),
    compression: str = typer.Option("auto", help=FIELDS["compression"][2]),
    no_compression: bool = typer.Option(False, "--no-compression", hidden=True,
                                        help="The older form of --compression off."),
    encryption: bool = typer.Option(False, help=FIELDS["encryption"][2]),
    bandwidth_limit: int = typer.Option(0, help=FIELDS["bandwidth_limit"][2]),
    scrub_interval: float = typer.Option(86400.0, help=FIELDS["scrub_interval"][2]),
    scrub_rate: int = typer.Option(32 << 20, help=FIELDS["scrub_rate"][2]),
    mode: str = typer.Option("async", help=FIELDS["mode"][2]),
    sync_budget_ms: int = typer.Option(50, help=FIELDS["sync_budget_ms"][2]),
) -> None:
    """Create a replication policy."""
    body = {"name": name, **_body({
        "frequency": frequency, "retention_hours": retention_hours,
        "app_consistent_every": app_consistent_every, "rpo_threshold": rpo_threshold,
        "resync_window": resync_window,
        "compression": "off" if no_compression else compression, "encryption": encryption,
        "bandwidth_limit": bandwidth_limit, "scrub_interval": scrub_interval,
        "scrub_rate": scrub_rate, "mode": mode, "sync_budget_ms": sync_budget_ms})}
    with conn.client() as c:
        show(c.create_policy(body), POLICY_COLS, title="policy created", json_out=conn.json)


@vault_command(policies, "update")
def policies_update(
    conn: Conn, name: str,
    frequency: float | None = typer.Option(None, help=FIELDS["frequency"][2]),
    retention_hours: float | None = typer.Option(None, help=FIELDS["retention_hours"][2]),
    app_consistent_every: float | None = typer.Option(None,
                                                      help=FIELDS["app_consistent_every"][2]),
    rpo_threshold: float | None = typer.Option(None, help=FIELDS["rpo_threshold"][2]),
    resync_window: str | None = typer.Option(None, help=FIELDS["resync_window"][2]),
    compression: str | None = typer.Option(None, help=FIELDS["compression"][2]),
    no_compression: bool = typer.Option(False, "--no-compression", hidden=True,
                                        help="The older form of --compression off."),
    encryption: bool | None = typer.Option(None, help=FIELDS["encryption"][2]),
    bandwidth_limit: int | None = typer.Option(None, help=FIELDS["bandwidth_limit"][2]),
    scrub_interval: float | None = typer.Option(None, help=FIELDS["scrub_interval"][2]),
    scrub_rate: int | None = typer.Option(None, help=FIELDS["scrub_rate"][2]),
    mode: str | None = typer.Option(None, help=FIELDS["mode"][2]),
    sync_budget_ms: int | None = typer.Option(None, help=FIELDS["sync_budget_ms"][2]),
) -> None:
    """Change some values of a policy (the others keep theirs); the new settings go to every
    item under it."""
    if no_compression:
        compression = "off"
    given = {k: v for k, v in {
        "frequency": frequency, "retention_hours": retention_hours,
        "app_consistent_every": app_consistent_every, "rpo_threshold": rpo_threshold,
        "resync_window": resync_window, "compression": compression, "encryption": encryption,
        "bandwidth_limit": bandwidth_limit, "scrub_interval": scrub_interval,
        "scrub_rate": scrub_rate, "mode": mode,
        "sync_budget_ms": sync_budget_ms}.items() if v is not None}
    if not given:
        raise InvalidInput("nothing to change", hint="Give the values to change, e.g. "
                                                     "--frequency 30 (see --help).")
    with conn.client() as c:
        current = c.policy(name)
        body = {f: current.get(f) for f, _d, _h in FIELDS.values()}
        body["initial_replication_start"] = current.get("initial_replication_start")
        body.update(_body(given))
        show(c.update_policy(name, body), POLICY_COLS, title="policy updated",
             json_out=conn.json)


@vault_command(policies, "delete")
def policies_delete(conn: Conn, name: str) -> None:
    """Delete a policy no group uses."""
    with conn.client() as c:
        c.delete_policy(name)
    if conn.json:
        print(json.dumps({"deleted": name}))
    else:
        console.print(f"policy {name} deleted")


# -- groups -------------------------------------------------------------------------------------

GROUP_COLS = ["name", "site", "target_site", "policy", "consistent", "match", "items"]


@vault_command(groups, "list")
def groups_list(conn: Conn, where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List protection groups."""
    with conn.client() as c:
        show(select_rows(c.groups(), where, sort), GROUP_COLS, title="protection groups", json_out=conn.json)


@vault_command(groups, "show")
def groups_show(conn: Conn, name: str) -> None:
    """Show a protection group."""
    with conn.client() as c:
        show(c.group(name), [*GROUP_COLS, "store", "drill"], title=f"group {name}",
             json_out=conn.json)


def _check_vms(c: Any, site: str, names: list[str], allow_missing: bool) -> None:
    """VM names a group should match must be VMs of its site (typos protect nothing)."""
    if not names or allow_missing:
        return
    known = {v["name"] for v in c.vms() if v.get("site") == site}
    missing = sorted(set(names) - known)
    if missing:
        raise NotFound(f"no VM named {', '.join(missing)} in site {site}",
                       hint="List VMs with 'drsite vms list', or add --allow-missing to name "
                            "VMs that do not exist yet (they are protected when they appear).")


def _protecting(conn: Conn, c: Any, group: dict[str, Any], wait: bool) -> None:
    """Follow the group's PolicyAssociation job, then the EnableProtection job of each VM it
    protects (initial replication), so that the command ends with the VMs protected."""
    job_id = group.get("job_id")
    if job_id and wait:
        if conn.json:
            c.wait_job(str(job_id), timeout=24 * 3600.0)
        else:
            follow_job(c, str(job_id), False, True)
        for it in c.items():
            if it.get("group") == group["name"] and it.get("protection") == "enabling" \
                    and it.get("active_job_id"):
                if conn.json:
                    c.wait_job(str(it["active_job_id"]), timeout=24 * 3600.0)
                else:
                    follow_job(c, str(it["active_job_id"]), False, True)
    group = {**c.group(group["name"]), "job_id": job_id}
    show(group, ["name", "site", "target_site", "policy", "items", "job_id"],
         title=f"group {group['name']}", json_out=conn.json)


WaitOpt = typer.Option(True, help="Follow the protection of the group's VMs (their initial "
                                  "replication) until it ends.")


@vault_command(groups, "create")
def groups_create(
    conn: Conn, name: str,
    site: str = typer.Option(..., help="Site whose VMs this group holds."),
    target_site: str = typer.Option(..., help="Recovery site."),
    policy: str | None = typer.Option(None, help="Policy to associate (protects matching VMs)."),
    vm: list[str] = typer.Option([], help="VM names to include (repeatable)."),
    host: list[str] = typer.Option([], help="Host names whose VMs are included (repeatable)."),
    allow_missing: bool = typer.Option(False, help="Accept --vm names not in the inventory "
                                                   "yet."),
    consistent: bool = typer.Option(False, "--consistent/--no-consistent",
                                    help="Multi-VM consistency: group points shared by its VMs "
                                         "(at most 16)."),
    barrier_timeout_ms: int = typer.Option(500, help="Bound on each guest write pause of a "
                                                     "group point (50-10000 ms)."),
    wait: bool = WaitOpt,
) -> None:
    """Create a protection group (with a policy, its VMs are protected, also VMs found later)."""
    body = {"name": name, "site": site, "target_site": target_site, "policy": policy,
            "match": {"vm_names": vm, "hosts": host, "labels": []}, "consistent": consistent,
            "barrier_timeout_ms": barrier_timeout_ms}
    with conn.client() as c:
        _check_vms(c, site, vm, allow_missing)
        _protecting(conn, c, c.create_group(body), wait)
    if policy is None and (vm or host) and not conn.json:
        console.print("[yellow]note[/]: without a policy the group protects nothing yet; "
                      f"give it one: drsite groups update {name} --policy POLICY")


@vault_command(groups, "update")
def groups_update(
    conn: Conn, name: str,
    policy: str | None = typer.Option(None, help="Associate this policy (protects matching "
                                                 "VMs)."),
    no_policy: bool = typer.Option(False, "--no-policy", help="Dissociate the policy."),
    vm: list[str] = typer.Option([], help="Replace the VM names matched (repeatable)."),
    host: list[str] = typer.Option([], help="Replace the host names matched (repeatable)."),
    allow_missing: bool = typer.Option(False, help="Accept --vm names not in the inventory "
                                                   "yet."),
    consistent: bool | None = typer.Option(None, "--consistent/--no-consistent",
                                           help="Multi-VM consistency (at most 16 VMs)."),
    barrier_timeout_ms: int | None = typer.Option(None, help="Bound on each guest write pause "
                                                             "of a group point (50-10000 ms)."),
    wait: bool = WaitOpt,
) -> None:
    """Change a group's policy, the VMs it matches, its multi-VM consistency or the barrier's
    bound."""
    body: dict[str, Any] = {k: v for k, v in {"consistent": consistent,
                                              "barrier_timeout_ms": barrier_timeout_ms}.items()
                            if v is not None}
    if policy is not None and no_policy:
        raise InvalidInput("give --policy or --no-policy, not both")
    if policy is not None or no_policy:
        body["policy"] = policy
    with conn.client() as c:
        current = c.group(name)
        if vm or host:
            m = dict(current.get("match") or {})
            body["match"] = {"vm_names": vm or m.get("vm_names") or [],
                             "hosts": host or m.get("hosts") or [],
                             "labels": m.get("labels") or []}
            _check_vms(c, str(current.get("site")), vm, allow_missing)
        if not body:
            raise InvalidInput("nothing to change", hint="Give --policy, --no-policy, --vm, "
                                                         "--host, --consistent or "
                                                         "--barrier-timeout-ms (see --help).")
        _protecting(conn, c, c.update_group(name, body), wait)


@vault_command(groups, "points")
def groups_points(conn: Conn, name: str,
                  all: bool = typer.Option(False, "--all",
                                           help="Every barrier, not only group points.")) -> None:
    """A consistent group's group points (which member points make each), newest first."""
    with conn.client() as c:
        rows = c.group_points(name, all=all)
    if conn.json:
        show(rows, [], title="group points", json_out=True)
        return
    flat = [{"id": r["id"], "state": r["state"] if r.get("complete", True) or
             r["state"] != "committed" else "committed (a member point is gone)",
             "point_time": r["point_time"],
             "members": ", ".join(f"{m['vm_name']}={m['point_id']}"
                                  for m in r["members"].values()),
             "message": r["message"]} for r in rows]
    show(flat, ["id", "state", "point_time", "members", "message"], title="group points",
         json_out=False)


@vault_command(groups, "delete")
def groups_delete(conn: Conn, name: str) -> None:
    """Delete a group that protects nothing (disable its items' protection first)."""
    with conn.client() as c:
        c.delete_group(name)
    if conn.json:
        print(json.dumps({"deleted": name}))
    else:
        console.print(f"group {name} deleted")
