"""A vault per site on PostgreSQL streaming replication (issue 14 parts 1–3), real processes:
two PostgreSQL clusters drsite starts on loopback (``vault/pgcluster.py``: the primary, and a
hot standby made by ``pg_basebackup`` from a replication slot), ``drsite vault serve`` on each.

- the standby vault takes the CA from the replicated database (same CA, no files copied but
  the master key), serves reads (the API with the active's tokens, the dashboard) and answers
  every write — an operator's call, an agent's heartbeat — with ``standby`` (503, transient),
  naming the active vault's URL;
- what the active writes shows on the standby (streaming replication).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from drsite import tlsutil
from drsite.agent.link import VaultLink
from drsite.pki import make_key_and_csr
from drsite.vault.pgcluster import LocalCluster
from drsite.web.session import COOKIE
from tests.integration.test_vault_controller_processes import (
    LEASE_S,
    REPO,
    VaultProc,
    free_port,
    start_vault,
    stop,
)
from tests.pg import require_pg


@pytest.fixture(autouse=True)
def _needs_pg() -> None:
    require_pg()


@dataclass
class Pair:
    pg_a: LocalCluster
    pg_b: LocalCluster
    data_a: Path
    data_b: Path
    a: VaultProc
    b: VaultProc | None
    token: str
    tmp: Path

    @property
    def ca(self) -> Path:
        return self.data_a / "pki" / "ca.pem"

    def api(self, v: VaultProc) -> httpx.Client:
        return httpx.Client(base_url=v.url + "/api/v1", verify=tlsutil.client_context(self.ca),
                            headers={"Authorization": f"Bearer {self.token}"}, timeout=30)

    def start_b(self) -> VaultProc:
        self.b = start_vault(self.data_b, self.pg_b.url(), self.tmp / "vault-b.log")
        return self.b


def wait(what: str, cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    # the clusters' directories must be reachable by the server's user (root runs it as
    # postgres), which pytest's private tmp_path is not
    pg_root = Path(tempfile.mkdtemp(prefix="drsite-pair-"))
    pg_root.chmod(0o755)
    pg_a = LocalCluster(pg_root / "a", free_port())
    pg_b = LocalCluster(pg_root / "b", free_port())
    procs: list[VaultProc] = []
    try:
        pg_a.init_primary()
        data_a, data_b = tmp_path / "vault-a", tmp_path / "vault-b"
        a = start_vault(data_a, pg_a.url(), tmp_path / "vault-a.log")
        procs.append(a)
        pg_b.init_standby(pg_a.port, "drsite_b")
        data_b.mkdir(mode=0o700)
        shutil.copy2(data_a / "master.key", data_b / "master.key")  # the one file a site copies
        p = Pair(pg_a, pg_b, data_a, data_b, a, None, (data_a / "admin.token").read_text().strip(),
                 tmp_path)
        yield p
        if p.b is not None:
            procs.append(p.b)
    finally:
        for v in procs:
            stop(v)
        for pg in (pg_a, pg_b):
            pg.stop("immediate")
        shutil.rmtree(pg_root, ignore_errors=True)


def register(p: Pair, v: VaultProc, host: str, site: str) -> tuple[Path, Path]:
    with p.api(v) as api:
        api.post("/sites", json={"name": site}).raise_for_status()
        key = api.post(f"/sites/{site}/registration-keys", json={"ttl_s": 600}).json()["key"]
    key_pem, csr = make_key_and_csr(host)
    r = httpx.post(v.url + "/api/v1/agent/register", verify=tlsutil.client_context(p.ca),
                   json={"key": key, "host_name": host, "csr_pem": csr.decode()})
    assert r.status_code == 201, r.text
    (p.tmp / f"{host}.key").write_bytes(key_pem)
    (p.tmp / f"{host}.pem").write_text(r.json()["cert_pem"])
    return p.tmp / f"{host}.pem", p.tmp / f"{host}.key"


def test_standby_serves_reads_and_refuses_writes(pair: Pair) -> None:
    p = pair
    cert, key = register(p, p.a, "hv1", "prod")
    b = p.start_b()
    # the standby took the CA from the database: the same certificate, its own server cert
    assert (p.data_b / "pki" / "ca.pem").read_bytes() == p.ca.read_bytes()
    assert (p.data_b / "pki" / "server.pem").read_bytes() != (p.data_a / "pki" / "server.pem").read_bytes()
    assert not (p.data_b / "admin.token").exists()

    with p.api(b) as api:
        ctl = api.get("/controller").json()
        assert ctl["role"] == "standby" and ctl["this_process"]["controller"] is False
        assert ctl["lease"]["url"] == p.a.url  # the active vault, from the replicated lease
        sites = {s["name"] for s in api.get("/sites").json()}
        assert "prod" in sites
        # the dashboard (a session cookie holding the active's token)
        ui = httpx.get(b.url + "/ui", verify=tlsutil.client_context(p.ca),
                       cookies={COOKIE: p.token}, timeout=30)
        assert ui.status_code == 200, ui.text[:500]
        assert "<strong>standby</strong>" in ui.text and f'href="{p.a.url}/ui"' in ui.text
        # an operator's write: refused before it starts, naming the active vault
        r = api.post("/sites", json={"name": "dr"})
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["code"] == "standby" and body["class"] == "transient"
        assert p.a.url in body["message"] and "drsite vault promote" in body["hint"]
    # what the active writes shows on the standby
    with p.api(p.a) as api:
        api.post("/sites", json={"name": "dr"}).raise_for_status()
    with p.api(b) as api:
        wait("the new site replicated",
             lambda: "dr" in {s["name"] for s in api.get("/sites").json()})

    # an agent's heartbeat (writes): the standby error; the active takes it
    ctx = tlsutil.client_context(p.ca, cert, key)
    beat = {"host_name": "hv1", "version": "t", "vms": [], "items": []}
    r = httpx.post(b.url + "/api/v1/agent/heartbeat", verify=ctx, json=beat, timeout=30)
    assert r.status_code == 503 and r.json()["code"] == "standby", r.text
    r = httpx.post(p.a.url + "/api/v1/agent/heartbeat", verify=ctx, json=beat, timeout=30)
    assert r.status_code == 200, r.text
    # the agent's link, told the standby first, follows the active by itself
    link = VaultLink([b.url, p.a.url], ctx)
    try:
        link.heartbeat(beat)
        assert link.vault_url == p.a.url
    finally:
        link.close()
    assert "Traceback" not in b.text()


def test_standby_refuses_to_start_without_the_master_key(pair: Pair) -> None:
    p = pair
    (p.data_b / "master.key").unlink()
    with pytest.raises(AssertionError, match="master key"):
        p.start_b()


def start_at(data: Path, db_url: str, log: Path, port: int, peer: str) -> VaultProc:
    """``drsite vault serve`` at a chosen port (the pair's URLs are known before either starts)."""
    exe = Path(sys.executable).with_name("drsite")
    cmd = [str(exe), "vault", "serve", "--data", str(data), "--db", db_url, "--listen",
           f"127.0.0.1:{port}", "--heartbeat-interval", "1", "--controller-lease", str(LEASE_S),
           "--peer", peer]
    with open(log, "ab") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO)
    v = VaultProc(port, proc, log)
    deadline = time.monotonic() + 60
    while True:
        assert v.alive(), f"vault exited: {v.text()[-3000:]}"
        ca = data / "pki" / "ca.pem"
        if ca.exists():
            with contextlib.suppress(httpx.HTTPError, ssl.SSLError, OSError):
                if httpx.get(v.url + "/api/v1/version", verify=tlsutil.client_context(ca),
                             timeout=2).status_code == 200:
                    return v
        assert time.monotonic() < deadline, f"vault did not come up: {v.text()[-3000:]}"
        time.sleep(0.1)


