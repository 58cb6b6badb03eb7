"""Fuzzing the store server's routes (issue 11): bad keys, ranges, query parameters and bodies,
sent raw over real mTLS by an authorised writer and by a host of another site. Whatever
arrives, the server answers with a drsite error of the 4xx family (never a 500, never a hang),
and the committed point's objects are never changed. Bounded: a few hundred examples."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drsite.core.model import Consistency
from drsite.pki import cert_identity
from drsite.sitestore.acl import StoreAcl
from drsite.sitestore.testing import RunningSiteStore, issue_agent_cert, make_test_certs
from drsite.store.auth import PointAuth
from drsite.store.repository import Repository
from drsite.tlsutil import client_context

MiB = 1 << 20
KEY = os.urandom(32)


class Fuzz:
    def __init__(self, tmp: Path) -> None:
        certs = make_test_certs(tmp / "pki")
        other = issue_agent_cert(certs.ca, tmp / "pki" / "certs", "host-other", site="site-c")

        def fp(p: Path) -> dict[str, str]:
            i = cert_identity(p.read_bytes())
            return {"fingerprint": i.fingerprint, "serial": f"{i.serial:x}"}

        acl = StoreAcl(None)
        acl.update({"format": 1, "store_host": "host-secondary",
                    "hosts": {"host-secondary": fp(certs.server_cert),
                              "host-primary": fp(certs.client_cert), "host-other": fp(other[0])},
                    "items": {"item-a": {"writer": "host-primary", "readers": ["host-primary"],
                                         "point_key": base64.b64encode(KEY).decode()}},
                    "revoked": {}})
        self.site = RunningSiteStore(tmp / "site", certs=certs, acl=acl)
        with self.site.client() as c:
            repo = Repository(c, "item-a", auth=PointAuth("item-a", KEY))
            w = repo.begin("c1", base=None, disk_sizes={"d0": 2 * MiB}, kind="initial")
            w.write("d0", 0, b"\x05" * MiB)
            self.point = w.commit(created_at=1.0, consistency=Consistency.CRASH).point_id
            repo.close()
        self.committed = {k: self.site.backend.get(k)
                          for k in self.site.backend.list("items/item-a/")
                          if "/staging/" not in k and not k.endswith("/seq")}
        self.clients = {
            "writer": httpx.Client(verify=client_context(certs.ca_file, certs.client_cert,
                                                         certs.client_key), timeout=10),
            "other": httpx.Client(verify=client_context(certs.ca_file, *other), timeout=10)}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.site.stop()


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    f = Fuzz(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.close()


SEGMENT = st.one_of(
    st.sampled_from(["items", "item-a", "item-b", "points", "packs", "maps", "staging", "seq",
                     "generation", "quarantine", "c1", "..", ".", "", "%2e%2e", "%2F", "%00",
                     "a b", "\x7f", "ü", "p000000000001"]),
    st.text(min_size=0, max_size=12))
KEYS = st.lists(SEGMENT, min_size=0, max_size=5).map("/".join)
RANGES = st.one_of(st.none(), st.text(max_size=30),
                   st.builds(lambda a, b: f"bytes={a}-{b}",
                             st.integers(0, 1 << 64), st.integers(0, 1 << 64)))
QUERIES = st.dictionaries(st.sampled_from(["overwrite", "prefix", "format", "disk", "block",
                                           "from_store"]),
                          st.text(max_size=10), max_size=3)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(who=st.sampled_from(["writer", "other"]),
       method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"]),
       route=st.sampled_from(["/store/v1/objects/", "/store/v1/list", "/replica/v1/items/"]),
       key=KEYS, rng=RANGES, query=QUERIES, body=st.binary(max_size=512),
       known=st.booleans())
def test_fuzz_store_routes(fuzz: Fuzz, who: str, method: str, route: str, key: str,
                           rng: str | None, query: dict[str, str], body: bytes,
                           known: bool) -> None:
    if known and fuzz.committed:   # aim at the committed objects half of the time
        key = sorted(fuzz.committed)[len(key) % len(fuzz.committed)]
    if route == "/replica/v1/items/":
        key = key.split("/")[0] + ("/catch-up" if len(key) % 2 else "/digests")
    url = fuzz.site.url + route + (key if route != "/store/v1/list" else "")
    headers = {"Range": rng} if rng is not None else {}
    try:
        headers = dict(headers)
        r = fuzz.clients[who].request(method, url, params=query, headers=headers,
                                      content=body if method in ("PUT", "POST", "PATCH") else None)
    except (httpx.InvalidURL, UnicodeEncodeError, httpx.LocalProtocolError):
        return  # the client itself refused to send it
    assert r.status_code < 500, (method, url, r.status_code, r.text[:300])
    if r.status_code >= 400 and method != "HEAD" and r.content:
        err = r.json()
        assert isinstance(err.get("code"), str) and err.get("message"), err
    if who == "other" and "item-a" in url and method in ("GET", "PUT", "DELETE", "POST"):
        assert r.status_code in (400, 403, 404, 405), (method, url, r.status_code)
    for k, v in fuzz.committed.items():
        assert fuzz.site.backend.get(k) == v, k
