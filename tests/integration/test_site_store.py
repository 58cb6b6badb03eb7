"""The remote site store over real mTLS on 127.0.0.1: who is refused, what the server itself
refuses, error mapping, and a replication (initial, delta, resync) through it end to end.

The object-store conformance suite also runs through a real server: see the ``site`` backend
of ``tests/contract/test_store_conformance.py``.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from drsite.core.clock import FakeClock
from drsite.core.errors import (
    AuthError,
    CorruptData,
    InvalidInput,
    NetworkError,
    NotFound,
    ObjectExists,
    ObjectNotFound,
)
from drsite.core.model import DiskSpec, VmSpec
from drsite.core.retention import RetentionRule
from drsite.hypervisors.testing.memory import MemoryHypervisor
from drsite.pki import CertificateAuthority, cert_identity
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.report import ItemState
from drsite.replication.target import LocalTarget
from drsite.sitestore import SiteObjectStore, SiteTarget, make_store_app
from drsite.sitestore.testing import (
    OpenAcl,
    RunningSiteStore,
    issue_agent_cert,
    make_test_certs,
)
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.tlsutil import client_context, peer_certificate, start_in_thread

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def site(tmp_path: Path) -> Iterator[RunningSiteStore]:
    srv = RunningSiteStore(tmp_path / "site")
    yield srv
    srv.stop()


@pytest.fixture
def client(site: RunningSiteStore) -> Iterator[SiteObjectStore]:
    c = site.client()
    yield c
    c.close()


# --------------------------------------------------------------------------- basics

def test_roundtrip_large_pack_and_ranges(site: RunningSiteStore, client: SiteObjectStore) -> None:
    data = np.random.default_rng(1).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes()
    client.put("items/i/packs/c/p1", data)
    assert site.backend.get("items/i/packs/c/p1") == data  # landed on the server's store
    assert client.get("items/i/packs/c/p1") == data
    assert client.size("items/i/packs/c/p1") == 16 * MiB
    assert client.get_range("items/i/packs/c/p1", 5 * MiB + 3, 1000) == data[5 * MiB + 3:5 * MiB + 1003]
    assert client.get_range("items/i/packs/c/p1", 16 * MiB - 10, 100) == data[-10:]
    # a huge range is clamped on the server, not used to size a buffer
    assert client.get_range("items/i/packs/c/p1", 16 * MiB - 10, 1 << 50) == data[-10:]
    assert client.get_range("items/i/packs/c/p1", 17 * MiB, 1 << 50) == b""
    with pytest.raises(ObjectExists):
        client.put("items/i/packs/c/p1", b"other")
    assert list(client.list("items/i/")) == ["items/i/packs/c/p1"]


def test_identity_reaches_the_app(tmp_path: Path) -> None:
    """``peer_certificate`` gives the verified client certificate, per connection; None when
    the client sent none (server with client_cert="optional")."""
    certs = make_test_certs(tmp_path)

    async def who(request: Request) -> JSONResponse:
        der = peer_certificate(request)
        return JSONResponse({"cn": cert_identity(der).common_name if der else None})

    app = Starlette(routes=[Route("/who", who)])
    h = start_in_thread(app, host="127.0.0.1", port=0, certfile=certs.server_cert,
                        keyfile=certs.server_key, cafile=certs.ca_file, client_cert="optional")
    try:
        assert h.port > 0 and h.url == f"https://127.0.0.1:{h.port}"
        with_cert = client_context(certs.ca_file, certs.client_cert, certs.client_key)
        without = client_context(certs.ca_file)
        with httpx.Client(verify=with_cert) as c:
            assert c.get(h.url + "/who").json() == {"cn": "host-primary"}
            assert c.get(h.url + "/who").json() == {"cn": "host-primary"}  # keep-alive reuse
        with httpx.Client(verify=without) as c:
            assert c.get(h.url + "/who").json() == {"cn": None}
    finally:
        h.stop()
    h.stop()  # idempotent
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=without) as c:
        c.get(h.url + "/who")


# --------------------------------------------------------------------------- who is refused

def _assert_nothing_written(site: RunningSiteStore) -> None:
    assert list(site.backend.list()) == []
    assert not [r for r in site.requests if r[0] in ("PUT", "DELETE")]


def test_no_client_cert_refused(site: RunningSiteStore) -> None:
    with site.client(use_client_cert=False) as c, pytest.raises((AuthError, NetworkError)) as ei:
        c.put("k", b"x")
    # TLS 1.3: the server's certificate_required alert is read back as a refusal (permanent)
    assert isinstance(ei.value, AuthError), ei.value
    _assert_nothing_written(site)


def test_cert_from_another_ca_refused(site: RunningSiteStore, tmp_path: Path) -> None:
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    cert, key = issue_agent_cert(other, tmp_path / "other", "host-primary")
    with site.client(cert, key) as c, pytest.raises(AuthError, match="refused"):
        c.put("k", b"x")
    _assert_nothing_written(site)


def test_expired_cert_refused(site: RunningSiteStore, tmp_path: Path) -> None:
    cert, key = issue_agent_cert(site.certs.ca, tmp_path / "old", "host-old", days=-1)
    with site.client(cert, key) as c, pytest.raises(AuthError, match="refused") as ei:
        c.put("k", b"x")
    assert not ei.value.transient
    _assert_nothing_written(site)


def test_server_cert_from_another_ca_refused_by_client(tmp_path: Path) -> None:
    ours = make_test_certs(tmp_path / "ours")
    rogue = RunningSiteStore(tmp_path / "rogue", certs=make_test_certs(tmp_path / "theirs"))
    try:
        ctx = client_context(ours.ca_file, ours.client_cert, ours.client_key)
        with SiteObjectStore(rogue.url, ctx) as c, pytest.raises(AuthError, match="not trusted") as ei:
            c.put("k", b"x")
        assert "vault's CA" in ei.value.hint
        assert list(rogue.backend.list()) == []
        assert rogue.requests == []  # not a single request left the client
    finally:
        rogue.stop()


def test_server_cert_for_another_address_refused(site: RunningSiteStore, tmp_path: Path) -> None:
    cert_pem, key_pem = site.certs.ca.issue_server_cert(hostnames=["elsewhere.example"], ips=[])
    (tmp_path / "s.pem").write_bytes(cert_pem)
    (tmp_path / "s.key").write_bytes(key_pem)
    app = make_store_app(site.backend, tmp_path / "replicas", acl=OpenAcl())
    h = start_in_thread(app, host="127.0.0.1", port=0, certfile=tmp_path / "s.pem",
                        keyfile=tmp_path / "s.key", cafile=site.certs.ca_file,
                        client_cert="required")
    try:
        ctx = client_context(site.certs.ca_file, site.certs.client_cert, site.certs.client_key)
        with SiteObjectStore(h.url, ctx) as c, pytest.raises(AuthError, match="not trusted"):
            c.exists("k")
    finally:
        h.stop()


def test_server_refuses_requests_without_cert_even_if_tls_lets_them_in(site: RunningSiteStore,
                                                                       tmp_path: Path) -> None:
    """Defence in depth: the app itself answers 401 when no verified certificate reached it."""
    app = make_store_app(site.backend, tmp_path / "replicas", acl=OpenAcl())
    h = start_in_thread(app, host="127.0.0.1", port=0, certfile=site.certs.server_cert,
                        keyfile=site.certs.server_key, cafile=site.certs.ca_file,
                        client_cert="optional")
    try:
        anon = SiteObjectStore(h.url, client_context(site.certs.ca_file))
        with pytest.raises(AuthError, match="client certificate"):
            anon.put("k", b"x")
        with pytest.raises(AuthError):
            anon.catch_up("item1")
        anon.close()
        assert list(site.backend.list()) == []
        with SiteObjectStore(h.url, client_context(site.certs.ca_file, site.certs.client_cert,
                                                   site.certs.client_key)) as c:
            c.put("k", b"x")
        assert site.backend.get("k") == b"x"
    finally:
        h.stop()


def test_server_down_is_transient(tmp_path: Path) -> None:
    srv = RunningSiteStore(tmp_path)
    c = srv.client(timeout=2.0)
    c.put("k", b"v")
    srv.stop()
    with pytest.raises(NetworkError) as ei:
        c.get("k")
    assert ei.value.transient
    c.close()


# --------------------------------------------------------------------------- bad input

BAD_RAW_PATHS = [
    "/store/v1/objects/..%2Fx", "/store/v1/objects/%2e%2e/x", "/store/v1/objects/a%2F..%2Fb",
    "/store/v1/objects/a/%2E%2E/%2E%2E/etc", "/store/v1/objects/a%00b", "/store/v1/objects/x%0A",
    "/store/v1/objects/", "/store/v1/objects/a%20b", "/store/v1/objects/.hidden",
]


def test_bad_keys_refused_by_client_before_sending(site: RunningSiteStore,
                                                   client: SiteObjectStore) -> None:
    for bad in ("../x", "a/../b", "/abs", "a//b", "a\x00b"):
        with pytest.raises(InvalidInput):
            client.put(bad, b"x")
        with pytest.raises(InvalidInput):
            client.get(bad)
    with pytest.raises(InvalidInput):
        list(client.list("../"))
    assert site.requests == []


@pytest.mark.parametrize("path", BAD_RAW_PATHS)
def test_bad_keys_refused_by_server(site: RunningSiteStore, tmp_path: Path, path: str) -> None:
    ctx = client_context(site.certs.ca_file, site.certs.client_cert, site.certs.client_key)
    with httpx.Client(verify=ctx, base_url=site.url) as raw:
        for method in ("PUT", "GET", "HEAD", "DELETE"):
            r = raw.request(method, path, content=b"evil" if method == "PUT" else None)
            assert r.status_code == 400, (method, path, r.status_code, r.text)
            if method != "HEAD":
                assert r.json()["code"] == "invalid_input"
    assert list(site.backend.list()) == []
    assert sorted(p.name for p in site.directory.iterdir()) == ["pki", "store"]


def _raw_request(site: RunningSiteStore, head: str) -> tuple[int, bytes]:
    """Send ``head`` (request line + headers, no body) as is over mTLS; (status, response)."""
    ctx = client_context(site.certs.ca_file, site.certs.client_cert, site.certs.client_key)
    with socket.create_connection(("127.0.0.1", site.handle.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(head.encode("latin-1"))
        out = b""
        while True:
            chunk = tls.recv(65536)
            out += chunk
            head_, sep, body = out.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length: (\d+)", head_)
            if not chunk or (sep and m and len(body) >= int(m.group(1))):
                break
    return int(out.split(b" ", 2)[1]), out


def test_unnormalised_dot_segments_refused_by_server(site: RunningSiteStore) -> None:
    """A client that does not normalise ``..`` (httpx would) still cannot escape."""
    status, resp = _raw_request(site, "PUT /store/v1/objects/../../escape HTTP/1.1\r\n"
                                      "Host: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert status == 400 and b"invalid_input" in resp, resp
    assert not (site.directory / "escape").exists()
    assert list(site.backend.list()) == []


def test_oversized_body_refused_before_reading(site: RunningSiteStore) -> None:
    status, resp = _raw_request(site, f"PUT /store/v1/objects/big HTTP/1.1\r\nHost: x\r\n"
                                      f"Content-Length: {1 << 40}\r\n\r\n")
    assert status == 400 and b"invalid_input" in resp, resp
    assert not site.backend.exists("big")


def test_bodies_of_every_size_land_exactly_as_sent(site: RunningSiteStore,
                                                    client: SiteObjectStore,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Bodies of other sizes after each other and at once, a body cut short (nothing stored,
    the next put unharmed), a chunked body (no Content-Length) and an empty one each land
    exactly as sent (a guard for any reuse of body buffers: bench/site_put.py measured one)."""
    rng = np.random.default_rng(7)
    blobs = {f"items/i/packs/c/p{i}": rng.integers(0, 256, size, dtype=np.uint8).tobytes()
             for i, size in enumerate([8 * MiB, 1 * MiB + 5, 8 * MiB - 1, 3, 0, 8 * MiB])}
    for k, v in blobs.items():            # one after the other: a big buffer lent to a small body
        client.put(k, v)
    errors: list[BaseException] = []

    def put(k: str, v: bytes) -> None:
        try:
            client.put(k, v)
        except BaseException as e:       # pragma: no cover - reported below
            errors.append(e)

    again = {k.replace("/c/", "/d/"): v[::-1] for k, v in blobs.items()}
    ts = [threading.Thread(target=put, args=kv) for kv in again.items()]
    for th in ts:
        th.start()
    for th in ts:
        th.join(60)
    assert not errors
    # a body cut short (the connection closes after half of it): nothing is stored
    ctx = client_context(site.certs.ca_file, site.certs.client_cert, site.certs.client_key)
    with socket.create_connection(("127.0.0.1", site.handle.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"PUT /store/v1/objects/items/i/packs/c/cut HTTP/1.1\r\nHost: x\r\n"
                    f"Content-Length: {4 * MiB}\r\n\r\n".encode() + b"\xee" * (2 * MiB))
    # a chunked body (no Content-Length) is read as before
    with httpx.Client(verify=ctx, base_url=site.url) as raw_client:
        r = raw_client.put("/store/v1/objects/items/i/packs/c/chunked",
                           content=iter([b"a" * 70000, b"b" * 5]))
        assert r.status_code == 201, r.text
    client.put("items/i/packs/c/after", blobs["items/i/packs/c/p0"][::-1])
    assert not site.backend.exists("items/i/packs/c/cut")   # an incomplete body is never put
    # a client that went away is no internal error of the server (it was: a traceback)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert site.backend.get("items/i/packs/c/chunked") == b"a" * 70000 + b"b" * 5
    assert site.backend.get("items/i/packs/c/after") == blobs["items/i/packs/c/p0"][::-1]
    for k, v in {**blobs, **again}.items():
        assert site.backend.get(k) == v, k


def test_bad_parameters_refused_by_server(site: RunningSiteStore) -> None:
    ctx = client_context(site.certs.ca_file, site.certs.client_cert, site.certs.client_key)
    with httpx.Client(verify=ctx, base_url=site.url) as raw:
        for method, path, params, headers in [
            ("GET", "/store/v1/list", {"prefix": "../"}, {}),
            ("GET", "/store/v1/list", {"prefix": "a", "format": "xml"}, {}),
            ("PUT", "/store/v1/objects/k", {"overwrite": "yes"}, {}),
            ("GET", "/store/v1/objects/k", {}, {"Range": "bytes=5-"}),
            ("GET", "/store/v1/objects/k", {}, {"Range": "bytes=9-3"}),
            ("POST", "/replica/v1/items/a%20b/catch-up", {}, {}),
            ("POST", "/replica/v1/items/..x/catch-up", {}, {}),
            ("GET", "/replica/v1/items/item1/digests", {"disk": "../d0"}, {}),
            ("GET", "/replica/v1/items/item1/digests", {"disk": "d0", "block": "0"}, {}),
            ("GET", "/replica/v1/items/item1/digests", {"disk": "d0", "from_store": "2"}, {}),
        ]:
            r = raw.request(method, path, params=params, headers=headers)
            assert r.status_code == 400, (method, path, params, r.text)
            assert r.json()["code"] == "invalid_input"
    assert list(site.backend.list()) == []


def test_errors_map_back_to_their_classes(site: RunningSiteStore, client: SiteObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        client.get("missing")
    with pytest.raises(ObjectNotFound):
        client.size("missing")
    with pytest.raises(ObjectNotFound):
        client.get_range("missing", 0, 0)
    with pytest.raises(NotFound):
        client.digests("item1", "d0", from_store=False)  # no committed point
    assert client.catch_up("item1") == []


# --------------------------------------------------------------------------- replication end to end

class _Env:
    def __init__(self, tmp: Path, site: RunningSiteStore, *,
                 background_catch_up: bool = False,
                 settings: ReplicationSettings | None = None) -> None:
        self.tmp = tmp
        self.site = site
        self.clock = FakeClock()
        self.hv = MemoryHypervisor(self.clock)
        self.vm = self.hv.create_blank(VmSpec(name="vm1", disks=(DiskSpec("d0", 2 * MiB),
                                                                  DiskSpec("d1", 2 * MiB))))
        self.rng = np.random.default_rng(3)
        self.store = site.client()
        self.target = SiteTarget(self.store, "item1", segment_size=1 * MiB, pack_target=256 * KiB,
                                 background_catch_up=background_catch_up)
        self.item = ItemReplicator(
            item_id="item1", vm_id=self.vm.vm_id, driver=self.hv, target=self.target,
            state_dir=tmp / "state", clock=self.clock,
            settings=settings or ReplicationSettings(
                frequency_s=30, app_consistent_every_s=None, resync_window=ALWAYS,
                io_size=256 * KiB, save_every_bytes=256 * KiB))

    def write(self, disk: str, off: int, n: int) -> None:
        self.hv.write(self.vm.vm_id, disk, off,
                      self.rng.integers(0, 256, n, dtype=np.uint8).tobytes())

    def source(self) -> dict[str, bytes]:
        return {d.disk_id: self.hv.disk_bytes(self.vm.vm_id, d.disk_id) for d in self.vm.disks}

    def server_repo(self) -> Repository:
        return Repository(self.site.backend, "item1")

    def point_bytes(self, point_id: str) -> dict[str, bytes]:
        out = {}
        repo = self.server_repo()
        for d in self.vm.disks:
            r = repo.reader(point_id, d.disk_id)
            buf = bytearray(r.size)
            r.readinto(0, memoryview(buf))
            out[d.disk_id] = bytes(buf)
        return out

    def hydrator(self) -> ReplicaHydrator:
        return ReplicaHydrator(self.server_repo(), self.site.replicas / "item1")

    def replica_bytes(self) -> dict[str, bytes]:
        h = self.hydrator()
        return {d.disk_id: h.disk_path(d.disk_id).read_bytes().ljust(d.size, b"\0")
                for d in self.vm.disks}

    def digest_calls(self) -> list[str]:
        return [q for m, p, q in self.site.requests if p.endswith("/digests")]


def test_replication_over_the_site_store(site: RunningSiteStore, tmp_path: Path) -> None:
    env = _Env(tmp_path, site)
    env.write("d0", 0, 300 * KiB)
    env.write("d1", 1 * MiB + 123, 5000)
    p0 = env.item.run_initial()
    assert p0.kind == "initial"
    assert env.point_bytes(p0.point_id) == env.source()
    # the server hydrated its replica after the commit (catch-up call)
    assert env.hydrator().state() == (p0.point_id, None)
    assert env.replica_bytes() == env.source()

    env.write("d0", 100 * KiB + 7, 4096)
    env.write("d1", 12345, 1)
    p1 = env.item.run_cycle()
    assert p1.kind == "delta" and p1.base_point_id == p0.point_id
    assert env.point_bytes(p1.point_id) == env.source()
    assert env.hydrator().state() == (p1.point_id, None)
    assert env.hydrator().verify()
    assert env.replica_bytes() == env.source()
    catch_ups = [r for r in site.requests if r[1] == "/replica/v1/items/item1/catch-up"]
    assert len(catch_ups) == 2

    # resync: the target's digests come from the server (from its replica: it holds the latest)
    env.hv.lose_tracking(env.vm.vm_id, "log lost in host crash")
    env.write("d0", 128 * KiB + 10, 100)  # inside the data written above: a full 64 KiB block
    env.item.step()
    assert env.item.report.state is ItemState.RESYNC_REQUIRED
    before = env.item.report.bytes_sent
    env.item.step()
    rep = env.item.report
    assert rep.state is ItemState.PROTECTED and rep.resyncs == 1, rep.last_error
    assert rep.bytes_sent - before == 64 * KiB  # only the one differing block travelled
    calls = env.digest_calls()
    assert {c.split("disk=")[1].split("&")[0] for c in calls} == {"d0", "d1"}
    assert all("from_store=0" in c for c in calls)
    latest = env.server_repo().latest()
    assert latest is not None and latest.kind == "resync"
    assert env.point_bytes(latest.point_id) == env.source()
    assert env.replica_bytes() == env.source()

    # a resync against the store itself (after damage) asks the server with from_store=1
    env.item.request_resync("by hand, from the store")
    env.item.rec.resync_from_store = True
    env.item.step()
    assert env.item.report.resyncs == 2
    assert [c for c in env.digest_calls() if "from_store=1" in c]
    env.store.close()


def test_rehoming_through_the_site_store(site: RunningSiteStore, tmp_path: Path) -> None:
    """Re-homing (``store/compaction.py``) through a remote store: planning asks the server
    for pack sizes, the base point is read back over mTLS, the re-homed bytes land in the
    cycle's packs on the recovery site. Every point and the server's replica equal the source,
    and GC there frees the sparse packs once the older points are gone."""
    env = _Env(tmp_path, site, settings=ReplicationSettings(
        frequency_s=30, app_consistent_every_s=None, resync_window=ALWAYS, io_size=256 * KiB,
        save_every_bytes=256 * KiB, rehome_share=0.5, rehome_every_s=0.0,
        retention=RetentionRule(retention_s=120.0, keep_all_s=120.0)))
    for d in env.vm.disks:
        env.write(d.disk_id, 0, d.size)
    p0 = env.item.run_initial()
    repo = env.server_repo()
    initial_packs = set(site.backend.list(f"items/item1/packs/{p0.cycle_id}/"))
    assert initial_packs
    rehomed = 0
    for _ in range(8):
        for d in env.vm.disks:   # 30 % of each disk in scattered 4 KiB blocks
            n = int(0.3 * d.size // 4096)
            for off in (env.rng.choice(d.size // 4096, n, replace=False) * 4096).tolist():
                env.write(d.disk_id, off, 4096)
        p = env.item.run_cycle()
        assert env.point_bytes(p.point_id) == env.source()
        assert env.hydrator().state() == (p.point_id, None)
        rehomed += int(p.meta.get("rehomed") or 0)
        for old in repo.points()[:-2]:
            repo.delete_point(old.point_id)
        repo.gc()
    assert rehomed > 0
    # 0.7 ** 8 of the initial copy is still live: without re-homing its packs would all stay
    assert not initial_packs & set(site.backend.list("items/item1/packs/"))
    assert env.replica_bytes() == env.source()
    # planning asked the server for the sizes of packs (and nothing else needs a HEAD here)
    assert any(m == "HEAD" and "/packs/" in path for m, path, _ in site.requests)
    env.store.close()


def test_remote_digests_equal_local_and_carry_bad_blocks(site: RunningSiteStore,
                                                         tmp_path: Path) -> None:
    env = _Env(tmp_path, site)
    env.write("d0", 0, 1 * MiB)
    env.write("d1", 700 * KiB, 300 * KiB)
    env.item.run_initial()
    local = LocalTarget(env.server_repo(), env.hydrator())
    for disk in ("d0", "d1"):
        for from_store in (False, True):
            remote = env.target.digests(disk, from_store=from_store)
            mine = local.digests(disk, from_store=from_store)
            assert np.array_equal(remote.digests, mine.digests)
            assert np.array_equal(remote.bad, mine.bad) and not remote.bad.any()
    # damage a pack on the server: a from-store digest marks the blocks bad (so they are re-sent)
    packs = [k for k in site.backend.list("items/item1/") if "/packs/" in k]
    victim = packs[0]
    data = bytearray(site.backend.get(victim))
    data[100] ^= 0xFF
    site.backend.put(victim, bytes(data), overwrite=True)
    bad = [env.target.digests(d, from_store=True).bad for d in ("d0", "d1")]
    assert any(b.any() for b in bad)
    progress: list[int] = []
    env.target.digests("d0", from_store=False, progress=progress.append)
    assert progress and progress[0] > 0
    env.store.close()


def test_hydration_damage_comes_back_as_corrupt_data(site: RunningSiteStore,
                                                     tmp_path: Path) -> None:
    """A catch-up that finds damaged data on the server raises CorruptData (permanent) at the
    client, the class the engine's repair path (quarantine + resync from the store) expects."""
    env = _Env(tmp_path, site)
    env.write("d0", 0, 512 * KiB)
    env.item.run_initial()
    env.write("d0", 0, 512 * KiB)
    catch_up = env.target.after_commit
    env.target.after_commit = lambda point: None  # type: ignore[method-assign]
    p1 = env.item.run_cycle()
    env.target.after_commit = catch_up  # type: ignore[method-assign]
    damaged = 0
    for k in site.backend.list("items/item1/packs/"):
        if p1.cycle_id in k:
            d = bytearray(site.backend.get(k))
            d[len(d) // 3] ^= 0xFF
            site.backend.put(k, bytes(d), overwrite=True)
            damaged += 1
    assert damaged
    with pytest.raises(CorruptData) as ei:
        env.store.catch_up("item1")
    assert not ei.value.transient
    # on the wire: the codec's status for the class (500: the server's data, not the request)
    ctx = client_context(site.certs.ca_file, site.certs.client_cert, site.certs.client_key)
    with httpx.Client(verify=ctx, base_url=site.url) as raw:
        r = raw.post("/replica/v1/items/item1/catch-up")
    assert r.status_code == CorruptData.http_status == 500
    assert r.json()["code"] == "corrupt_data" and r.json()["class"] == "permanent"
    env.store.close()


def test_background_catch_up_hydrates_after_the_cycle_returns(site: RunningSiteStore,
                                                             tmp_path: Path) -> None:
    """With the agent's options the catch-up runs beside the next cycle; settled, the server's
    replica equals the source at the latest point."""
    env = _Env(tmp_path, site, background_catch_up=True)
    env.write("d0", 0, 300 * KiB)
    env.item.run_initial()
    for i in range(3):
        env.write("d0", (i * 37 + 5) * KiB, 20000)
        env.write("d1", 1 * MiB + i * 4096, 4096)
        env.item.run_cycle()
    assert env.target.settle(30)
    latest = env.server_repo().latest()
    assert latest is not None and latest.seq == 4
    assert env.hydrator().state() == (latest.point_id, None)
    assert env.hydrator().verify()
    assert env.replica_bytes() == env.source() == env.point_bytes(latest.point_id)
    calls = [r for r in site.requests if r[1] == "/replica/v1/items/item1/catch-up"]
    assert 1 <= len(calls) <= 4
    assert not env.target.busy
    env.store.close()


def test_background_catch_up_requests_coalesce(site: RunningSiteStore, tmp_path: Path) -> None:
    """Commits made while a catch-up runs cost one more call, not one each."""
    env = _Env(tmp_path, site, background_catch_up=True)
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(item_id: str) -> list[str]:
        calls.append(item_id)
        entered.set()
        assert release.wait(30)
        return []

    env.store.catch_up = slow  # type: ignore[method-assign]
    env.write("d0", 0, 4096)
    p0 = env.item.run_initial()
    assert entered.wait(30) and env.target.busy
    for _ in range(5):
        env.target.after_commit(p0)
    assert env.target.settle(0.2) is False  # still running
    release.set()
    assert env.target.settle(30)
    assert calls == ["item1", "item1"]
    assert not env.target.busy
    env.store.close()


def test_background_catch_up_damage_comes_back(site: RunningSiteStore, tmp_path: Path) -> None:
    """A background catch-up that finds damaged data: the next after_commit raises its
    CorruptData (the engine's repair path), then settle() raises the next one's."""
    env = _Env(tmp_path, site, background_catch_up=True)
    env.write("d0", 0, 512 * KiB)
    env.item.run_initial()
    assert env.target.settle(30)
    env.write("d0", 0, 512 * KiB)
    catch_up = env.target.after_commit
    env.target.after_commit = lambda point: None  # type: ignore[method-assign]
    p1 = env.item.run_cycle()
    env.target.after_commit = catch_up  # type: ignore[method-assign]
    for k in site.backend.list("items/item1/packs/"):
        if p1.cycle_id in k:
            d = bytearray(site.backend.get(k))
            d[len(d) // 3] ^= 0xFF
            site.backend.put(k, bytes(d), overwrite=True)
    env.target.after_commit(p1)      # returns at once: the call runs in the background
    deadline = time.monotonic() + 30
    while env.target.busy:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(CorruptData):
        env.target.after_commit(p1)  # raises the previous call's damage; asks again
    with pytest.raises(CorruptData) as ei:
        env.target.settle(30)
    assert not ei.value.transient
    assert env.target.settle(1)      # reported once
    env.store.close()


def test_put_sends_a_view_without_copying_it_whole(site: RunningSiteStore,
                                                   client: SiteObjectStore) -> None:
    """A put of a memoryview into a larger buffer (a pack writer's) stores exactly its bytes,
    across several body pieces, and an empty one stores an empty object."""
    buf = np.random.default_rng(5).integers(0, 256, 3 * MiB + 12345, dtype=np.uint8)
    view = memoryview(buf).cast("B")[777:777 + 2 * MiB + 999]
    client.put("items/x/packs/c/big", view)
    assert client.get("items/x/packs/c/big") == bytes(view)
    assert client.size("items/x/packs/c/big") == len(view)
    client.put("items/x/packs/c/empty", memoryview(b""))
    assert client.get("items/x/packs/c/empty") == b""


# --------------------------------------------------------------------------- serve() and SIGTERM

_SERVE = """
import logging, sys
from pathlib import Path
from drsite.store.local import LocalObjectStore
from drsite.sitestore import make_store_app
from drsite.sitestore.testing import OpenAcl
from drsite.tlsutil import serve
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
d = Path(sys.argv[1])
serve(make_store_app(LocalObjectStore(d / "store"), d / "replicas", acl=OpenAcl()),
      host="127.0.0.1", port=0,
      certfile=Path(sys.argv[2]), keyfile=Path(sys.argv[3]), cafile=Path(sys.argv[4]),
      client_cert="required")
print("returned cleanly", file=sys.stderr)
"""


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    certs = make_test_certs(tmp_path / "pki")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, str(tmp_path), str(certs.server_cert),
         str(certs.server_key), str(certs.ca_file)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        port = None
        while port is None:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            m = re.search(r"serving https://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        ctx = client_context(certs.ca_file, certs.client_cert, certs.client_key)
        with SiteObjectStore(f"https://127.0.0.1:{port}", ctx) as c:
            c.put("k", b"v")
            assert c.get("k") == b"v"
            proc.send_signal(signal.SIGTERM)
            out = proc.stderr.read()
            assert proc.wait(10) == 0, out
        assert "returned cleanly" in out
        assert "PRIVATE KEY" not in "".join(lines) + out  # nothing secret in the log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