def cluster_pids(pg: LocalCluster) -> list[int]:
    """The postmaster and every backend of a cluster (to stop the whole server at once)."""
    main = pg.pid()
    assert main is not None
    pids = [main]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == main:
                pids.append(int(stat.parent.name))
    return pids


def drsite(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("drsite")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def state(p: Pair, v: VaultProc) -> dict[str, Any]:
    r = httpx.get(v.url + "/api/v1/vault/state", verify=tlsutil.client_context(p.ca), timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_promote_fences_the_old_active_until_it_rejoins(tmp_path: Path) -> None:
    """SIGSTOP the active vault and its PostgreSQL, ``drsite vault promote`` the standby,
    SIGCONT the old one: it sees the newer timeline and epoch, refuses every write (also after
    a restart) and the agents' link moves on; ``drsite vault rejoin`` rewinds its database and
    it comes back as the standby, with the new active's data."""
    pg_root = Path(tempfile.mkdtemp(prefix="drsite-pair-"))
    pg_root.chmod(0o755)
    pg_a, pg_b = LocalCluster(pg_root / "a", free_port()), LocalCluster(pg_root / "b", free_port())
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"https://127.0.0.1:{port_a}", f"https://127.0.0.1:{port_b}"
    data_a, data_b = tmp_path / "vault-a", tmp_path / "vault-b"
    procs: list[VaultProc] = []
    stopped: list[int] = []
    try:
        pg_a.init_primary()
        a = start_at(data_a, pg_a.url(), tmp_path / "vault-a.log", port_a, url_b)
        procs.append(a)
        pg_b.init_standby(pg_a.port, "drsite_b")
        data_b.mkdir(mode=0o700)
        shutil.copy2(data_a / "master.key", data_b / "master.key")
        b = start_at(data_b, pg_b.url(), tmp_path / "vault-b.log", port_b, url_a)
        procs.append(b)
        p = Pair(pg_a, pg_b, data_a, data_b, a, b, (data_a / "admin.token").read_text().strip(),
                 tmp_path)
        cert, key = register(p, a, "hv1", "prod")
        sa, sb = state(p, a), state(p, b)
        assert sa["role"] == "active" and sb["role"] == "standby", (sa, sb)
        old_epoch, old_tl = sa["epoch"], sa["timeline"]
        # while the active vault answers, a promotion is refused (a disaster tool, not a
        # switchover: --force for that)
        out = drsite("vault", "promote", "--vault", url_b, "--token", p.token, "--ca-file",
                     str(p.ca))
        assert out.returncode == 2 and "--force" in " ".join(out.stderr.split()), out.stderr
        assert state(p, b)["role"] == "standby"

        # site A freezes: the vault and every process of its PostgreSQL
        stopped = [a.proc.pid, *cluster_pids(pg_a)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        out = drsite("vault", "promote", "--vault", url_b, "--token", p.token, "--ca-file",
                     str(p.ca), "--json")
        assert out.returncode == 0, out.stderr + out.stdout
        sb = state(p, b)
        assert sb["role"] == "active" and sb["epoch"] > old_epoch and sb["timeline"] > old_tl, sb
        with p.api(b) as api:
            api.post("/sites", json={"name": "dr"}).raise_for_status()  # B writes now
            assert api.get("/controller").json()["this_process"]["controller"] is True
        # stay stopped past the old active's confirmation window
        time.sleep(max(0.0, LEASE_S + 1.0 - (time.monotonic() - t0)))
        for pid in reversed(stopped):
            os.kill(pid, signal.SIGCONT)
        stopped = []

        # the old active refuses writes: it names the new active
        with p.api(a) as api:
            r = api.post("/sites", json={"name": "split"})
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "standby" and url_b in r.json()["message"], r.text
            assert "fenced" in r.json()["message"] and "drsite vault rejoin" in r.json()["hint"]
        assert state(p, a)["role"] == "fenced"
        out = drsite("vault", "state", "--vault", url_a, "--ca-file", str(p.ca))
        assert out.returncode == 0 and out.stdout.startswith("fenced"), out.stdout + out.stderr
        assert (data_a / "fenced.json").exists()
        # an agent heartbeat too; the agent's link follows B by itself
        ctx = tlsutil.client_context(p.ca, cert, key)
        beat = {"host_name": "hv1", "version": "t", "vms": [], "items": []}
        r = httpx.post(url_a + "/api/v1/agent/heartbeat", verify=ctx, json=beat, timeout=30)
        assert r.status_code == 503 and r.json()["code"] == "standby", r.text
        link = VaultLink([url_a, url_b], ctx)
        try:
            link.heartbeat(beat)
            assert link.vault_url == url_b
        finally:
            link.close()
        # A's database never took "split" (nor anything from its controller's fence)
        with psycopg.connect(f"host=127.0.0.1 port={pg_a.port} user=postgres dbname=drsite",
                             autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM sites WHERE name = 'split'"
                                ).fetchone() == (0,)
            lease = conn.execute("SELECT epoch FROM controller_lease").fetchone()
            assert lease == (old_epoch,)

        assert "Traceback" not in a.text()  # refusals, not failures
        # a restart keeps it fenced
        stop(a)
        a = start_at(data_a, pg_a.url(), tmp_path / "vault-a.log", port_a, url_b)
        procs.append(a)
        with p.api(a) as api:
            r = api.post("/sites", json={"name": "split"})
            assert r.status_code == 503 and "fenced" in r.json()["message"], r.text
        # rejoin refuses while the vault runs, then rewinds it into B's standby
        out = drsite("vault", "rejoin", "--data", str(data_a), "--pg", str(pg_a.directory),
                     "--pg-port", str(pg_a.port), "--primary-port", str(pg_b.port),
                     "--slot", "drsite_a")
        assert out.returncode == 2 and "is running" in " ".join((out.stderr + out.stdout).split())
        stop(a)
        out = drsite("vault", "rejoin", "--data", str(data_a), "--pg", str(pg_a.directory),
                     "--pg-port", str(pg_a.port), "--primary-port", str(pg_b.port),
                     "--slot", "drsite_a", "--json")
        assert out.returncode == 0, out.stderr + out.stdout
        assert not (data_a / "fenced.json").exists()
        a = start_at(data_a, pg_a.url(), tmp_path / "vault-a.log", port_a, url_b)
        procs.append(a)
        assert state(p, a)["role"] == "standby"
        with p.api(a) as api:
            wait("B's writes on the rejoined standby",
                 lambda: "dr" in {s["name"] for s in api.get("/sites").json()})
            r = api.post("/sites", json={"name": "x"})
            assert r.status_code == 503 and url_b in r.json()["message"], r.text
        assert state(p, b)["role"] == "active"
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for v in procs:
            stop(v)
        for pg in (pg_a, pg_b):
            pg.stop("immediate")
        shutil.rmtree(pg_root, ignore_errors=True)


def test_a_database_promoted_by_hand_makes_the_standby_active(pair: Pair) -> None:
    """``pg_ctl promote`` of the standby's database, not ``drsite vault promote``: the standby
    vault notices, becomes active and takes the controller lease once the old holder's lease
    (replicated, no longer renewed here) has expired; then it writes."""
    p = pair
    b = p.start_b()
    with p.api(b) as api:
        assert api.get("/controller").json()["role"] == "standby"
        p.pg_b.promote()
        wait("the standby vault active", lambda: api.get("/controller").json()["role"] == "active",
             20)
        wait("the controller lease taken", lambda: api.get("/controller").json()
             ["this_process"]["controller"] is True, 3 * LEASE_S + 10)
        lease = api.get("/controller").json()["lease"]
        assert lease["url"] == b.url and lease["epoch"] >= 2, lease
        api.post("/sites", json={"name": "b-only"}).raise_for_status()
    assert "Traceback" not in b.text()
