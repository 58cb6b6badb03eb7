"""``drsite agent …``: register a host with the vault, run the host daemon."""

from __future__ import annotations

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
    vault: str = typer.Option(..., "--vault", help="Vault URL, e.g. https://127.0.0.1:8443."),
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
    ident = agent_register(vault_url=vault, key=key, data_dir=data, host_name=name,
                           ca_file=ca_file, ca_fingerprint=ca_fingerprint)
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
) -> None:
    """Run the agent daemon in the foreground (SIGTERM stops it cleanly)."""
    from drsite.agent.process import agent_run, configure_logging

    configure_logging()
    agent_run(data_dir=data, hypervisor_kind=hypervisor.value, vms_root=vms, store_dir=store,
              store_listen=store_listen, store_url=store_url,
              heartbeat_interval=heartbeat_interval,
              import_dir=import_dir if import_dir is not None else vms.absolute().parent / "import")
