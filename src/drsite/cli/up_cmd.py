"""``drsite up`` / ``drsite down``: the whole deployment on this machine."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.panel import Panel

from drsite.cli.agent_cmd import HypervisorKind
from drsite.cli.common import console
from drsite.core.errors import TransientError

if TYPE_CHECKING:  # drsite.up (processes, hypervisors) is imported when a command runs
    from drsite.up import Cluster

DataOpt = typer.Option(Path("drsite-up"), "--data",
                       help="Directory for the vault, agents, VMs, logs.")


def vault_lines(c: Cluster, states: dict[str, dict[str, Any] | None]) -> str:
    """The summary's vault lines: the one vault, or each vault of a pair with the role it
    answers with in ``states`` (``Cluster.vault_states``), never assumed — an ``up`` after a
    promotion finds B active and A fenced or A's standby."""
    if not c.ha:
        return f"vault   {c.vault_url}  (pid {c.pids['vault']})\n"
    out = ""
    for name, url, proc in (("A", c.vault_url, "vault"), ("B", c.vault_b_url, "vault-secondary")):
        st = states.get(url)
        role = str(st.get("role")) if st is not None else None
        if role is None:
            what = "not answering"
        elif role == "standby":
            what = f"standby; 'drsite vault promote --vault {url}' if the active site is lost"
        elif role == "fenced":
            what = "fenced: its peer was promoted; 'drsite vault rejoin' makes it a standby"
        else:
            what = role
        out += f"vault {name} {url}  (pid {c.pids.get(proc, '?')}, {what})\n"
    out += (f"pg      site A 127.0.0.1:{c.pg_ports['primary']}, site B 127.0.0.1:"
            f"{c.pg_ports['secondary']} (the standby vault's replicates the active's)\n")
    if c.witness:
        out += (f"witness {c.witness_url}  (pid {c.pids.get('witness', '?')}; the standby "
                f"promotes itself {c.auto_promote_after:g} s after the active site went silent, "
                "if the witness agrees)\n")
    return out


def summary(c: Cluster, states: dict[str, dict[str, Any] | None], *, data: Path,
            detach: bool) -> str:
    """What ``drsite up`` prints once everything runs; ``states``: the vaults' states
    (``Cluster.vault_states``; empty without a pair). The dashboard named is the active
    vault's (A's when none answers as active)."""
    try:
        dashboard = c.active_url(states) if c.ha else c.vault_url
    except TransientError:
        dashboard = c.vault_url
    lines = "\n".join(c.env_lines())
    return (
        vault_lines(c, states) +
        f"agents  primary (pid {c.pids['agent-primary']}), secondary (pid "
        f"{c.pids['agent-secondary']}, store on 127.0.0.1:{c.store_port})\n"
        f"VMs     {c.hypervisor} VMs under {c.root}/<site>/vms; images to import in "
        f"{c.root}/<site>/import\n"
        f"logs    {c.root / 'logs'}\n\nTo use the CLI against it:\n{lines}\n\n"
        f"Then e.g. 'drsite hosts list', 'drsite vms create app-01 --site primary --disk 1G', "
        f"'drsite jobs list'.\nDashboard: {dashboard}/ui (log in with the token in "
        f"{c.root / 'vault' / 'admin.token'})."
        + (f"\nStop with 'drsite down --data {data}'." if detach
           else "\nCtrl-C stops everything."))


def up(data: Path = DataOpt,
       detach: bool = typer.Option(False, help="Leave the processes running and return."),
       hypervisor: HypervisorKind = typer.Option(HypervisorKind.file, "--hypervisor",
                                                 help="Hypervisor driver of both agents: file "
                                                      "or qemu (QEMU/KVM VMs)."),
       ha: bool = typer.Option(False, "--ha", help="A vault per site, each with its own "
                                                   "PostgreSQL (site B's a hot standby by "
                                                   "streaming replication); agents follow the "
                                                   "active one."),
       witness: bool = typer.Option(False, "--witness", help="With --ha: the pair's witness "
                                                             "too; vault B then promotes itself "
                                                             "when site A has been silent (15 s) "
                                                             "and the witness agrees.")) -> None:
    """Start a vault and two site agents (primary, secondary) as processes on 127.0.0.1."""
    from drsite.up import down as stop
    from drsite.up import up as start

    c = start(data, hypervisor=hypervisor.value, ha=ha, witness=witness)
    console.print(Panel.fit(summary(c, c.vault_states(), data=data, detach=detach),
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
