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

With ``ha`` (``drsite up --ha``, issue 14) the vault is a pair, one per site, each with its
own PostgreSQL cluster on loopback (``vault/pgcluster.py``)::

    pg/primary/            site A's cluster: the primary
    pg/secondary/          site B's cluster: a hot standby (base backup, slot drsite_secondary)
    vault/                 site A's vault: the active one
    vault-secondary/       site B's vault: the standby (only master.key copied from A)

Agents are registered with both vaults and follow the active one; ``drsite vault promote
--vault VAULT_B_URL`` makes B active when site A is lost. With ``witness`` (``drsite up --ha
--witness``) a third process, the pair's witness (``witness/``: its record and token; its
certificate from site A's CA), runs too, and vault B promotes itself when site A has been
silent ``Cluster.auto_promote_after`` seconds (15) and the witness grants it
(docs/control-plane.md). Admin writes ``up`` makes (sites, registration keys, the store role)
go to whichever vault of the pair is active.
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

import httpx

from drsite import tlsutil
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
from drsite.pki import CertificateAuthority
from drsite.vault.pgcluster import LocalCluster

# the demo pair's automatic promotion: vault B promotes itself this long after site A went
# silent (above the default controller lease, 10 s)
AUTO_PROMOTE_AFTER_S = 15.0


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
    # a vault pair (``ha``): site B's vault and both PostgreSQL clusters' ports
    ha: bool = False
    vault_b_url: str = ""
    vault_b_port: int = 0
    pg_ports: dict[str, int] = field(default_factory=dict)
    # the pair's witness (``ha`` with ``witness``): automatic promotion of vault B
    witness: bool = False
    witness_port: int = 0
    auto_promote_after: float = AUTO_PROMOTE_AFTER_S

    @property
    def witness_url(self) -> str:
        return f"https://127.0.0.1:{self.witness_port}" if self.witness else ""

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

    def pg(self, site: str) -> LocalCluster:
        """The PostgreSQL cluster of ``site`` (``ha`` only)."""
        return LocalCluster(self.root / "pg" / site, self.pg_ports[site])

    @property
    def vault_urls(self) -> list[str]:
        return [self.vault_url, self.vault_b_url] if self.ha else [self.vault_url]

    def vault_states(self) -> dict[str, dict[str, Any] | None]:
        """Each vault of the pair (A, then B) and its ``/vault/state`` as it answers it
        (``role``: active, standby or fenced; ``timeline``, ``epoch``), None for a vault that
        does not answer. Without a pair nothing is asked: ``{}``."""
        if not self.ha:
            return {}
        out: dict[str, dict[str, Any] | None] = {}
        for url in self.vault_urls:
            try:
                with VaultClient(VaultConfig(url, self.admin_token, self.ca_file,
                                             timeout=5)) as cl:
                    out[url] = cl.vault_state()
            except (DrsiteError, OSError):
                out[url] = None
        return out

    def active_url(self, states: dict[str, dict[str, Any] | None] | None = None) -> str:
        """The URL of the vault that takes writes: the only one, or the pair's vault whose
        ``/vault/state`` says ``active`` (the newest timeline and epoch if both do, as for a
        moment after a forced promotion). ``states``: :meth:`vault_states` already read (else
        it is read here). A pair with no active vault answering raises ``TransientError``."""
        if not self.ha:
            return self.vault_url
        best: tuple[tuple[int, int], str] | None = None
        for url, st in (self.vault_states() if states is None else states).items():
            if st is not None and st.get("role") == "active":
                pos = (int(st.get("timeline") or 0), int(st.get("epoch") or 0))
                if best is None or pos > best[0]:
                    best = (pos, url)
        if best is None:
            raise TransientError(f"no vault of the pair ({', '.join(self.vault_urls)}) answers "
                                 "as the active one",
                                 hint="Start the active site's vault, or if that site is lost "
                                      "make the other one active: drsite vault promote --vault "
                                      "URL.")
        return best[1]

    def active_client(self) -> VaultClient:
        """An admin client of the vault that takes writes (see :meth:`active_url`)."""
        return VaultClient(VaultConfig(self.active_url(), self.admin_token, self.ca_file))

    def env_lines(self) -> list[str]:
        """Shell exports pointing the CLI at this cluster (``drsite env`` prints them): for a
        pair, at the vault that answers as the active one (vault A when neither answers; the
        admin token and the CA are the pair's, replicated with the database)."""
        try:
            url = self.active_url()
        except TransientError:
            url = self.vault_url
        token = shlex.quote(str(self.root / "vault" / "admin.token"))
        return [f"export DRSITE_VAULT_URL={shlex.quote(url)}",
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


def witness_args(c: Cluster) -> list[str]:
    """A pair vault's witness options (none without a witness)."""
    if not c.witness:
        return []
    return ["--witness", c.witness_url, "--witness-token-file",
            str(c.root / "witness" / "witness.token"),
            "--auto-promote-after", f"{c.auto_promote_after:g}"]


def start_witness(c: Cluster) -> None:
    """Start the pair's witness; at first start site A's CA (made here if the vault has not
    run yet) issues its certificate. Before the vaults: an active vault whose peer is not up
    yet writes only while the witness answers."""
    CertificateAuthority.load_or_create(c.root / "vault" / "pki")
    c.witness_port = c.witness_port or free_port()
    logs = c.root / "logs"
    proc = _spawn("witness", ["vault", "witness", "--data", str(c.root / "witness"), "--listen",
                              f"127.0.0.1:{c.witness_port}", "--ca-data", str(c.root / "vault")],
                  logs)
    c.pids["witness"] = proc.pid
    c.save()

    def ping() -> bool:
        try:
            r = httpx.get(c.witness_url + "/witness/state", timeout=2,
                          verify=tlsutil.client_context(c.ca_file))
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    _wait("the witness", ping, 60, proc, logs / "witness.log")


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
        args += ["--db", c.pg("primary").url(), "--url", c.vault_url, "--peer", c.vault_b_url,
                 *witness_args(c)]
    proc = _spawn("vault", args, logs)
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


PAIR_SLOT = "drsite_secondary"


def start_pg(c: Cluster) -> None:
    """Both PostgreSQL clusters of a pair (idempotent): site A's primary, then site B's hot
    standby of it. A cluster that was rejoined or promoted keeps its role."""
    for site in ("primary", "secondary"):
        c.pg_ports[site] = c.pg_ports.get(site) or free_port()
    c.save()  # a later 'drsite down' stops the clusters whatever happens next
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
                                      "--peer", c.vault_url, *witness_args(c)], logs)
    c.pids["vault-secondary"] = proc.pid
    c.save()  # a later 'drsite down' finds it whatever happens next

    def ping() -> bool:
        with VaultClient(VaultConfig(c.vault_b_url, c.admin_token, c.ca_file, timeout=2)) as cl:
            return bool(cl.controller())

    _wait("site B's vault API", ping, 60, proc, logs / "vault-secondary.log")


