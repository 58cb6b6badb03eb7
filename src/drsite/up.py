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
    logs/                  one log per process (0700 / 0600)
    cluster.json           ports, pids, URLs (read by ``drsite down`` and the demo)

With ``ha`` (``drsite up --ha``, issue 14) the vault is a pair, one per site, each with its
own PostgreSQL cluster on loopback (``vault/pgcluster.py``)::

    pg/primary/            site A's cluster: the primary
    pg/secondary/          site B's cluster: a hot standby (base backup, slot drsite_secondary)
    vault/                 site A's vault: the active one
    vault-secondary/       site B's vault: the standby (only master.key copied from A)

Agents are registered with both vaults and follow the active one; ``drsite vault promote
--vault VAULT_B_URL`` makes B active when site A is lost.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from drsite.client.api import VaultClient, VaultConfig
from drsite.core.errors import Conflict, DrsiteError, NetworkError, TransientError
from drsite.fsutil import atomic_write_json, read_json
from drsite.vault.pgcluster import LocalCluster


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
    # a vault pair (``ha``): site B's vault and both PostgreSQL clusters' ports
    ha: bool = False
    vault_b_url: str = ""
    vault_b_port: int = 0
    pg_ports: dict[str, int] = field(default_factory=dict)

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
        d: dict[str, Any] = read_json(root / "cluster.json")
        d["root"] = Path(d["root"])
        return Cluster(**d)

    def pg(self, site: str) -> LocalCluster:
        """The PostgreSQL cluster of ``site`` (``ha`` only)."""
        return LocalCluster(self.root / "pg" / site, self.pg_ports[site])

    @property
    def vault_urls(self) -> list[str]:
        return [self.vault_url, self.vault_b_url] if self.ha else [self.vault_url]

    def env_lines(self) -> list[str]:
        return [f"export DRSITE_VAULT_URL={self.vault_url}",
                f"export DRSITE_TOKEN=$(cat {self.root / 'vault' / 'admin.token'})",
                f"export DRSITE_CA_FILE={self.ca_file}"]


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
    """Start site A's vault (the only one, or the active one of a pair)."""
    c.vault_port = c.vault_port or free_port()
    c.vault_url = f"https://127.0.0.1:{c.vault_port}"
    logs = c.root / "logs"
    args = ["vault", "serve", "--data", str(c.root / "vault"), "--listen",
            f"127.0.0.1:{c.vault_port}"]
    if c.ha:
        c.vault_b_port = c.vault_b_port or free_port()
        c.vault_b_url = f"https://127.0.0.1:{c.vault_b_port}"
        args += ["--db", c.pg("primary").url(), "--url", c.vault_url, "--peer", c.vault_b_url]
    proc = _spawn("vault", args, logs)
    c.pids["vault"] = proc.pid
    token_file = c.root / "vault" / "admin.token"
    _wait("vault admin token", lambda: token_file.exists() and token_file.read_text().strip(),
          60, proc, logs / "vault.log")
    c.admin_token = token_file.read_text().strip()

    def ping() -> bool:
        with VaultClient(VaultConfig(c.vault_url, c.admin_token, c.ca_file, timeout=2)) as cl:
            return bool(cl.version())

    _wait("vault API", ping, 60, proc, logs / "vault.log")


PAIR_SLOT = "drsite_secondary"


def start_pg(c: Cluster) -> None:
    """Both PostgreSQL clusters of a pair (idempotent): site A's primary, then site B's hot
    standby of it. A cluster that was rejoined or promoted keeps its role."""
    for site in ("primary", "secondary"):
        c.pg_ports[site] = c.pg_ports.get(site) or free_port()
    a, b = c.pg("primary"), c.pg("secondary")
    if a.exists:
        a.start()
    else:
        a.init_primary()
    if b.exists:
        b.start()
    else:
        b.init_standby(a.port, PAIR_SLOT)


