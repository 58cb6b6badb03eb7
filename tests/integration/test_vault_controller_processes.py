"""Several vault processes on one PostgreSQL database (issue 13 part 4), real processes:
``drsite vault serve`` over HTTPS, a simulated agent speaking the real agent protocol with a
client certificate the vault signed (heartbeats to whichever vault answers, commands answered
like ``drsite agent`` does), items protected and replicating on a 5 s policy.

- exactly one controller at a time (the lease row, and ``GET /controller`` of every process);
- SIGKILL of the controller: another process takes over within one lease period, the jobs and
  the schedule carry on;
- SIGSTOP of the controller past its lease: another takes over; SIGCONT: the old one finds the
  newer epoch, writes nothing and steps down;
- afterwards, the commands and tasks tables hold no duplicate: every job sent each of its
  commands once, and no item ever had two replication commands open at once;
- ``--workers 2``: both workers serve (agent client certificates too), a killed worker is
  replaced, one controller throughout; SQLite refuses ``--workers``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from drsite import tlsutil
from drsite.pki import make_key_and_csr
from drsite.sitestore.acl import acl_digest
from drsite.vault.testing import point, report, vm_info

LEASE_S = 3.0
FREQ_S = 5.0
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VaultProc:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_vault(data: Path, db_url: str, log: Path, *extra: str) -> VaultProc:
    port = free_port()
    exe = Path(sys.executable).with_name("drsite")
    cmd = [str(exe), "vault", "serve", "--data", str(data), "--db", db_url, "--listen",
           f"127.0.0.1:{port}", "--heartbeat-interval", "1", "--controller-lease", str(LEASE_S),
           *extra]
    with open(log, "ab") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO)
    v = VaultProc(port, proc, log)
    ca = data / "pki" / "ca.pem"
    deadline = time.monotonic() + 60
    while True:
        assert v.alive(), f"vault exited: {v.text()[-3000:]}"
        if ca.exists():
            with contextlib.suppress(httpx.HTTPError, ssl.SSLError, OSError):
                if httpx.get(v.url + "/api/v1/version", verify=tlsutil.client_context(ca),
                             timeout=2).status_code == 200:
                    return v
        assert time.monotonic() < deadline, f"vault did not come up: {v.text()[-3000:]}"
        time.sleep(0.1)


def stop(v: VaultProc) -> None:
    if v.alive():
        with contextlib.suppress(ProcessLookupError):
            v.proc.send_signal(signal.SIGCONT)
            v.proc.send_signal(signal.SIGTERM)
        try:
            v.proc.wait(30)
        except subprocess.TimeoutExpired:
            v.proc.kill()
            v.proc.wait(10)


@dataclass
class SimItem:
    item_id: str
    vm_id: str
    name: str
    seq: int = 0
    points: list[dict[str, Any]] = field(default_factory=list)


class SimAgent(threading.Thread):
    """One host: heartbeats (VM inventory, item reports, new points) every 0.5 s to the first
    vault of ``urls`` that answers (a load balancer's stand-in), commands answered at once."""

    def __init__(self, urls: Callable[[], list[str]], ca: Path, cert: Path, key: Path,
                 name: str, vms: list[dict[str, Any]], store_url: str | None = None) -> None:
        super().__init__(daemon=True, name=f"agent-{name}")
        self.urls, self.name, self.vms, self.store_url = urls, name, vms, store_url
        self.store_acl: dict[str, Any] | None = None  # a store host confirms its access list
        self.ctx = tlsutil.client_context(ca, cert, key)
        self.items: dict[str, SimItem] = {}
        self.seen: set[str] = set()
        self.halt = threading.Event()
        self.errors: list[str] = []

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        for url in self.urls():
            try:
                r = httpx.post(f"{url}/api/v1/agent{path}", json=body, verify=self.ctx, timeout=5)
            except (httpx.HTTPError, OSError):
                continue
            if r.status_code >= 500:
                continue
            assert r.status_code < 300, f"{path}: {r.status_code} {r.text}"
            out: dict[str, Any] = r.json()
            return out
        return None

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.beat()
            except Exception as e:  # reported by the test
                self.errors.append(repr(e))
            self.halt.wait(0.5)

    def beat(self) -> None:
        items = [{"item_id": it.item_id, "report": report(it.item_id, it.vm_id, it.name),
                  "new_points": it.points} for it in self.items.values()]
        reply = self.post("/heartbeat", {
            "host_name": self.name, "version": "test", "vms": self.vms, "items": items,
            "store_url": self.store_url,
            "store_acl_digest": acl_digest(self.store_acl) if self.store_acl else None})
        if reply is None:
            return
        if reply.get("store_acl") is not None:
            self.store_acl = reply["store_acl"]
        for item_id, seq in reply["ack"].items():
            it = self.items.get(item_id)
            if it is not None:
                it.points = [p for p in it.points if p["seq"] > seq]
        for cmd in reply["commands"]:
            cid, kind, item_id = cmd["command_id"], cmd["kind"], cmd["item_id"]
            if cid in self.seen:
                continue  # re-delivered: the agent already has it
            self.seen.add(cid)
            if kind == "protect" and item_id not in self.items:
                vm_id = cmd["args"]["vm_id"]
                name = next(v["name"] for v in self.vms if v["vm_id"] == vm_id)
                self.items[item_id] = SimItem(item_id, vm_id, name)
            it = self.items.get(item_id) if item_id else None
            if kind in ("protect", "cycle", "resync") and it is not None:
                it.seq += 1
                it.points.append(point(item_id, it.seq, time.time()))
            self.post(f"/commands/{cid}/result", {"status": "succeeded", "progress": 100.0,
                                                  "result": {}})


@dataclass
class Cluster:
    data: Path
    db_url: str
    vaults: list[VaultProc]
    admin: str
    agent: SimAgent | None = None
    store: SimAgent | None = None

    @property
    def ca(self) -> Path:
        return self.data / "pki" / "ca.pem"

    def live_urls(self) -> list[str]:
        return [v.url for v in self.vaults if v.alive()]

    def api(self, v: VaultProc) -> httpx.Client:
        return httpx.Client(base_url=v.url + "/api/v1", verify=tlsutil.client_context(self.ca),
                            headers={"Authorization": f"Bearer {self.admin}"}, timeout=30)

    def sql(self, q: str) -> list[Any]:
        eng = create_engine(self.db_url)
        try:
            with eng.connect() as c:
                return list(c.execute(text(q)).all())
        finally:
            eng.dispose()

    def lease(self) -> tuple[int, str | None, int | None]:
        ((epoch, holder, info),) = self.sql("SELECT epoch, holder, info FROM controller_lease")
        pid = (info if isinstance(info, dict) else {}).get("pid")
        return int(epoch), holder, pid

    def controller(self) -> VaultProc:
        _e, _h, pid = self.lease()
        (v,) = [v for v in self.vaults if v.proc.pid == pid]
        return v

    def wait(self, what: str, cond: Callable[[], bool], timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while not cond():
            assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
            time.sleep(0.05)
        return time.monotonic() - t0


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    data = tmp_path / "vault"
    a = start_vault(data, pg_url, tmp_path / "vault-a.log")
    b = start_vault(data, pg_url, tmp_path / "vault-b.log")
    c = Cluster(data, pg_url, [a, b], (data / "admin.token").read_text().strip())
    try:
        yield c
    finally:
        for a in (c.agent, c.store):
            if a is not None:
                a.halt.set()
                a.join(10)
        for v in c.vaults:
            stop(v)


def setup_protection(c: Cluster, tmp_path: Path, n_vms: int = 4) -> SimAgent:
    with c.api(c.vaults[0]) as api:
        for site in ("prod", "dr"):
            api.post("/sites", json={"name": site}).raise_for_status()
        api.post("/policies", json={"name": "p5", "frequency_s": FREQ_S,
                                    "app_consistent_every_s": None}).raise_for_status()
        api.post("/groups", json={"name": "g", "site": "prod", "target_site": "dr", "policy": "p5",
                                  "match": {"labels": ["ctl"]}}).raise_for_status()
        certs = {}
        for host in ("hv1", "dr1"):
            site = "prod" if host == "hv1" else "dr"
            key = api.post(f"/sites/{site}/registration-keys", json={"ttl_s": 600}).json()["key"]
            key_pem, csr = make_key_and_csr(host)
            r = httpx.post(c.vaults[1].url + "/api/v1/agent/register",
                           verify=tlsutil.client_context(c.ca),
                           json={"key": key, "host_name": host, "csr_pem": csr.decode()})
            assert r.status_code == 201, r.text
            (tmp_path / f"{host}.key").write_bytes(key_pem)
            (tmp_path / f"{host}.pem").write_text(r.json()["cert_pem"])
            certs[host] = (tmp_path / f"{host}.pem", tmp_path / f"{host}.key")
        # serving the site's store is a role the admin grants (vault/storerole.py)
        api.put("/sites/dr/store-host", json={"host": "dr1"}).raise_for_status()
    # the recovery site's host serves a store (never contacted) and confirms its access list
    store = SimAgent(c.live_urls, c.ca, *certs["dr1"], "dr1", [], "https://127.0.0.1:9/store")
    c.store = store
    store.start()
    vms = [vm_info(f"vm-{i}", f"web{i}", labels=["ctl"]) for i in range(n_vms)]
    agent = SimAgent(c.live_urls, c.ca, *certs["hv1"], "hv1", vms)
    c.agent = agent
    agent.start()
    with c.api(c.vaults[0]) as api:
        c.wait("every item protected", lambda: sum(
            1 for i in api.get("/items", params={"limit": 100}).json()["entries"]
            if i["protection"] == "protected") == n_vms)
    return agent


def one_controller(c: Cluster) -> VaultProc:
    """The controller per the lease row; every live process agrees, and only it says it is."""
    v = c.controller()
    epoch, holder, _ = c.lease()
    for other in c.vaults:
        if not other.alive():
            continue
        with c.api(other) as api:
            out = api.get("/controller").json()
        assert out["lease"]["holder"] == holder and out["lease"]["epoch"] == epoch
        assert out["this_process"]["controller"] is (other is v), (other.port, out)
    return v


def cycles_after(c: Cluster, t: float) -> int:
    ((n,),) = c.sql(f"SELECT count(*) FROM commands WHERE kind = 'cycle' AND created_at > {t}")
    return int(n)


def assert_no_duplicates(c: Cluster) -> None:
    """Every job sent each kind of command once; no item had two replication commands open at
    the same time (a second controller would have queued a second one)."""
    dup = c.sql("SELECT job_id, kind, count(*) FROM commands WHERE job_id IS NOT NULL "
                "GROUP BY job_id, kind HAVING count(*) > 1")
    assert dup == []
    rows = c.sql("SELECT item_id, created_at, finished_at FROM commands WHERE kind IN "
                 "('protect', 'cycle', 'resync') ORDER BY item_id, created_at")
    last: dict[str, float | None] = {}
    for item_id, created, finished in rows:
        if item_id in last:
            prev = last[item_id]
            assert prev is not None and created >= prev, (item_id, created, prev)
        last[item_id] = finished
    tasks = c.sql("SELECT job_id, name, count(*) FROM tasks GROUP BY job_id, name "
                  "HAVING count(*) > 1")
    assert tasks == []


def test_one_controller_takeover_after_sigkill_and_fencing_after_sigstop(
        cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    setup_protection(c, tmp_path)
    first = one_controller(c)
    epoch0 = c.lease()[0]
    # SIGKILL: the other process takes over within one lease period (a dead process on this
    # machine is noticed at the next election round; elsewhere its lease would expire first)
    first.proc.kill()
    first.proc.wait(10)
    took = c.wait("a takeover", lambda: c.lease()[2] not in (None, first.proc.pid))
    assert took <= LEASE_S + 1.0, took
    second = one_controller(c)
    assert second is not first and c.lease()[0] == epoch0 + 1
    t = time.time()
    c.wait("cycles under the new controller", lambda: cycles_after(c, t) >= 4, timeout=30)
    # a third process joins; SIGSTOP the controller past its lease: the third takes over
    third = start_vault(c.data, c.db_url, tmp_path / "vault-c.log")
    c.vaults.append(third)
    assert one_controller(c) is second
    second.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    c.wait("a takeover from the stopped controller", lambda: c.lease()[2] == third.proc.pid,
           timeout=30)
    took = time.monotonic() - stopped_at
    # its last renewal was at most a third of a lease before the stop; a session stopped
    # inside a transaction is ended by PostgreSQL after lease/2 (2 s minimum)
    assert took <= LEASE_S + 1.5, took
    assert c.lease()[0] == epoch0 + 2
    t = time.time()
    c.wait("cycles under the third controller", lambda: cycles_after(c, t) >= 4, timeout=30)
    # SIGCONT: the old controller finds the newer epoch, writes nothing, steps down
    log_before = len(second.text())
    second.proc.send_signal(signal.SIGCONT)
    c.wait("the old controller stepping down",
           lambda: "controller lease lost" in second.text()[log_before:], timeout=20)
    time.sleep(2 * LEASE_S / 3 + 0.5)  # a full election round of the woken process
    assert one_controller(c) is third and c.lease()[0] == epoch0 + 2
    assert "this vault process is the controller" not in second.text()[log_before:]
    assert c.agent is not None and c.agent.errors == []
    assert c.store is not None and c.store.errors == []
    assert_no_duplicates(c)
    # jobs started under one controller finished under another: every EnableProtection ended
    states = {s for (s,) in c.sql("SELECT state FROM jobs")}
    assert states == {"succeeded"}, states


def test_workers_share_the_port_and_elect_one_controller(pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "vault"
    v = start_vault(data, pg_url, tmp_path / "vault.log", "--workers", "2")
    c = Cluster(data, pg_url, [v], (data / "admin.token").read_text().strip())
    try:
        pids: set[int] = set()
        controllers: set[int] = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:
            with c.api(v) as api:  # a new connection each time: the kernel picks a worker
                out = api.get("/controller").json()
            pids.add(out["this_process"]["pid"])
            if out["this_process"]["controller"]:
                controllers.add(out["this_process"]["pid"])
        assert len(pids) == 2 and v.proc.pid not in pids, pids
        assert len(controllers) <= 1
        # every worker verifies agent certificates (the h11 protocol subclass in each)
        with c.api(v) as api:
            api.post("/sites", json={"name": "prod"}).raise_for_status()
            key = api.post("/sites/prod/registration-keys", json={"ttl_s": 600}).json()["key"]
        key_pem, csr = make_key_and_csr("hv1")
        r = httpx.post(v.url + "/api/v1/agent/register", verify=tlsutil.client_context(c.ca),
                       json={"key": key, "host_name": "hv1", "csr_pem": csr.decode()})
        assert r.status_code == 201, r.text
        (tmp_path / "hv1.key").write_bytes(key_pem)
        (tmp_path / "hv1.pem").write_text(r.json()["cert_pem"])
        ctx = tlsutil.client_context(c.ca, tmp_path / "hv1.pem", tmp_path / "hv1.key")
        for _ in range(8):
            r = httpx.post(v.url + "/api/v1/agent/heartbeat", verify=ctx,
                           json={"host_name": "hv1", "version": "t", "vms": [], "items": []})
            assert r.status_code == 200, r.text
        r = httpx.post(v.url + "/api/v1/agent/heartbeat", verify=tlsutil.client_context(c.ca),
                       json={"host_name": "hv1", "version": "t", "vms": [], "items": []})
        assert r.status_code == 401  # no certificate, in whichever worker
        # kill the controller worker: the supervisor starts another, a worker takes over
        c.wait("a controller", lambda: c.lease()[2] in pids)
        epoch, _, ctl = c.lease()
        assert ctl is not None
        os.kill(ctl, signal.SIGKILL)
        c.wait("a new controller", lambda: c.lease()[2] not in (None, ctl), timeout=LEASE_S + 5)
        assert c.lease()[0] == epoch + 1
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen - {ctl}) < 2 and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError), c.api(v) as api:
                seen.add(api.get("/controller").json()["this_process"]["pid"])
        assert len(seen - {ctl}) == 2, seen  # the replacement serves too
        assert "exited (signal SIGKILL)" in v.text()
    finally:
        stop(v)
    assert v.proc.returncode == 0
    assert "stopping 2 worker(s)" in v.text()


def test_workers_need_postgresql(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("drsite")
    out = subprocess.run([str(exe), "vault", "serve", "--data", str(tmp_path / "v"), "--listen",
                          f"127.0.0.1:{free_port()}", "--workers", "2"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out
    assert "several API workers need PostgreSQL" in out.stderr + out.stdout
