"""Test support for the vault (the vault itself never imports it).

:class:`Harness` is an in-process vault: ``create_app`` with a fake clock and UTC resync
windows, no background loop (tests call ``tick()``), the FastAPI ``TestClient``, and simulated
agents — real CA-signed certificates handed to the app through the ``peer_cert`` dependency
override instead of TLS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient

from drsite.core.clock import FakeClock
from drsite.core.model import PowerState
from drsite.pki import make_key_and_csr
from drsite.replication.report import ItemReport, ItemState
from drsite.sitestore.acl import acl_digest
from drsite.vault.api.deps import peer_cert
from drsite.vault.app import create_app
from drsite.vault.context import Vault
from drsite.vault.settings import VaultSettings

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
HARNESS_IDLE_IN_TX_S = 300.0


def utc_minute_of_day(t: float) -> int:
    return int((t % 86400) // 60)


def vm_info(vm_id: str, name: str, *, labels: list[str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"vm_id": vm_id, "name": name, "vcpus": 1, "memory_mib": 512,
                         "nics": [{"network": "lan", "mac": "52:54:00:00:00:01", "ip": None}],
                         "disks": [{"disk_id": "disk0", "size": 1 << 20}], "power": PowerState.RUNNING.value}
    if labels is not None:
        d["labels"] = labels
    return d


def report(item_id: str, vm_id: str, vm_name: str, state: ItemState = ItemState.PROTECTED,
           **kw: Any) -> dict[str, Any]:
    return ItemReport(item_id=item_id, vm_id=vm_id, vm_name=vm_name, state=state, **kw).to_dict()


def point(item_id: str, seq: int, created_at: float, *, app: bool = False,
          nbytes: int = 4096) -> dict[str, Any]:
    return {"point_id": f"p{seq:06d}", "item_id": item_id, "seq": seq, "created_at": created_at,
            "consistency": "app" if app else "crash", "kind": "initial" if seq == 1 else "delta",
            "cycle_id": f"c{seq}", "base_point_id": None if seq == 1 else f"p{seq - 1:06d}",
            "disk_sizes": {"disk0": 1 << 20}, "bytes_written": nbytes, "bytes_stored": nbytes // 2,
            "meta": {}}


class Agent:
    """A registered host as the vault sees it (certificate DER, host id, site)."""

    def __init__(self, h: Harness, host_id: str, site: str, name: str, cert_pem: bytes) -> None:
        self.h, self.host_id, self.site, self.name = h, host_id, site, name
        self.cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        # like a real store-serving agent: the last access list received, its digest sent back
        self.store_url: str | None = None
        self.store_acl: dict[str, Any] | None = None
        self.last_vms: list[dict[str, Any]] = []
        h.agents.append(self)

    def post(self, path: str, body: Any) -> Any:
        self.h.peer = self.cert_der
        try:
            return self.h.client.post(f"/api/v1/agent{path}", json=body)
        finally:
            self.h.peer = None

    def beat(self, vms: list[dict[str, Any]] | None = None, items: list[dict[str, Any]] | None = None,
             store_url: str | None = None, held: list[str] | None = None,
             restarted: bool = False) -> dict[str, Any]:
        digest = acl_digest(self.store_acl) if self.store_acl is not None else None
        body: dict[str, Any] = {"host_name": self.name, "version": "test", "store_url": store_url,
                                "vms": vms or [], "items": items or [],
                                "store_acl_digest": digest}
        if held is not None:
            body["held"] = held
        if restarted:
            body["restarted"] = True
        r = self.post("/heartbeat", body)
        for _ in range(2):
            # like a real agent, a beat the database failed for the moment (503 busy: e.g. a
            # loaded machine stalled a transaction past PostgreSQL's idle-in-transaction
            # timeout, and nothing of it was written) is sent again
            if r.status_code != 503 or r.json().get("code") != "busy":
                break
            r = self.post("/heartbeat", body)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        self.store_url, self.last_vms = store_url, list(vms or [])
        if out.get("store_acl") is not None:
            self.store_acl = out["store_acl"]
        return out

    def result(self, command_id: str, status: str, **kw: Any) -> Any:
        return self.post(f"/commands/{command_id}/result", {"status": status, **kw})


async def _harness_peer(request: Request) -> bytes | None:
    """The harness's stand-in for the connection's certificate. One module-level function for
    every harness: FastAPI caches each dependency callable it meets (strongly, by identity), so
    a callable of each harness (a closure or bound method over it) kept every closed harness
    alive, with its vault (~15,000-35,000 objects a test: long full collections in the test
    workers)."""
    return cast("bytes | None", getattr(request.app.state, "harness_peer", None))


class Harness:
    def __init__(self, data_dir: Path, db_url: str | None = None, *,
                 routers: Sequence[APIRouter] = (), **settings: Any) -> None:
        self.clock = FakeClock(T0)
        # a long idle-in-transaction limit: this vault runs in the test's own process, which no
        # test stops; the limit's purpose (a stopped vault process must not hold the lease's
        # lock) is tested with real processes. A loaded box stalling this process for seconds
        # mid-transaction (CI: three times) is not what these tests are about
        settings.setdefault("idle_in_tx_limit_s", HARNESS_IDLE_IN_TX_S)
        self.settings = VaultSettings(data_dir=data_dir, db_url=db_url, clock=self.clock,
                                      minute_of_day=utc_minute_of_day, background=False, **settings)
        self.app = create_app(self.settings, routers=routers)
        self.vault: Vault = self.app.state.vault
        self.peer = None
        self.app.dependency_overrides[peer_cert] = _harness_peer
        self.client = TestClient(self.app, raise_server_exceptions=False)
        self.client.__enter__()
        self.admin = (data_dir / "admin.token").read_text().strip()
        self.agents: list[Agent] = []

    @property
    def peer(self) -> bytes | None:
        """The client certificate (DER) the next requests come with (None: none)."""
        return cast("bytes | None", getattr(self.app.state, "harness_peer", None))

    @peer.setter
    def peer(self, der: bytes | None) -> None:
        self.app.state.harness_peer = der

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.vault.close()

    def hdr(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, token: str | None = "admin", **kw: Any) -> Any:
        tok = self.admin if token == "admin" else token
        headers = {**self.hdr(tok), **kw.pop("headers", {})}
        return self.client.request(method, f"/api/v1{path}", headers=headers, **kw)

    def ok(self, method: str, path: str, token: str | None = "admin", **kw: Any) -> Any:
        r = self.call(method, path, token, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def entries(self, path: str, token: str | None = "admin") -> list[dict[str, Any]]:
        """Every entry of a list endpoint (``{"entries", "total", "next_cursor"}``), all pages;
        checks that ``total`` counts them."""
        out: list[dict[str, Any]] = []
        sep = "&" if "?" in path else "?"
        page = self.ok("GET", path, token)
        total = page["total"]
        out.extend(page["entries"])
        while page["next_cursor"]:
            page = self.ok("GET", f"{path}{sep}cursor={page['next_cursor']}", token)
            out.extend(page["entries"])
        if "limit=" not in path:
            assert len(out) == total, (path, len(out), total)
        return out

    def token(self, role: str, name: str | None = None) -> str:
        return str(self.ok("POST", "/tokens", json={"name": name or f"t-{role}", "role": role})["token"])

    def site(self, name: str) -> None:
        self.ok("POST", "/sites", json={"name": name, "description": ""})

    def register(self, site: str, host_name: str) -> Agent:
        key = self.ok("POST", f"/sites/{site}/registration-keys", json={"ttl_s": 600})["key"]
        _key_pem, csr = make_key_and_csr(host_name)
        r = self.client.post("/api/v1/agent/register",
                             json={"key": key, "host_name": host_name, "csr_pem": csr.decode()})
        assert r.status_code == 201, r.text
        body = r.json()
        return Agent(self, body["host_id"], site, host_name, body["cert_pem"].encode())

    def set_store(self, site: str, host_name: str | None, *, force: bool = False) -> Any:
        """Give ``site``'s store role to ``host_name`` (admin API), as ``drsite sites
        set-store`` does; the response."""
        return self.call("PUT", f"/sites/{site}/store-host",
                         json={"host": host_name, "force": force})

    def tick(self) -> None:
        self.vault.tick()

    def store_beat(self) -> None:
        """Every store-serving agent beats twice (it receives its store's new access list, then
        confirms it), as real ones do within two heartbeat intervals. A job sends ``protect``
        to a site-store item's source only once its store confirmed the item's grant."""
        for _ in range(2):
            for a in self.agents:
                if a.store_url is not None:
                    a.beat(vms=a.last_vms, store_url=a.store_url)

    def job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.ok("GET", f"/jobs/{job_id}")
        return out
