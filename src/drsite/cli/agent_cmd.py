"""``drsite agent …``: register a host with the vault, run the host daemon."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer


class HypervisorKind(StrEnum):
    """``--hypervisor`` choices (``drsite.agent.process.HYPERVISOR_KINDS``)."""

    file = "file"
    qemu = "qemu"


agent = typer.Typer(help="The host agent: inventory, change tracking, replication, failover.",
                    no_args_is_help=True)


@agent.command("register")
def register(
    vault: list[str] = typer.Option(..., "--vault", help="Vault URL, e.g. https://127.0.0.1:8443; "
                                                      "repeat it for a vault pair (the active one "
                                                      "first): the agent follows whichever is "
                                                      "active."),
    key: str = typer.Option(..., help="One-time key from 'drsite vault registration-key' (a new "
                                      "host) or 'drsite hosts reissue HOST' (this host again: "
                                      "its certificate is replaced)."),
    data: Path = typer.Option(Path("drsite-agent"), help="Agent data directory."),
    name: str | None = typer.Option(None, help="Host name shown in the vault (default: the "
                                               "registered name, else this machine's name)."),
    ca_file: Path | None = typer.Option(None, help="The vault's CA certificate."),
    ca_fingerprint: str | None = typer.Option(None, help="SHA-256 fingerprint of the vault's CA "
                                                         "(instead of --ca-file)."),
) -> None:
    """Register this host: get a client certificate signed by the vault's CA. With a re-issue
    key, a registered host gets a new key pair and certificate (the old one stops working);
    restart its agent to use them."""
    from drsite.agent.process import agent_register

    again = (data / "agent.json").exists()
    ident = agent_register(vault_url=vault[0], key=key, data_dir=data, host_name=name,
                           ca_file=ca_file, ca_fingerprint=ca_fingerprint,
                           other_vaults=tuple(vault[1:]))
    if again:
        typer.echo(f"re-registered host {ident.host_id} in site {ident.site}: its certificate "
                   "was replaced; restart its agent ('drsite agent run') to use it")
    else:
        typer.echo(f"registered host {ident.host_id} in site {ident.site}")


@agent.command("run")
def run(
    data: Path = typer.Option(Path("drsite-agent"), help="Agent data directory."),
    vms: Path = typer.Option(..., help="Root directory of this host's VMs (the hypervisor's "
                                       "VM directories)."),
    hypervisor: HypervisorKind = typer.Option(HypervisorKind.file, "--hypervisor",
                                              help="Hypervisor driver of this host: file (file "
                                                   "VMs) or qemu (QEMU/KVM VMs)."),
    store: Path | None = typer.Option(None, help="Serve a recovery store from this directory "
                                                 "(recovery-site hosts)."),
    store_listen: str | None = typer.Option(None, help="HOST:PORT for the store server."),
    store_url: str | None = typer.Option(None, help="URL other sites use to reach this store "
                                                    "(e.g. through a proxy or NAT); default: "
                                                    "the --store-listen address."),
    heartbeat_interval: float = typer.Option(2.0, help="Seconds between heartbeats."),
    import_dir: Path | None = typer.Option(None, help="Where 'drsite vms import' may read disk "
                                                      "images on this host (default: the "
                                                      "directory 'import' beside --vms)."),
    vault: list[str] = typer.Option([], "--vault",
                                    help="The vaults of a pair to follow, repeated (default: "
                                         "the ones it registered with)."),
    sync_overlay_rotate_mib: int = typer.Option(
        256, min=1, help="Recovery-site hosts: a synchronous QEMU VM's overlay gets a new "
                         "layer past this many MiB (the older ones go once two points are "
                         "committed after the switch)."),
) -> None:
    """Run the agent daemon in the foreground (SIGTERM stops it cleanly)."""
    from drsite.agent.process import agent_run
    from drsite.logsetup import configure_logging
    from drsite.memtune import tune_malloc

    configure_logging()
    tune_malloc()   # before the agent's threads exist
    agent_run(data_dir=data, hypervisor_kind=hypervisor.value, vms_root=vms, store_dir=store,
              store_listen=store_listen, store_url=store_url,
              heartbeat_interval=heartbeat_interval,
              import_dir=import_dir if import_dir is not None else vms.absolute().parent / "import",
              vault_urls=vault, overlay_rotate_bytes=sync_overlay_rotate_mib << 20)


StoreOpt = typer.Option(None, "--store", help="The recovery store directory the agent serves "
                                              "(default: as 'drsite agent run' last used).")
VmsOpt = typer.Option(None, "--vms", help="Root directory of this host's VMs (default: as "
                                          "'drsite agent run' last used).")
HvOpt = typer.Option(None, "--hypervisor", help="Hypervisor driver (default: as 'drsite agent "
                                                "run' last used).")


@agent.command("points")
def points(
    item_id: str | None = typer.Argument(None, help="An item: its points (default: every item "
                                                    "and plan this host can fail over)."),
    data: Path = typer.Option(Path("drsite-agent"), help="Agent data directory."),
    store: Path | None = StoreOpt, vms: Path | None = VmsOpt,
    hypervisor: HypervisorKind | None = HvOpt,
    json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Break-glass: what this recovery host can fail over without the vault (the items and plans
    of its recovery book), or one item's authenticated points in its store."""
    from drsite.agent.process import breakglass_host
    from drsite.cli.common import show

    bg = breakglass_host(data, hypervisor_kind=hypervisor.value if hypervisor else None,
                         vms_root=vms, store_dir=store)
    if item_id is None:
        rows = bg.items()
        plans = bg.plans()
        if json_out:
            typer.echo(json.dumps({"items": rows, "plans": plans}, indent=2))
            return
        show(rows, ["item_id", "vm_name", "source_site", "points", "latest", "error"],
             title="items this host can fail over", json_out=False)
        for name, plan in sorted(plans.items()):
            groups = " → ".join(",".join(g.get("items") or []) for g in plan.get("groups") or [])
            typer.echo(f"plan {name}: {groups}")
        return
    show(bg.point_rows(item_id), ["point_id", "seq", "created_at", "consistency", "ok", "error"],
         title=f"points of {item_id}", json_out=json_out)


