"""``drsite failover …``, ``drsite plan …``, ``drsite network …`` and ``drsite jobs resume``:
failover of one item or a whole recovery plan, plans from YAML with a diff, network mappings.
Thin: parse options, call the client, render."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from drsite.cli.common import CaOpt, JsonOpt, TokenOpt, VaultOpt, client, console, show
from drsite.cli.resources import _follow, jobs
from drsite.core.errors import InvalidInput

failover = typer.Typer(help="Fail one protected item over and back: test, planned, unplanned, "
                            "commit, cancel, change-point, re-protect.", no_args_is_help=True)
plan = typer.Typer(help="Recovery plans: ordered groups of VMs with scripts and manual steps.",
                   no_args_is_help=True)
network = typer.Typer(help="Network mappings: source network → recovery (and test) network.",
                      no_args_is_help=True)

PointOpt = typer.Option("latest", "--point",
                        help="latest, latest_app, latest_group (the newest multi-VM consistent "
                             "group point), or a point id.")
WaitOpt = typer.Option(True, help="Follow the job until it ends.")


def _item_action(item_id: str, action: str, wait: bool, vault: str | None, token: str | None,
                 ca_file: Path | None, json_out: bool, **body: Any) -> None:
    with client(vault, token, ca_file) as c:
        job = c.item_action(item_id, action, **body)
        _follow(c, job["id"], json_out, wait)
        if wait and not json_out:
            fos = c.failovers(item_id)
            if fos:
                show(fos[0], ["id", "kind", "state", "point_id", "vm_name", "generation", "rto_s", "wall_s"],
                     title="failover", json_out=False)


@failover.command("test")
def fo_test(item_id: str, point: str = PointOpt,
            vm_name: str | None = typer.Option(None, help="Test VM name (default <vm>-test)."),
            wait: bool = WaitOpt, vault: str | None = VaultOpt, token: str | None = TokenOpt,
            ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Start the VM from a point in the test network (copy-on-write; replication goes on)."""
    _item_action(item_id, "test-failover", wait, vault, token, ca_file, json_out, point=point,
                 vm_name=vm_name)


