"""``drsite up``: a vault and two site agents (primary, secondary) with file VMs (or QEMU VMs:
``hypervisor="qemu"``), as separate processes on 127.0.0.1 — the embedded default of a whole
deployment on one machine.

Layout under the data directory::

    vault/                 the vault's data (CA, SQLite DB, admin.token)
    primary/agent/         the primary agent's identity and item state
    primary/vms/           file VMs of the primary site
    secondary/agent/       the secondary agent's identity (+ hydrated replicas)
    secondary/vms/         file VMs of the secondary site (failover targets)
    secondary/store/       the recovery store the secondary agent serves over mTLS
    <site>/import/         disk images 'drsite vms import' may read on that site's host
    logs/                  one log per process (0700 / 0600)
    cluster.json           ports, pids, URLs, the VMs ``down`` stopped (read by ``drsite
                           down``, ``drsite up`` and the demo)

``down`` stops the VMs too (file VMs' guest processes, QEMU processes) and ``up`` starts again
the ones it stopped. The pids of the processes ``up`` starts are saved as each starts, and an
``up`` that fails half-way stops what it started, so no process outlives the cluster's record.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from drsite.agent.process import agent_register, make_hypervisor
from drsite.client.api import VaultClient, VaultConfig
from drsite.core.errors import (
    Conflict,
    DrsiteError,
    InvalidInput,
    NetworkError,
    TransientError,
)
from drsite.core.model import PowerState
from drsite.fsutil import atomic_write_json, read_json
from drsite.hypervisors.contract import HypervisorDriver
from drsite.hypervisors.qemu.driver import QemuHypervisor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    root: Path
    vault_url: str = ""
    vault_port: int = 0
    store_port: int = 0
    # the primary's store: re-protect writes the reverse item's base there, failback uses it
    primary_store_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    admin_token: str = ""
    hypervisor: str = "file"  # the agents' driver: "file" or "qemu"
    hypervisors: dict[str, str] = field(default_factory=dict)  # a site's own driver, if other
    stopped_vms: dict[str, list[str]] = field(default_factory=dict)  # site → VMs down stopped

    @property
    def ca_file(self) -> Path:
        return self.root / "vault" / "pki" / "ca.pem"

    def client(self) -> VaultClient:
        return VaultClient(VaultConfig(self.vault_url, self.admin_token, self.ca_file))

    def save(self) -> None:
        d = asdict(self)
        d["root"] = str(self.root)
        atomic_write_json(self.root / "cluster.json", d)

    @staticmethod
    def load(root: Path) -> Cluster:
        """The cluster ``drsite up`` recorded in ``root`` (``InvalidInput`` when there is
        none)."""
        if not (root / "cluster.json").is_file():
            raise InvalidInput(f"no drsite up deployment in {root} (no cluster.json)",
                               hint="Pass the directory given to 'drsite up': drsite down "
                                    "--data DIR.")
        d: dict[str, Any] = read_json(root / "cluster.json")
        d["root"] = Path(d["root"])
        known = set(Cluster.__dataclass_fields__)
        return Cluster(**{k: v for k, v in d.items() if k in known})

    def env_lines(self) -> list[str]:
        """Shell exports pointing the CLI at this cluster (``drsite env`` prints them)."""
        token = shlex.quote(str(self.root / "vault" / "admin.token"))
        return [f"export DRSITE_VAULT_URL={shlex.quote(self.vault_url)}",
                f"export DRSITE_TOKEN=$(cat {token})",
                f"export DRSITE_CA_FILE={shlex.quote(str(self.ca_file))}"]


def _spawn(name: str, args: list[str], logs: Path,
           extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    # private: a log may name hosts, items and paths; the child owns the file for its life
    out = os.fdopen(os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "drsite.cli.main", *args], stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)


def _wait(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise TransientError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            res = check()
            if res:
                return res
        except (DrsiteError, OSError) as e:
            last = e
        time.sleep(0.2)
    raise NetworkError(f"{what}: not ready after {timeout:g} s ({last})")


def start_vault(c: Cluster) -> None:
    c.vault_port = c.vault_port or free_port()
    c.vault_url = f"https://127.0.0.1:{c.vault_port}"
    logs = c.root / "logs"
    proc = _spawn("vault", ["vault", "serve", "--data", str(c.root / "vault"), "--listen",
                            f"127.0.0.1:{c.vault_port}"], logs)
    c.pids["vault"] = proc.pid
    c.save()  # a later 'drsite down' finds it whatever happens next
    token_file = c.root / "vault" / "admin.token"
    _wait("vault admin token", lambda: token_file.exists() and token_file.read_text().strip(),
          60, proc, logs / "vault.log")
    c.admin_token = token_file.read_text().strip()

    def ping() -> bool:
        with VaultClient(VaultConfig(c.vault_url, c.admin_token, c.ca_file, timeout=2)) as cl:
            return bool(cl.version())

    _wait("vault API", ping, 60, proc, logs / "vault.log")


def start_agent(c: Cluster, site: str, *, store: bool, hypervisor: str | None = None,
                store_url: str | None = None, env: dict[str, str] | None = None,
                host: str | None = None) -> None:
    """Register (once) and start the agent of ``site`` with the ``hypervisor`` driver
    (``file`` or ``qemu``, VMs under ``<site>/vms``; default: the cluster's). ``store_url``:
    the URL the store is advertised at (a proxy in tests); ``env``: extra environment (e.g.
    ``DRSITE_FAILPOINTS``); with ``store`` the host gets its site's store role (admin call,
    before the agent starts). ``host``: a further host of ``site`` (its files under
    ``<host>/``, process ``agent-<host>``, no store), e.g. a second source host for a
    consistency group."""
    key_dir = host or site
    data = c.root / key_dir / "agent"
    vms = c.root / key_dir / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    (c.root / key_dir / "import").mkdir(exist_ok=True)
    if hypervisor is not None and hypervisor != c.hypervisor:
        c.hypervisors[site] = hypervisor
    if not (data / "agent.json").exists():
        with c.client() as cl:
            try:
                cl.create_site(site, f"{site} site (drsite up)")
            except Conflict:
                pass
            key = cl.registration_key(site, 600)["key"]
        agent_register(vault_url=c.vault_url, key=key, data_dir=data,
                       host_name=host or f"{site}-host",
                       ca_file=c.ca_file, ca_fingerprint=None)
    args = ["agent", "run", "--data", str(data), "--vms", str(vms),
            "--hypervisor", hypervisor or c.hypervisor,
            "--import-dir", str(c.root / key_dir / "import")]
    if store and host is None:
        if site == "primary":
            c.primary_store_port = port = c.primary_store_port or free_port()
        else:
            c.store_port = port = c.store_port or free_port()
        args += ["--store", str(c.root / site / "store"), "--store-listen", f"127.0.0.1:{port}"]
        if store_url is not None:
            args += ["--store-url", store_url]
        # serving the site's store is a role the vault grants (``vault/storerole.py``): give
        # it before the agent's first heartbeat announces its store (idempotent on a restart)
        with c.client() as cl:
            cl.set_store_host(site, f"{site}-host")
    proc = _spawn(f"agent-{key_dir}", args, c.root / "logs", env)
    c.pids[f"agent-{key_dir}"] = proc.pid
    c.save()
    host_name = host or f"{site}-host"

    def up() -> bool:
        with c.client() as cl:
            return any(h.get("site") == site and h.get("name") == host_name and h.get("up")
                       for h in cl.hosts())

    _wait(f"{key_dir} agent heartbeat", up, 60, proc, c.root / "logs" / f"agent-{key_dir}.log")


def up(root: Path, *, hypervisor: str = "file") -> Cluster:
    """Start (or restart) the vault and both agents (both with the ``hypervisor`` driver);
    idempotent over an existing directory."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster.load(root) if (root / "cluster.json").exists() else Cluster(root)
    down(c)
    c.pids = {}
    c.hypervisor = hypervisor
    try:
        start_vault(c)
        start_agent(c, "secondary", store=True)
        start_agent(c, "primary", store=True)
        start_stopped_vms(c)
    except BaseException:
        down(c, vms=False)  # nothing it started outlives it (the VMs were not touched yet)
        c.save()
        raise
    c.save()
    return c


