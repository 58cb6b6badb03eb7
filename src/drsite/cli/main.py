"""Entry point of the ``drsite`` command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from drsite import __version__
from drsite.cli import (
    drills_cmd,
    failover_cmd,
    protection_cmd,
    resources,
    stores_cmd,
    up_cmd,
    vms_cmd,
)
from drsite.cli.agent_cmd import agent
from drsite.cli.common import EXIT_JOB_FAILED, EXIT_OK, vault_command
from drsite.cli.replicate import replicate
from drsite.cli.vault_cmd import vault
from drsite.core.errors import DrsiteError

app = typer.Typer(name="drsite", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="drsite: self-hosted site recovery for virtual machines.")


@app.command()
def version(json_out: bool = typer.Option(False, "--json", help="Print {\"version\": ...}.")
            ) -> None:
    """Print the drsite version."""
    typer.echo(json.dumps({"version": __version__}) if json_out else __version__)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("drsite-demo"), help="Where the two sites are built (wiped first)."),
    vms: int = typer.Option(2, min=1, max=16, help="Number of file VMs on the primary site."),
    disks: int = typer.Option(2, min=1, max=8, help="Disks per VM."),
    disk_mib: int = typer.Option(256, min=16, max=65536, help="Size of each disk in MiB."),
    cycles: int = typer.Option(3, min=1, max=100, help="Delta cycles to wait for after initial replication."),
    frequency: float = typer.Option(5.0, min=5.0, help="Replication frequency in seconds (>= 5)."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the replication library in "
                                    "this process instead of a vault and agents (no API; also "
                                    "shows a resync and a mid-run proof)."),
    keep_running: bool = typer.Option(False, help="Leave the vault and agents running at the end."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON result on stdout."),
) -> None:
    """Two sites on this machine: a vault and two agents (processes on 127.0.0.1), live file VMs,
    protection through the API, scheduled delta cycles, and a bit-for-bit proof by digest."""
    if in_process:
        from drsite.demo import DemoOptions, run_demo

        res = run_demo(DemoOptions(workdir=workdir, vms=vms, disks=disks, disk_mib=disk_mib,
                                   cycles=cycles, frequency_s=frequency, json_out=json_out))
        raise typer.Exit(EXIT_OK if res.ok else EXIT_JOB_FAILED)
    from drsite.demo_cluster import ClusterDemoOptions, run_cluster_demo

    cres = run_cluster_demo(ClusterDemoOptions(workdir=workdir, vms=vms, disks=disks,
                                               disk_mib=disk_mib, cycles=cycles,
                                               frequency_s=frequency, json_out=json_out,
                                               keep_running=keep_running))
    raise typer.Exit(EXIT_OK if cres.ok else EXIT_JOB_FAILED)


app.command("replicate")(replicate)
app.add_typer(vault, name="vault")
app.add_typer(agent, name="agent")
app.add_typer(resources.sites, name="sites")
app.add_typer(resources.hosts, name="hosts")
app.add_typer(vms_cmd.vms, name="vms")
app.add_typer(protection_cmd.policies, name="policies")
app.add_typer(protection_cmd.groups, name="groups")
app.add_typer(resources.items, name="items")
app.add_typer(resources.jobs, name="jobs")
app.add_typer(resources.jobs, name="job", hidden=True)  # `drsite job resume ID` reads naturally
app.add_typer(failover_cmd.failover, name="failover")
app.add_typer(failover_cmd.plan, name="plan")
app.add_typer(failover_cmd.network, name="network")
app.add_typer(resources.alerts, name="alerts")
app.add_typer(resources.events, name="events")
app.add_typer(resources.tokens, name="tokens")
app.add_typer(resources.audit, name="audit")
app.add_typer(stores_cmd.store, name="stores")
app.add_typer(stores_cmd.store, name="store", hidden=True)  # the name it had first
app.add_typer(drills_cmd.drills, name="drills")
vault_command(app, "health")(resources.health)
app.command("up")(up_cmd.up)
app.command("down")(up_cmd.down)
app.command("env")(up_cmd.env)


def main() -> None:
    err = Console(stderr=True)
    try:
        app()
    except DrsiteError as e:
        err.print(f"[red]error[/] ({e.code}, {e.error_class.value}): {e.message}")
        if e.hint:
            err.print(f"[yellow]hint[/]: {e.hint}")
        if "--json" in sys.argv[1:]:
            # a script reading stdout gets the error as JSON too (it got nothing)
            print(json.dumps({"error": e.to_dict()}))
        sys.exit(e.exit_code)  # 2 permanent, 75 transient


if __name__ == "__main__":
    main()