@failover.command("cleanup")
def fo_cleanup(item_id: str, notes: str = typer.Option("", help="What the test showed."),
               wait: bool = WaitOpt, vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Remove the test failover VM and record notes."""
    _item_action(item_id, "cleanup-test-failover", wait, vault, token, ca_file, json_out,
                 notes=notes or None)


@failover.command("planned")
def fo_planned(item_id: str, wait: bool = WaitOpt, vault: str | None = VaultOpt,
               token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
               json_out: bool = JsonOpt) -> None:
    """Shut the source down, ship the last changes, start the replica: no data lost."""
    _item_action(item_id, "planned-failover", wait, vault, token, ca_file, json_out)


@failover.command("unplanned")
def fo_unplanned(item_id: str, point: str = PointOpt, wait: bool = WaitOpt,
                 vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """The source site is lost: start the replica from a point (the old primary is fenced)."""
    _item_action(item_id, "unplanned-failover", wait, vault, token, ca_file, json_out, point=point)


@failover.command("commit")
def fo_commit(item_id: str, reprotect: bool = typer.Option(
                  True, help="After a planned failover: re-protect in the reverse direction."),
              wait: bool = WaitOpt, vault: str | None = VaultOpt, token: str | None = TokenOpt,
              ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """End the failover (other points are discarded)."""
    _item_action(item_id, "commit", wait, vault, token, ca_file, json_out, reprotect=reprotect)


@failover.command("cancel")
def fo_cancel(item_id: str, wait: bool = WaitOpt, vault: str | None = VaultOpt,
              token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
              json_out: bool = JsonOpt) -> None:
    """Undo a failover that is not committed (the recovery VM is deleted; the source resumes)."""
    _item_action(item_id, "cancel", wait, vault, token, ca_file, json_out)


@failover.command("change-point")
def fo_change_point(item_id: str, point: str = PointOpt, wait: bool = WaitOpt,
                    vault: str | None = VaultOpt, token: str | None = TokenOpt,
                    ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Before commit: restart the recovery VM from another point."""
    _item_action(item_id, "change-point", wait, vault, token, ca_file, json_out, point=point)


@failover.command("reprotect")
def fo_reprotect(item_id: str, wait: bool = WaitOpt, vault: str | None = VaultOpt,
                 token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
                 json_out: bool = JsonOpt) -> None:
    """Replicate the failed-over VM back to the old primary (only differences travel)."""
    _item_action(item_id, "reprotect", wait, vault, token, ca_file, json_out)


@failover.command("list")
def fo_list(item_id: str | None = typer.Argument(None), vault: str | None = VaultOpt,
            token: str | None = TokenOpt, ca_file: Path | None = CaOpt,
            json_out: bool = JsonOpt) -> None:
    """List failovers (of one item, or all)."""
    with client(vault, token, ca_file) as c:
        show(c.failovers(item_id), ["id", "item_id", "kind", "state", "point_id", "vm_name",
                                    "generation", "rto_s", "wall_s", "created_at"],
             title="failovers", json_out=json_out)


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


@plan.command("apply")
def plan_apply(file: Path = typer.Option(..., "-f", "--file", help="YAML with one or more plans."),
               dry_run: bool = typer.Option(False, "--dry-run", help="Show the diff only."),
               prune: bool = typer.Option(False, help="Delete plans not in the file."),
               vault: str | None = VaultOpt, token: str | None = TokenOpt,
               ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Create or update plans from a YAML file, showing what changes."""
    docs = _load_plans(file)
    with client(vault, token, ca_file) as c:
        res = c.apply_plans(docs, dry_run=dry_run, prune=prune)
        show(res["changes"], ["plan", "change", "fields"],
             title="plan changes (dry run: nothing applied)" if dry_run else "plan changes",
             json_out=json_out)


@plan.command("list")
def plan_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
              ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List recovery plans."""
    with client(vault, token, ca_file) as c:
        rows = [{"name": p["name"], "groups": len(p["groups"]),
                 "vms": sum(len(g["items"]) for g in p["groups"]),
                 "last_job": (p.get("last_job") or {}).get("state"),
                 "description": p["description"]} for p in c.plans()]
        show(rows, ["name", "groups", "vms", "last_job", "description"], title="recovery plans",
             json_out=json_out)


@plan.command("show")
def plan_show(name: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
              ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Show a plan: its groups in order, their VMs and actions."""
    with client(vault, token, ca_file) as c:
        p = c.plan(name)
        if json_out:
            show(p, [], title="", json_out=True)
            return
        rows = []
        for i, g in enumerate(p["groups"], 1):
            rows.append({"order": i, "group": g["name"],
                         "vms": ", ".join(f"{x['vm_name']} ({x['status']})" for x in g["items"]),
                         "pre": len(g["pre"]), "post": len(g["post"])})
        show(rows, ["order", "group", "vms", "pre", "post"], title=f"plan {name}", json_out=False)


@plan.command("run")
def plan_run(name: str, action: str = typer.Argument(
                 ..., help="test-failover, cleanup-test-failover, planned-failover, "
                           "unplanned-failover, commit, cancel, reprotect"),
             point: str | None = typer.Option(None, help="latest, latest_app, latest_group (failovers)."),
             notes: str | None = typer.Option(None, help="Cleanup notes."),
             wait: bool = WaitOpt, vault: str | None = VaultOpt, token: str | None = TokenOpt,
             ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Run an action on a whole plan (groups in order, VMs of a group in parallel)."""
    with client(vault, token, ca_file) as c:
        job = c.plan_action(name, action, point=point, notes=notes)
        _follow(c, job["id"], json_out, wait)


@plan.command("delete")
def plan_delete(name: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt) -> None:
    """Delete a plan."""
    with client(vault, token, ca_file) as c:
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


@network.command("map")
def network_map(source_site: str = typer.Option(..., "--from-site"),
                recovery_site: str = typer.Option(..., "--to-site"),
                source_network: str = typer.Option(..., "--network"),
                recovery_network: str = typer.Option(..., "--recovery-network"),
                test_network: str | None = typer.Option(None, "--test-network"),
                ip_rule: str = typer.Option("keep", "--ip-rule",
                                            help="keep | subnet:SRC:DST | fixed:VM=IP,…"),
                vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Map a source network to a recovery network (and a test network), with an IP rule."""
    with client(vault, token, ca_file) as c:
        row = c.set_network_mapping({"source_site": source_site, "recovery_site": recovery_site,
                                     "source_network": source_network,
                                     "recovery_network": recovery_network,
                                     "test_network": test_network, "ip_rule": parse_ip_rule(ip_rule)})
        show(row, ["source_site", "source_network", "recovery_site", "recovery_network",
                   "test_network", "ip_rule"], title="network mapping", json_out=json_out)


@network.command("list")
def network_list(vault: str | None = VaultOpt, token: str | None = TokenOpt,
                 ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """List network mappings."""
    with client(vault, token, ca_file) as c:
        show(c.network_mappings(), ["id", "source_site", "source_network", "recovery_site",
                                    "recovery_network", "test_network", "ip_rule"],
             title="network mappings", json_out=json_out)


@jobs.command("resume")
def jobs_resume(job_id: str, vault: str | None = VaultOpt, token: str | None = TokenOpt,
                ca_file: Path | None = CaOpt, json_out: bool = JsonOpt) -> None:
    """Let a job waiting for an operator (a plan's manual action) go on."""
    with client(vault, token, ca_file) as c:
        show(c.resume_job(job_id), ["id", "kind", "target", "state", "message"],
             title="job resumed", json_out=json_out)