@agent.command("failover")
def failover(
    item_id: str | None = typer.Argument(None, help="The item to fail over (or --plan)."),
    point: str = typer.Option("latest", "--point", help="latest, latest_app or a point id "
                                                        "('drsite agent points ITEM')."),
    plan: str | None = typer.Option(None, "--plan", help="Fail over every item of this "
                                                         "recovery plan, group by group."),
    data: Path = typer.Option(Path("drsite-agent"), help="Agent data directory."),
    store: Path | None = StoreOpt, vms: Path | None = VmsOpt,
    hypervisor: HypervisorKind | None = HvOpt,
    force: bool = typer.Option(False, "--force", help="Run even though the vault answers."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Break-glass unplanned failover on this recovery host, for when no vault answers: from the
    store's own catalogue (points authenticated with the item's key), with the generation
    promotion written before the VM starts. The vault learns of it from this agent's heartbeat
    when it is back. Idempotent: running it again returns the same failover."""
    from drsite.agent.breakglass import refuse_while_a_vault_answers
    from drsite.agent.process import breakglass_host
    from drsite.core.errors import InvalidInput

    if (item_id is None) == (plan is None):
        raise InvalidInput("name one item or one --plan")
    bg = breakglass_host(data, hypervisor_kind=hypervisor.value if hypervisor else None,
                         vms_root=vms, store_dir=store)
    if not force:
        what = f"plan run {plan} unplanned-failover" if plan else f"failover unplanned {item_id}"
        refuse_while_a_vault_answers(bg.identity, what)
    if plan is not None:
        recs = bg.failover_plan(plan, point)
    else:
        assert item_id is not None
        recs = [bg.failover(item_id, point).to_dict()]
    if json_out:
        typer.echo(json.dumps(recs if plan else recs[0], indent=2, default=str))
        return
    for r in recs:
        typer.echo(f"{r['item_id']}: {r['state']}, VM {r['vm_name']} ({r['vm_id']}) from point "
                   f"{r['point_id']}, generation {r['generation']}, RTO {r.get('rto_s') or 0:.2f} s "
                   f"(failover {r['failover_id']})")
    typer.echo("The vault records it when it is back (this agent reports it); commit or cancel "
               "it there.")
