"""A fake vault for agent tests: the agent routes of ``docs/control-plane.md`` in memory, served
over HTTPS by :func:`drsite.tlsutil.start_in_thread` with its own CA (client certificate
optional at TLS, required per request on the heartbeat and result routes, as the real vault).

Responsible for: registration keys (one-time), signing CSRs, recording heartbeats, points and
command results, handing out queued commands (again at every heartbeat until the agent posts
a status for them — harsher than the vault, which re-sends only after a silence, so agents'
idempotency is exercised). Not responsible for: jobs, scheduling, persistence — never used by
production code.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from drsite import tlsutil
from drsite.core.errors import AuthError, Busy, Conflict, DrsiteError, InvalidInput, NotFound
from drsite.core.states import FINAL_COMMAND_STATUSES, CommandStatus
from drsite.pki import CertificateAuthority, cert_identity


@dataclass
class FakeHost:
    host_id: str
    host_name: str
    site: str
    fingerprint: str
    heartbeats: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    beat_at: float = 0.0


class FakeVault:
    """The vault's agent routes, in memory, over mTLS on 127.0.0.1."""

    __test__ = False

    def cut_clock(self) -> float:
        return time.monotonic() + self.clock_offset

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.ca = CertificateAuthority.load_or_create(self.dir / "ca")
        cert_pem, key_pem = self.ca.issue_server_cert(hostnames=["localhost"], ips=["127.0.0.1"])
        self.certfile = self.dir / "server.pem"
        self.keyfile = self.dir / "server.key"
        # the chain the server presents includes the CA (for --ca-fingerprint first contact)
        self.certfile.write_bytes(cert_pem + self.ca.ca_pem)
        self.keyfile.write_bytes(key_pem)
        self.keyfile.chmod(0o600)
        self.lock = threading.RLock()
        # the cut clock of group barriers (POST /agent/clock): this host's monotonic clock
        # shifted by ``clock_offset`` (a vault on another host)
        self.clock_id = "fake-clock"
        self.clock_offset = 0.0
        self.keys: dict[str, str] = {}            # key → site
        self.reissue_keys: dict[str, str] = {}    # key → the host whose certificate it replaces
        self.hosts: dict[str, FakeHost] = {}
        self.queue: dict[str, list[dict[str, Any]]] = {}   # host → commands without a status
        self.results: dict[str, list[dict[str, Any]]] = {}  # command → statuses posted
        self.points: dict[str, dict[str, dict[str, Any]]] = {}  # item → point id → PointInfo
        self.removed: dict[str, set[str]] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        self.heartbeat_log: list[dict[str, Any]] = []
        self.refuse_heartbeats = False
        # store authorization as the real vault does it (vault/storeacl.py): the writer and
        # point key of each item a ``protect`` was sent for; revoked host ids
        self.grants: dict[str, dict[str, str]] = {}
        self.revoked: set[str] = set()
        self._server: tlsutil.ServerHandle | None = None

    # -- operator side (tests) -----------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_path

    @property
    def ca_fingerprint(self) -> str:
        return cert_identity(self.ca.ca_pem).fingerprint

    def registration_key(self, site: str) -> str:
        key = secrets.token_urlsafe(24)
        with self.lock:
            self.keys[key] = site
        return key

    def reissue_key(self, host_id: str) -> str:
        """A one-time key that registers ``host_id`` again (a new certificate replaces its
        current one), as ``POST /hosts/{id}/reissue`` gives."""
        key = secrets.token_urlsafe(24)
        with self.lock:
            self.keys[key] = self.hosts[host_id].site
            self.reissue_keys[key] = host_id
        return key

    def send(self, host_id: str, kind: str, item_id: str | None, args: dict[str, Any] | None = None,
             command_id: str | None = None) -> str:
        """Queue a command for a host; returns its id."""
        cid = command_id or "c-" + uuid.uuid4().hex[:12]
        args = dict(args or {})
        with self.lock:
            if kind == "protect" and item_id is not None:
                grant = self.grants.setdefault(item_id, {
                    "writer": host_id, "point_key": base64.b64encode(os.urandom(32)).decode()})
                grant["writer"] = host_id
                grant["at"] = str(time.time())
                args.setdefault("point_key", grant["point_key"])
            self.queue.setdefault(host_id, []).append(
                {"command_id": cid, "kind": kind, "item_id": item_id, "args": args})
        return cid

    def status(self, command_id: str) -> dict[str, Any] | None:
        with self.lock:
            got = self.results.get(command_id)
            return dict(got[-1]) if got else None

    def final(self, command_id: str) -> dict[str, Any] | None:
        with self.lock:
            for r in reversed(self.results.get(command_id, [])):
                if r["status"] in FINAL_COMMAND_STATUSES:
                    return dict(r)
        return None

    def wait_final(self, command_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.final(command_id)
            if r is not None:
                return r
            time.sleep(0.05)
        raise TimeoutError(f"command {command_id} did not finish in {timeout} s "
                           f"(last status: {self.status(command_id)})")

    def finals(self, command_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.results.get(command_id, [])
                    if r["status"] in FINAL_COMMAND_STATUSES]

    def resend(self, host_id: str, command: dict[str, Any]) -> None:
        """Deliver a command again (as the vault does after a restart or a silence)."""
        with self.lock:
            self.queue.setdefault(host_id, []).append(dict(command))

    def host_by_site(self, site: str) -> FakeHost:
        with self.lock:
            for h in self.hosts.values():
                if h.site == site:
                    return h
        raise NotFound(f"no host in site {site}")

    def wait_heartbeat(self, host_id: str, after: int, timeout: float) -> dict[str, Any]:
        """The first heartbeat of ``host_id`` with number > ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                h = self.hosts.get(host_id)
                if h is not None and h.heartbeats > after:
                    return dict(h.last)
            time.sleep(0.05)
        raise TimeoutError(f"no heartbeat from {host_id} in {timeout} s")

    # -- serving -------------------------------------------------------------------------------

    def start(self) -> str:
        self._server = tlsutil.start_in_thread(
            self.app(), host="127.0.0.1", port=0, certfile=self.certfile, keyfile=self.keyfile,
            cafile=self.ca_file, client_cert="optional")
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    # -- routes --------------------------------------------------------------------------------

    def _host(self, request: Request) -> FakeHost:
        der = tlsutil.peer_certificate(request)
        if der is None:
            raise AuthError("a client certificate is required")
        ident = cert_identity(der)
        with self.lock:
            host = self.hosts.get(ident.common_name)
        if host is None or host.fingerprint != ident.fingerprint:
            raise AuthError("unknown host certificate")
        return host

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        expected = body.get("host_id")
        with self.lock:
            site = self.keys.get(str(body.get("key")))
            bound = self.reissue_keys.get(str(body.get("key")))
            if site is None:
                raise AuthError("registration key unknown, used or expired")
            if expected is not None and bound != expected:
                raise Conflict(f"this key does not re-register host {expected}",
                               hint="Ask an admin for a key for this host: 'drsite hosts "
                                    "reissue HOST'.")
            del self.keys[str(body.get("key"))]
            self.reissue_keys.pop(str(body.get("key")), None)
        host_id = bound or "h-" + uuid.uuid4().hex[:10]
        cert = self.ca.sign_csr(str(body["csr_pem"]).encode(), common_name=host_id, site=site)
        with self.lock:
            self.hosts[host_id] = FakeHost(host_id, str(body.get("host_name")), site,
                                           cert_identity(cert).fingerprint)
        return {"host_id": host_id, "site": site, "cert_pem": cert.decode(),
                "ca_pem": self.ca.ca_pem.decode()}

    def heartbeat(self, host: FakeHost, body: dict[str, Any]) -> dict[str, Any]:
        if self.refuse_heartbeats:
            raise _Unavailable()
        ack: dict[str, int] = {}
        with self.lock:
            host.heartbeats += 1
            host.last = body
            self.heartbeat_log.append({"host_id": host.host_id, "at": time.time(), **body})
            del self.heartbeat_log[:-200]
            for it in body.get("items", []):
                item_id = str(it["item_id"])
                self.reports[item_id] = it["report"]
                pts = self.points.setdefault(item_id, {})
                for p in it.get("new_points", []):
                    pts[p["point_id"]] = p
                for pid in it.get("removed_points", []):
                    pts.pop(pid, None)
                    self.removed.setdefault(item_id, set()).add(pid)
                ack[item_id] = max((int(p["seq"]) for p in pts.values()), default=0)
            host.beat_at = time.time()
            # like the real vault, a protect goes out once every store has its grant
            stores = [h.beat_at for h in self.hosts.values() if h.last.get("store_url")]
            synced = min(stores, default=float("inf"))
            commands = [c for c in self.queue.get(host.host_id, [])
                        if c["kind"] != "protect"
                        or float(self.grants.get(c["item_id"], {}).get("at", 0)) < synced]
            reply: dict[str, Any] = {"commands": commands, "ack": ack}
            if body.get("store_url"):
                reply["store_acl"] = self.store_acl(host.host_id)
        return reply

    def store_acl(self, store_host: str) -> dict[str, Any]:
        """The access list of ``store_host``'s store (the format of ``sitestore/acl.py``):
        every registered, non-revoked host; each protected item written by its source host."""
        with self.lock:
            live = {h.host_id: {"fingerprint": h.fingerprint, "serial": ""}
                    for h in self.hosts.values() if h.host_id not in self.revoked}
            items = {item: {"writer": g["writer"], "readers": [g["writer"], store_host],
                            "point_key": g["point_key"]}
                     for item, g in self.grants.items() if g["writer"] in live}
            revoked = sorted(self.revoked)
        return {"format": 1, "store_host": store_host, "hosts": live, "items": items,
                "revoked": {"hosts": revoked, "serials": [], "fingerprints": []}}

    def result(self, host: FakeHost, command_id: str, body: dict[str, Any]) -> None:
        status = body.get("status")
        if status not in (CommandStatus.RUNNING, *FINAL_COMMAND_STATUSES):
            raise InvalidInput(f"bad status {status!r}")
        with self.lock:
            self.results.setdefault(command_id, []).append({**body, "at": time.time()})
            q = self.queue.get(host.host_id, [])
            self.queue[host.host_id] = [c for c in q if c["command_id"] != command_id]

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.exception_handler(DrsiteError)
        async def _err(request: Request, exc: DrsiteError) -> JSONResponse:
            return JSONResponse(exc.to_dict(), status_code=exc.http_status)

        @app.exception_handler(_Unavailable)
        async def _unavail(request: Request, exc: _Unavailable) -> JSONResponse:
            down = Busy("down", hint="")
            return JSONResponse(down.to_dict(), status_code=down.http_status)

        @app.post("/api/v1/agent/register")
        async def register(request: Request) -> dict[str, Any]:
            return self.register(await request.json())

        @app.post("/api/v1/agent/heartbeat")
        async def heartbeat(request: Request) -> dict[str, Any]:
            return self.heartbeat(self._host(request), await request.json())

        @app.post("/api/v1/agent/clock")
        async def clock(request: Request) -> dict[str, Any]:
            self._host(request)
            return {"clock_id": self.clock_id, "t": self.cut_clock()}

        @app.post("/api/v1/agent/commands/{command_id}/result")
        async def result(command_id: str, request: Request) -> dict[str, Any]:
            self.result(self._host(request), command_id, await request.json())
            return {}

        return app


class _Unavailable(Exception):
    """The fake vault plays unavailable (503)."""