def start_agent(c: Cluster, site: str, *, store: bool, hypervisor: str | None = None,
                store_url: str | None = None, env: dict[str, str] | None = None,
                host: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
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
        active = c.active_url()
        with VaultClient(VaultConfig(active, c.admin_token, c.ca_file)) as cl:
            try:
                cl.create_site(site, f"{site} site (drsite up)")
            except Conflict:
                pass
            key = cl.registration_key(site, 600)["key"]
        agent_register(vault_url=active, key=key, data_dir=data,
                       host_name=host or f"{site}-host",
                       ca_file=c.ca_file, ca_fingerprint=None,
                       other_vaults=tuple(u for u in c.vault_urls if u != active))
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
        # it before the agent's first heartbeat announces its store (idempotent on a restart);
        # a standby vault refuses writes, so a pair's active vault gets the call
        with c.active_client() as cl:
            cl.set_store_host(site, f"{site}-host")
    proc = _spawn(f"agent-{key_dir}", [*args, *extra_args], c.root / "logs", env)
    c.pids[f"agent-{key_dir}"] = proc.pid
    c.save()
    host_name = host or f"{site}-host"

    def up() -> bool:
        for url in c.vault_urls:  # a pair: whichever is active has the heartbeats
            try:
                with VaultClient(VaultConfig(url, c.admin_token, c.ca_file, timeout=5)) as cl:
                    if any(h.get("site") == site and h.get("name") == host_name and h.get("up")
                           for h in cl.hosts()):
                        return True
            except (DrsiteError, OSError):
                continue
        return False

    _wait(f"{key_dir} agent heartbeat", up, 60, proc, c.root / "logs" / f"agent-{key_dir}.log")


def up(root: Path, *, hypervisor: str = "file", ha: bool = False,
       witness: bool = False) -> Cluster:
    """Start (or restart) the vault and both agents (both with the ``hypervisor`` driver);
    idempotent over an existing directory. ``ha``: a vault pair, one per site, on PostgreSQL
    streaming replication; ``witness`` (with ``ha``): and the pair's witness, vault B promoting
    itself when site A is lost (see the module docstring)."""
    if witness and not ha:
        raise InvalidInput("a witness is for a vault pair: drsite up --ha --witness")
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    c = Cluster.load(root) if (root / "cluster.json").exists() else Cluster(root)
    if ha and not c.ha and (root / "vault").exists():  # refused before anything is stopped
        raise Conflict(f"{root} holds a deployment without HA",
                       hint="Use another --data directory for 'drsite up --ha'.")
    down(c)
    c.pids = {}
    c.hypervisor = hypervisor
    c.ha = c.ha or ha
    c.witness = c.witness or witness
    try:
        if c.ha:
            root.chmod(0o755)  # the PostgreSQL server (user postgres when run as root) goes in
            start_pg(c)
        if c.witness:
            start_witness(c)
        start_vault(c)
        if c.ha:
            start_vault_b(c)
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
    """Stop every process of the cluster (SIGTERM, then SIGKILL), a pair's PostgreSQL
    clusters, then (``vms``) its VMs."""
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
    if vms and c.root.is_dir():
        stop_vms(c)


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        return False
