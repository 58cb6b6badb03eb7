"""``drsite failover …``, ``drsite plan …`` and ``drsite network …``: failover and failback of
one item or a whole recovery plan, plans from YAML with a diff, network mappings. Thin: parse
options, call the client, render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from drsite.cli.common import (
    Conn,
    ItemArg,
    SortOpt,
    WhereOpt,
    console,
    follow_job,
    item_ref,
    select_rows,
    show,
    vault_command,
)
from drsite.core.actions import PLAN_ACTIONS, FailoverAction
from drsite.core.errors import InvalidInput

failover = typer.Typer(no_args_is_help=True, help=(
    "Fail one protected item over and back. A test failover starts a copy in the test network "
    "(cleanup removes it). A planned failover shuts the source down and loses nothing; an "
    "unplanned one starts from a recovery point when the source site is lost. Then commit (a "
    "planned failover's commit also re-protects: the VM replicates back to its old site) or "
    "cancel. Failback is a planned failover of the re-protected VM back to its original "
    "site; commit it to replicate forward again."))
plan = typer.Typer(help="Recovery plans: ordered groups of VMs with scripts and manual steps.",
                   no_args_is_help=True)
network = typer.Typer(help="Network mappings: source network → recovery (and test) network, "
                           "per pair of sites (failback needs the mapping back too).",
                      no_args_is_help=True)

PointOpt = typer.Option("latest", "--point",
                        help="latest, latest_app, latest_group (the newest multi-VM consistent "
                             "group point), or a point id ('drsite items points ITEM').")
WaitOpt = typer.Option(True, help="Follow the job until it ends.")
ReverseOpt = typer.Option(False, "--create-reverse-mapping",
                          help="Create the missing network mappings back (recovery site → "
                               "source site) by inverting the forward ones.")
FO_COLS = ["id", "kind", "state", "point_id", "vm_name", "generation", "rto_s", "wall_s"]


def item_action(conn: Conn, item_id: str, action: FailoverAction, wait: bool,
                **body: Any) -> None:
    """Start ``action`` on the item, follow its job, then show the failover it acted on (and,
    after a re-protect, the reverse item that now replicates the VM back)."""
    with conn.client() as c:
        item_id = item_ref(c, item_id)
        job = c.item_action(item_id, action.value, **body)
        follow_job(c, str(job["id"]), conn.json, wait)
        if not wait or conn.json:
            return
        target = str(job.get("item_id") or item_id)
        fo = next((f for f in c.failovers(target) if f.get("job_id") == job["id"]), None)
        if fo is None:  # commit, cancel, …: the failover the job acted on
            fos = c.failovers(target)
            fo = fos[0] if fos else None
        if fo is None:
            return
        show(fo, FO_COLS, title=f"failover of {target}", json_out=False)
        rev = ((fo.get("result") or {}).get("reprotect") or {}).get("item_id")
        if rev:
            legs = c.item_history(str(rev))["items"]  # newest first; the last is the first
            vm, to, home = fo.get("vm_name"), legs[0]["target_site"], legs[-1]["source_site"]
            if to == home:
                console.print(f"re-protected: item [bold]{rev}[/] replicates {vm} back to site "
                              f"{to}; fail back with 'drsite failover failback {vm}'")
            else:
                console.print(f"re-protected: {vm} is home, and item [bold]{rev}[/] replicates "
                              f"it to site {to} again")


@vault_command(failover, "test")
def fo_test(conn: Conn, item_id: str = ItemArg, point: str = PointOpt,
            vm_name: str | None = typer.Option(None, help="Test VM name (default <vm>-test)."),
            wait: bool = WaitOpt) -> None:
    """Start the VM from a point in the test network (copy-on-write; replication goes on).
    Remove it with 'drsite failover cleanup ITEM'."""
    item_action(conn, item_id, FailoverAction.TEST_FAILOVER, wait, point=point, vm_name=vm_name)


@vault_command(failover, "cleanup")
def fo_cleanup(conn: Conn, item_id: str = ItemArg,
               notes: str = typer.Option("", help="What the test showed (kept with it)."),
               wait: bool = WaitOpt) -> None:
    """Remove the test failover VM and record notes."""
    item_action(conn, item_id, FailoverAction.CLEANUP_TEST_FAILOVER, wait, notes=notes or None)


@vault_command(failover, "planned")
def fo_planned(conn: Conn, item_id: str = ItemArg, wait: bool = WaitOpt) -> None:
    """Shut the source down, ship the last changes, start the replica: no data lost. Then
    commit (it re-protects) or cancel."""
    item_action(conn, item_id, FailoverAction.PLANNED_FAILOVER, wait)


@vault_command(failover, "unplanned")
def fo_unplanned(conn: Conn, item_id: str = ItemArg, point: str = PointOpt, wait: bool = WaitOpt) -> None:
    """The source site is lost: start the replica from a point (the old primary is fenced).
    Then commit, and re-protect once the old site is back."""
    item_action(conn, item_id, FailoverAction.UNPLANNED_FAILOVER, wait, point=point)


@vault_command(failover, "commit")
def fo_commit(conn: Conn, item_id: str = ItemArg,
              reprotect: bool = typer.Option(True, help="After a planned failover: re-protect "
                                                        "in the reverse direction at once."),
              create_reverse_mapping: bool = ReverseOpt, wait: bool = WaitOpt) -> None:
    """End the failover (other points are discarded). A planned failover's commit also
    re-protects: the reverse item's id is printed (fail back with it)."""
    item_action(conn, item_id, FailoverAction.COMMIT, wait, reprotect=reprotect,
                create_reverse_mapping=create_reverse_mapping or None)


