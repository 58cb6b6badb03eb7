"""``drsite up`` / ``drsite down``: the whole deployment on this machine."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer
from rich.panel import Panel

from drsite.cli.agent_cmd import HypervisorKind
from drsite.cli.common import console

DataOpt = typer.Option(Path("drsite-up"), "--data",
                       help="Directory for the vault, agents, VMs, logs.")


def up(data: Path = DataOpt,
       detach: bool = typer.Option(False, help="Leave the processes running and return."),
       hypervisor: HypervisorKind = typer.Option(HypervisorKind.file, "--hypervisor",
                                                 help="Hypervisor driver of both agents: file "
                                                      "or qemu (QEMU/KVM VMs)."),
       ha: bool = typer.Option(False, "--ha", help="A vault per site, each with its own "
                                                   "PostgreSQL (site B's a hot standby by "
                                                   "streaming replication); agents follow the "
                                                   "active one.")) -> None:
    """Start a vault and two site agents (primary, secondary) as processes on 127.0.0.1."""
    from drsite.up import down as stop
    from drsite.up import up as start

    c = start(data, hypervisor=hypervisor.value, ha=ha)
    lines = "\n".join(c.env_lines())
    pair = (f"vault B {c.vault_b_url}  (pid {c.pids['vault-secondary']}, standby; "
            f"'drsite vault promote --vault {c.vault_b_url}' if site A is lost)\n"
            f"pg      primary 127.0.0.1:{c.pg_ports['primary']}, standby "
            f"127.0.0.1:{c.pg_ports['secondary']}\n") if c.ha else ""
    console.print(Panel.fit(
        f"vault   {c.vault_url}  (pid {c.pids['vault']})\n" + pair +
        f"agents  primary (pid {c.pids['agent-primary']}), secondary (pid "
        f"{c.pids['agent-secondary']}, store on 127.0.0.1:{c.store_port})\n"
        f"VMs     {c.hypervisor} VMs under {c.root}/<site>/vms; images to import in "
        f"{c.root}/<site>/import\n"
        f"logs    {c.root / 'logs'}\n\nTo use the CLI against it:\n{lines}\n\n"
        f"Then e.g. 'drsite hosts list', 'drsite vms create app-01 --site primary --disk 1G', "
        f"'drsite jobs list'.\nDashboard: {c.vault_url}/ui (log in with the token in "
        f"{c.root / 'vault' / 'admin.token'})."
        + (f"\nStop with 'drsite down --data {data}'." if detach
           else "\nCtrl-C stops everything."),
        title="drsite is up"))
    if detach:
        return
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    stop(c)
    c.save()
    console.print("stopped")


def down(data: Path = DataOpt) -> None:
    """Stop what 'drsite up' started (--data: the directory given to it): the vault, the
    agents, and the VMs ('drsite up' starts those again)."""
    from drsite.up import Cluster
    from drsite.up import down as stop

    c = Cluster.load(data.resolve())
    procs = sorted(c.pids)
    stop(c)
    c.save()
    n = sum(len(v) for v in c.stopped_vms.values())
    console.print(f"stopped {', '.join(procs) or 'no process'} and {n} running VM(s) in {c.root}")


def env(data: Path = DataOpt) -> None:
    """Print the shell exports that point the CLI at what 'drsite up' started: run
    'eval "$(drsite env --data DIR)"'."""
    from drsite.up import Cluster

    c = Cluster.load(data.resolve())
    typer.echo("\n".join(c.env_lines()))