def site_driver(c: Cluster, site: str) -> HypervisorDriver:
    """The hypervisor driver of ``site``'s VMs (as its agent runs it)."""
    return make_hypervisor(c.hypervisors.get(site, c.hypervisor), c.root / site / "vms")


def sites(c: Cluster) -> list[str]:
    return sorted(p.parent.name for p in c.root.glob("*/vms") if p.is_dir())


def stop_vms(c: Cluster, timeout: float = 20.0) -> int:
    """Stop every VM of the cluster's sites (gracefully; forced after ``timeout``), and every
    QEMU process holding their disks; the ones that ran are recorded for the next ``up``.
    Returns how many were running."""
    n = 0
    for site in sites(c):
        hv = site_driver(c, site)
        for vm in hv.list_vms():
            if vm.power is PowerState.RUNNING:
                c.stopped_vms.setdefault(site, [])
                if vm.vm_id not in c.stopped_vms[site]:
                    c.stopped_vms[site].append(vm.vm_id)
                n += 1
            try:
                if isinstance(hv, QemuHypervisor):  # also a storage daemon of a stopped VM
                    hv.stop_processes(vm.vm_id, timeout=timeout)
                elif vm.power is PowerState.RUNNING:
                    hv.power_off(vm.vm_id, timeout=timeout)
            except DrsiteError:
                hv.power_off(vm.vm_id, force=True)
        c.save()
    return n


def start_stopped_vms(c: Cluster) -> None:
    """Power on again the VMs ``down`` stopped (the ones still there)."""
    for site, vm_ids in sorted(c.stopped_vms.items()):
        hv = site_driver(c, site)
        present = {vm.vm_id for vm in hv.list_vms()}
        for vm_id in vm_ids:
            if vm_id in present:
                hv.power_on(vm_id)
    c.stopped_vms = {}
    c.save()


def down(c: Cluster, *, timeout: float = 15.0, vms: bool = True) -> None:
    """Stop every process of the cluster (SIGTERM, then SIGKILL), then (``vms``) its VMs."""
    for name, pid in list(c.pids.items()):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            c.pids.pop(name, None)
    deadline = time.monotonic() + timeout
    for name, pid in list(c.pids.items()):
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                if _reap(pid):
                    break
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        c.pids.pop(name, None)
    if vms and c.root.is_dir():
        stop_vms(c)


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False
