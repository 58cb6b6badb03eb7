"""Test helpers for the site store: a throw-away CA with agent certificates, and a real store
server on 127.0.0.1 in a background thread. Used by the conformance suite and the integration
tests; never by production paths."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from drsite.pki import CertIdentity, CertificateAuthority, make_key_and_csr
from drsite.sitestore.acl import Authorizer, Op
from drsite.sitestore.audit import StoreAuditLog
from drsite.sitestore.client import SiteObjectStore
from drsite.sitestore.server import make_store_app
from drsite.sitestore.syncoverlay import OverlayServer
from drsite.store.auth import PointAuth
from drsite.store.contract import ObjectStore
from drsite.store.local import LocalObjectStore
from drsite.store.wrappers import ForwardingStore
from drsite.tlsutil import ServerHandle, client_context, start_in_thread


class _Recorder:
    """ASGI middleware noting ``(method, path, query)`` of every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[tuple[str, str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests.append((scope["method"], scope["path"],
                                  scope.get("query_string", b"").decode("latin-1")))
        await self.app(scope, receive, send)


def issue_agent_cert(ca: CertificateAuthority, directory: Path, host_id: str, *,
                     site: str = "site-a", days: int = 365) -> tuple[Path, Path]:
    """Issue an agent certificate the way registration does (key + CSR → ``sign_csr``) and
    write ``<host_id>.pem`` / ``<host_id>.key`` (0600) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key_pem, csr = make_key_and_csr(host_id)
    cert_pem = ca.sign_csr(csr, common_name=host_id, site=site, days=days)
    cert, key = directory / f"{host_id}.pem", directory / f"{host_id}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    os.chmod(key, 0o600)
    return cert, key


@dataclass(frozen=True)
class TestCerts:
    """A CA and two agent certificates: the secondary (serves the store) and the primary."""

    __test__ = False  # not a pytest class

    ca: CertificateAuthority
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_certs(directory: Path) -> TestCerts:
    ca = CertificateAuthority.load_or_create(directory / "ca")
    scert, skey = issue_agent_cert(ca, directory / "certs", "host-secondary", site="site-b")
    ccert, ckey = issue_agent_cert(ca, directory / "certs", "host-primary", site="site-a")
    return TestCerts(ca, ca.cert_path, scert, skey, ccert, ckey)


class OpenAcl:
    """An :class:`~drsite.sitestore.acl.Authorizer` allowing every identified caller
    everything, immutability rules off: for the object-store conformance suite (which tests the
    ``ObjectStore`` contract, overwrites and deletes of any key included) and tests of the
    replication engine over a site store. Never used by production paths."""

    immutable = False

    def identify(self, ident: CertIdentity) -> None:
        return None

    def readable(self, ident: CertIdentity, item_id: str | None) -> bool:
        return True

    def authorize(self, ident: CertIdentity, op: Op, item_id: str | None, what: str) -> None:
        return None

    def point_auth(self, item_id: str) -> PointAuth | None:
        return None


class RunningSiteStore:
    """A store server over ``backend`` (default: a ``LocalObjectStore`` in ``directory``) with
    replicas in ``directory/replicas``, mTLS required, on a free port of 127.0.0.1.
    ``requests`` lists ``(method, path, query)`` of every request the server received.
    ``acl``: who may do what (default :class:`OpenAcl`); ``audit`` collects deletes and
    overwrites."""

    def __init__(self, directory: Path, backend: ObjectStore | None = None,
                 certs: TestCerts | None = None, acl: Authorizer | None = None,
                 overlays: OverlayServer | None = None) -> None:
        self.directory = directory
        self.certs = certs or make_test_certs(directory / "pki")
        self.backend: ObjectStore = backend if backend is not None else \
            LocalObjectStore(directory / "store")
        self.replicas = directory / "replicas"
        self.audit = StoreAuditLog()
        self._recorder = _Recorder(make_store_app(self.backend, self.replicas,
                                                  acl=acl if acl is not None else OpenAcl(),
                                                  audit=self.audit, overlays=overlays))
        self.handle: ServerHandle = start_in_thread(
            self._recorder, host="127.0.0.1", port=0, certfile=self.certs.server_cert,
            keyfile=self.certs.server_key, cafile=self.certs.ca_file, client_cert="required")

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        return self._recorder.requests

    def client(self, certfile: Path | None = None, keyfile: Path | None = None, *,
               use_client_cert: bool = True, timeout: float = 10.0) -> SiteObjectStore:
        """A client trusting the test CA, presenting the primary's certificate (or the given
        one, or none)."""
        if use_client_cert:
            certfile = certfile or self.certs.client_cert
            keyfile = keyfile or self.certs.client_key
        ctx = client_context(self.certs.ca_file, certfile if use_client_cert else None,
                             keyfile if use_client_cert else None)
        return SiteObjectStore(self.url, ctx, timeout=timeout)

    def stop(self) -> None:
        self.handle.stop()


class _SwappableStore(ForwardingStore):
    """Delegates to ``inner``, which a test may replace (one server, a fresh store per test)."""


_shared: tuple[RunningSiteStore, _SwappableStore] | None = None
_shared_lock = threading.Lock()


def shared_site_store(tmp: Path) -> SiteObjectStore:
    """A client of one process-wide store server whose backend is replaced by a fresh
    ``LocalObjectStore(tmp / "site-store")`` at each call (so every conformance test starts
    empty without paying for a new CA and server). Stopped at interpreter exit."""
    global _shared
    with _shared_lock:
        if _shared is None:
            root = Path(tempfile.mkdtemp(prefix="drsite-site-store-"))
            swap = _SwappableStore(LocalObjectStore(root / "store"))
            server = RunningSiteStore(root, backend=swap)
            _shared = (server, swap)

            def cleanup() -> None:
                server.stop()
                shutil.rmtree(root, ignore_errors=True)

            atexit.register(cleanup)
        server, swap = _shared
        swap.inner = LocalObjectStore(tmp / "site-store")
        return server.client()