def start_vault_b(c: Cluster) -> None:
    """Start site B's vault of a pair (the standby until promoted): its data directory gets
    only site A's master key; the CA and everything else come with the database."""
    data = c.root / "vault-secondary"
    data.mkdir(mode=0o700, exist_ok=True)
    key = data / "master.key"
    if not key.exists():
        key.write_bytes((c.root / "vault" / "master.key").read_bytes())
        key.chmod(0o600)
    c.vault_b_port = c.vault_b_port or free_port()
    c.vault_b_url = f"https://127.0.0.1:{c.vault_b_port}"
    logs = c.root / "logs"
    proc = _spawn("vault-secondary", ["vault", "serve", "--data", str(data), "--listen",
                                      f"127.0.0.1:{c.vault_b_port}", "--db",
                                      c.pg("secondary").url(), "--url", c.vault_b_url,
                                      "--peer", c.vault_url], logs)
    c.pids["vault-secondary"] = proc.pid

    def ping() -> bool:
        with VaultClient(VaultConfig(c.vault_b_url, c.admin_token, c.ca_file, timeout=2)) as cl:
            return bool(cl.controller())

    _wait("site B's vault API", ping, 60, proc, logs / "vault-secondary.log")


def start_agent(c: Cluster, site: str, *, store: bool, hypervisor: str | None = None,
                store_url: str | None = None, env: dict[str, str] | None = None) -> None:
    """Register (once) and start the agent of ``site`` with the ``hypervisor`` driver
    (``file`` or ``qemu``, VMs under ``<site>/vms``; default: the cluster's). ``store_url``:
    the URL the store is advertised at (a proxy in tests); ``env``: extra environment (e.g.
    ``DRSITE_FAILPOINTS``)."""
    from drsite.agent.process import agent_register

    data = c.root / site / "agent"
    vms = c.root / site / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    if not (data / "agent.json").exists():
        with c.client() as cl:
            try:
                cl.create_site(site, f"{site} site (drsite up)")
            except Conflict:
                pass
            key = cl.registration_key(site, 600)["key"]
        agent_register(vault_url=c.vault_url, key=key, data_dir=data, host_name=f"{site}-host",
                       ca_file=c.ca_file, ca_fingerprint=None,
                       other_vaults=tuple(c.vault_urls[1:]))
    args = ["agent", "run", "--data", str(data), "--vms", str(vms),
            "--hypervisor", hypervisor or c.hypervisor]
    if store:
        if site == "primary":
            c.primary_store_port = port = c.primary_store_port or free_port()
        else:
            c.store_port = port = c.store_port or free_port()
        args += ["--store", str(c.root / site / "store"), "--store-listen", f"127.0.0.1:{port}"]
        if store_url is not None:
            args += ["--store-url", store_url]
    proc = _spawn(f"agent-{site}", args, c.root / "logs", env)
    c.pids[f"agent-{site}"] = proc.pid

    def up() -> bool:
        for url in c.vault_urls:  # a pair: whichever is active has the heartbeats
            try:
                with VaultClient(VaultConfig(url, c.admin_token, c.ca_file, timeout=5)) as cl:
                    if any(h.get("site") == site and h.get("up") for h in cl.hosts()):
                        return True
            except (DrsiteError, OSError):
                continue
        return False

    _wait(f"{site} agent heartbeat", up, 60, proc, c.root / "logs" / f"agent-{site}.log")


def up(root: Path, *, hypervisor: str = "file", ha: bool = False) -> Cluster:
    """Start (or restart) the vault and both agents (both with the ``hypervisor`` driver);
    idempotent over an existing directory. ``ha``: a vault pair, one per site, on PostgreSQL
    streaming replication (see the module docstring)."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster.load(root) if (root / "cluster.json").exists() else Cluster(root)
    down(c)
    c.pids = {}
    c.hypervisor = hypervisor
    if ha and not c.ha and (root / "vault").exists():
        raise Conflict(f"{root} holds a deployment without HA",
                       hint="Use another --data directory for 'drsite up --ha'.")
    c.ha = c.ha or ha
    if c.ha:
        root.chmod(0o755)  # the PostgreSQL server (user postgres when run as root) goes in
        start_pg(c)
    start_vault(c)
    if c.ha:
        start_vault_b(c)
    start_agent(c, "secondary", store=True)
    start_agent(c, "primary", store=True)
    c.save()
    return c


def down(c: Cluster, *, timeout: float = 15.0) -> None:
    """Stop every process of the cluster (SIGTERM, then SIGKILL), and a pair's PostgreSQL
    clusters."""
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
    if c.ha:
        for site in ("primary", "secondary"):
            if site in c.pg_ports:
                c.pg(site).stop("fast")


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False