@vault_command(failover, "cancel")
def fo_cancel(conn: Conn, item_id: str = ItemArg, wait: bool = WaitOpt) -> None:
    """Undo a failover that is not committed (the recovery VM is deleted; the source resumes)."""
    item_action(conn, item_id, FailoverAction.CANCEL, wait)


@vault_command(failover, "change-point")
def fo_change_point(conn: Conn, item_id: str = ItemArg, point: str = PointOpt,
                    wait: bool = WaitOpt) -> None:
    """Before commit: restart the recovery VM from another point."""
    item_action(conn, item_id, FailoverAction.CHANGE_POINT, wait, point=point)


@vault_command(failover, "reprotect")
def fo_reprotect(conn: Conn, item_id: str = ItemArg, create_reverse_mapping: bool = ReverseOpt,
                 wait: bool = WaitOpt) -> None:
    """Replicate the failed-over VM back to its old site (only differences travel). Needs a
    network mapping back for each of its networks (--create-reverse-mapping makes them)."""
    item_action(conn, item_id, FailoverAction.REPROTECT, wait,
                create_reverse_mapping=create_reverse_mapping or None)


@vault_command(failover, "failback")
def fo_failback(conn: Conn, item_id: str = typer.Argument(
                    ..., metavar="ITEM", help="The re-protected VM: its name, its reverse item, "
                                              "or the item it failed over from."),
                wait: bool = WaitOpt) -> None:
    """Fail a re-protected VM back to its original site: a planned failover of its reverse
    item (the VM there is shut down, its last changes shipped, the original VM re-created from
    them: no data lost). Then 'drsite failover commit ITEM' replicates it forward again."""
    item_action(conn, item_id, FailoverAction.FAILBACK, wait)


