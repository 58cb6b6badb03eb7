"""The agent as a process: what ``drsite agent register`` and ``drsite agent run`` call (the only
entry point of an agent).

Responsible for: turning typed options into a registration or a running daemon, signal
handling (SIGTERM/SIGINT stop the daemon cleanly) and process logging setup. Not responsible
for: option parsing (the Typer commands in ``cli/agent_cmd.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from drsite.agent.breakglass import BreakGlass, load_run_options, save_run_options
from drsite.agent.daemon import Agent
from drsite.agent.registration import (
    AgentIdentity,
    fetch_ca_by_fingerprint,
    normalize_fingerprint,
    pem_fingerprint,
    register,
)
from drsite.core.errors import AuthError, InvalidInput, classify_os_error
from drsite.hypervisors.contract import HypervisorDriver
from drsite.sitestore.syncoverlay import ROTATE_BYTES

log = logging.getLogger(__name__)

HYPERVISOR_KINDS = ("file", "qemu")


def agent_register(vault_url: str, key: str, data_dir: Path, host_name: str | None,
                   ca_file: Path | None = None, ca_fingerprint: str | None = None,
                   insecure_first_contact: bool = False,
                   other_vaults: tuple[str, ...] = ()) -> AgentIdentity:
    """Register this host (see :func:`drsite.agent.registration.register`).

    Trust of the vault: ``ca_file`` (the vault's CA certificate) or ``ca_fingerprint`` (its
    SHA-256, as the vault prints it: the chain the vault presents is fetched, the matching CA
    taken, then everything is verified). Both given: the file must have that fingerprint.
    Neither: refused unless ``insecure_first_contact`` — or, when ``data_dir`` already holds
    a registration (re-registration with a re-issue key), the CA it trusts already.
    ``host_name`` None: the registered name, else the machine's host name. ``other_vaults``:
    the other vault(s) of a pair, followed when the first is the standby or unreachable.
    """
    ca_pem: bytes | None = None
    if ca_file is not None:
        try:
            ca_pem = Path(ca_file).read_bytes()
        except OSError as e:
            raise classify_os_error(e, f"CA file {ca_file}") from e
        if ca_fingerprint is not None:
            try:
                actual = pem_fingerprint(ca_pem)
            except ValueError as e:
                raise InvalidInput(f"CA file {ca_file} is not a PEM certificate: {e}") from e
            if actual != normalize_fingerprint(ca_fingerprint):
                raise AuthError(f"CA file {ca_file} has fingerprint {actual}, not the one given",
                                hint="Check which file and which fingerprint are the vault's.")
    elif ca_fingerprint is not None:
        ca_pem = fetch_ca_by_fingerprint(vault_url, ca_fingerprint)
    return register(vault_url, key, Path(data_dir), host_name=host_name, ca_pem=ca_pem,
                    insecure_first_contact=insecure_first_contact, other_vaults=other_vaults)


def make_hypervisor(kind: str, vms_root: Path) -> HypervisorDriver:
    """The host's hypervisor driver by kind (``"file"`` or ``"qemu"``: VMs under
    ``vms_root``)."""
    if kind == "file":
        from drsite.hypervisors.file.driver import FileHypervisor

        return FileHypervisor(Path(vms_root))
    if kind == "qemu":
        from drsite.hypervisors.qemu.driver import QemuHypervisor

        return QemuHypervisor(Path(vms_root))
    raise InvalidInput(f"unknown hypervisor kind {kind!r}; known: {', '.join(HYPERVISOR_KINDS)}")


def agent_run(data_dir: Path, hypervisor_kind: str = "file", vms_root: Path = Path("vms"),
              store_dir: Path | None = None, store_listen: str | None = None,
              heartbeat_interval: float = 2.0, store_url: str | None = None,
              import_dir: Path | None = None, vault_urls: Sequence[str] = (),
              overlay_rotate_bytes: int = ROTATE_BYTES) -> None:
    """Run the agent daemon until SIGTERM/SIGINT (blocking); returns after a clean stop.
    ``vault_urls``: the vaults of a pair to follow (default: as registered).

    Work cut short by the stop resumes at the next start (the vault re-sends its commands).
    """
    save_run_options(Path(data_dir), hypervisor=hypervisor_kind, vms_root=Path(vms_root),
                     store_dir=Path(store_dir) if store_dir is not None else None)
    agent = Agent(Path(data_dir), hypervisor=make_hypervisor(hypervisor_kind, vms_root),
                  heartbeat_interval=heartbeat_interval,
                  store_dir=Path(store_dir) if store_dir is not None else None,
                  store_listen=store_listen, store_url=store_url,
                  import_dir=Path(import_dir) if import_dir is not None else None,
                  vault_urls=list(vault_urls) or None,
                  overlay_rotate_bytes=overlay_rotate_bytes)
    installed: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(sig: int, frame: FrameType | None) -> None:
            log.info("received %s: stopping the agent", signal.Signals(sig).name)
            agent.stop()

        for s in (signal.SIGTERM, signal.SIGINT):
            installed[s] = signal.signal(s, on_signal)
    try:
        agent.run()
    finally:
        for s, old in installed.items():
            signal.signal(s, old)


def breakglass_host(data_dir: Path, *, hypervisor_kind: str | None = None,
                    vms_root: Path | None = None, store_dir: Path | None = None) -> BreakGlass:
    """Break-glass failover on this host (``drsite agent failover|points``): the hypervisor
    and store the daemon last ran with (``agent-run.json``), unless given."""
    opts = load_run_options(Path(data_dir))
    kind = hypervisor_kind or opts.get("hypervisor") or "file"
    vms = vms_root or (Path(opts["vms"]) if opts.get("vms") else None)
    store = store_dir or (Path(opts["store"]) if opts.get("store") else None)
    if vms is None or store is None:
        raise InvalidInput("this host's VM root or recovery store is not known",
                           hint="Pass --vms and --store as 'drsite agent run' uses them "
                                "(break-glass runs on the recovery site's store agent).")
    return BreakGlass(Path(data_dir), make_hypervisor(kind, vms), store)