@vault_command(failover, "list")
def fo_list(conn: Conn, item_id: str | None = typer.Argument(None),
            where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List failovers (of one item, or all), newest first."""
    with conn.client() as c:
        rows = select_rows(c.failovers(item_ref(c, item_id) if item_id else None), where, sort)
        show(rows, ["id", "item_id", *FO_COLS[1:], "created_at"], title="failovers",
             json_out=conn.json)


# -- plans --------------------------------------------------------------------------------------

def _load_plans(path: Path) -> list[dict[str, Any]]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InvalidInput(f"{path} is not valid YAML: {e}") from None
    if isinstance(doc, dict) and "plans" in doc:
        doc = doc["plans"]
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise InvalidInput(f"{path}: expected a plan, a list of plans, or {{plans: [...]}}")
    return doc


@vault_command(plan, "apply")
def plan_apply(conn: Conn,
               file: Path = typer.Option(..., "-f", "--file", help="YAML with one or more plans."),
               dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff only."),
               prune: bool = typer.Option(False, help="Delete plans not in the file.")) -> None:
    """Create or update plans from a YAML file, showing what changes (admin)."""
    docs = _load_plans(file)
    with conn.client() as c:
        res = c.apply_plans(docs, dry_run=dry_run, prune=prune)
        show(res["changes"], ["plan", "change", "fields"],
             title="plan changes (dry run: nothing applied)" if dry_run else "plan changes",
             json_out=conn.json)


@vault_command(plan, "list")
def plan_list(conn: Conn, where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List recovery plans (--where and --sort act on the columns shown)."""
    with conn.client() as c:
        rows = [{"name": p["name"], "groups": len(p["groups"]),
                 "vms": sum(len(g["items"]) for g in p["groups"]),
                 "last_job": (p.get("last_job") or {}).get("state"),
                 "description": p["description"]} for p in c.plans()]
        show(select_rows(rows, where, sort), ["name", "groups", "vms", "last_job", "description"],
             title="recovery plans", json_out=conn.json)


@vault_command(plan, "show")
def plan_show(conn: Conn, name: str) -> None:
    """Show a plan: its groups in order, their VMs and actions."""
    with conn.client() as c:
        p = c.plan(name)
    if conn.json:
        show(p, [], title="", json_out=True)
        return
    rows = []
    for i, g in enumerate(p["groups"], 1):
        rows.append({"order": i, "group": g["name"],
                     "vms": ", ".join(f"{x['vm_name']} ({x['status']})" for x in g["items"]),
                     "pre": len(g["pre"]), "post": len(g["post"])})
    show(rows, ["order", "group", "vms", "pre", "post"], title=f"plan {name}", json_out=False)


@vault_command(plan, "run")
def plan_run(conn: Conn, name: str,
             action: str = typer.Argument(..., help=", ".join(PLAN_ACTIONS)),
             point: str | None = typer.Option(None, help="latest, latest_app, latest_group "
                                                         "(test and unplanned failover)."),
             notes: str | None = typer.Option(None, help="Cleanup notes."),
             create_reverse_mapping: bool = ReverseOpt, wait: bool = WaitOpt) -> None:
    """Run an action on a whole plan (groups in order, VMs of a group in parallel)."""
    act = FailoverAction.parse(action, PLAN_ACTIONS)
    with conn.client() as c:
        job = c.plan_action(name, act.value, point=point, notes=notes,
                            create_reverse_mapping=create_reverse_mapping or None)
        follow_job(c, str(job["id"]), conn.json, wait)


@vault_command(plan, "delete")
def plan_delete(conn: Conn, name: str) -> None:
    """Delete a plan (admin)."""
    with conn.client() as c:
        c.delete_plan(name)
    console.print(f"plan {name} deleted")


# -- network mappings -----------------------------------------------------------------------------

def parse_ip_rule(rule: str) -> dict[str, Any]:
    """``keep`` | ``subnet:10.0.0.0/24:10.9.0.0/24`` | ``fixed:vm1=10.9.0.5,vm2=10.9.0.6``."""
    if rule == "keep":
        return {"kind": "keep"}
    kind, _, rest = rule.partition(":")
    if kind == "subnet":
        src, _, dst = rest.partition(":")
        if not src or not dst:
            raise InvalidInput("subnet rule: subnet:SOURCE_CIDR:TARGET_CIDR")
        return {"kind": "subnet", "source": src, "target": dst}
    if kind == "fixed":
        pairs = [p.partition("=") for p in rest.split(",") if p]
        if not pairs or any(not k or not v for k, _, v in pairs):
            raise InvalidInput("fixed rule: fixed:VM=IP[,VM=IP...]")
        return {"kind": "fixed", "addresses": {k: v for k, _, v in pairs}}
    raise InvalidInput(f"unknown IP rule {rule!r}", hint="Use keep, subnet:SRC:DST or fixed:VM=IP,…")


MAP_COLS = ["id", "source_site", "source_network", "recovery_site", "recovery_network",
            "test_network", "ip_rule"]


@vault_command(network, "map")
def network_map(conn: Conn,
                source_site: str = typer.Option(..., "--from-site"),
                recovery_site: str = typer.Option(..., "--to-site"),
                source_network: str = typer.Option(..., "--network"),
                recovery_network: str = typer.Option(..., "--recovery-network"),
                test_network: str | None = typer.Option(None, "--test-network"),
                ip_rule: str = typer.Option("keep", "--ip-rule",
                                            help="keep | subnet:SRC:DST | fixed:VM=IP,…")) -> None:
    """Map a source network to a recovery network (and a test network), with an IP rule."""
    with conn.client() as c:
        row = c.set_network_mapping({"source_site": source_site, "recovery_site": recovery_site,
                                     "source_network": source_network,
                                     "recovery_network": recovery_network,
                                     "test_network": test_network, "ip_rule": parse_ip_rule(ip_rule)})
        show(row, MAP_COLS[1:], title="network mapping", json_out=conn.json)


@vault_command(network, "list")
def network_list(conn: Conn, where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List network mappings."""
    with conn.client() as c:
        show(select_rows(c.network_mappings(), where, sort), MAP_COLS, title="network mappings",
             json_out=conn.json)


@vault_command(network, "delete")
def network_delete(conn: Conn, mapping_id: int = typer.Argument(
        ..., help="The mapping's id ('drsite network list').")) -> None:
    """Delete a network mapping."""
    with conn.client() as c:
        c.delete_network_mapping(mapping_id)
    console.print(f"network mapping {mapping_id} deleted")
