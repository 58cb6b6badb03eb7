"""Authorization on a real store server (issue 11), with real mTLS and real certificates from
one CA: per-item access by the host named in the verified certificate, revoked and replaced
certificates, fail-closed before the first list, committed points immutable even for their own
writer, the audit entries of deletes/overwrites, and only authentic points hydrated."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import Forbidden, ObjectExists, PointNotAuthentic
from drsite.core.model import Consistency
from drsite.pki import cert_identity
from drsite.sitestore.acl import StoreAcl
from drsite.sitestore.client import SiteObjectStore
from drsite.sitestore.testing import RunningSiteStore, TestCerts, issue_agent_cert, make_test_certs
from drsite.store.auth import PointAuth
from drsite.store.format import canonical_json, hex_hash
from drsite.store.repository import Repository

MiB = 1 << 20
KEY_A = os.urandom(32)
KEY_B = os.urandom(32)


def fp(cert: Path) -> dict[str, str]:
    ident = cert_identity(cert.read_bytes())
    return {"fingerprint": ident.fingerprint, "serial": f"{ident.serial:x}"}


@dataclass
class World:
    """A store server (host-secondary) with its list: item-a written by host-primary (site-a),
    item-b by host-other (site-c). ``acl`` is the server's live list."""

    site: RunningSiteStore
    acl: StoreAcl
    certs: TestCerts
    other: tuple[Path, Path]
    doc: dict[str, Any]

    def client(self, who: str = "primary") -> SiteObjectStore:
        if who == "primary":
            return self.site.client()
        if who == "other":
            return self.site.client(*self.other)
        if who == "store":
            return self.site.client(self.certs.server_cert, self.certs.server_key)
        raise AssertionError(who)


def acl_doc(certs: TestCerts, other: Path, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": 1, "store_host": "host-secondary",
        "hosts": {"host-secondary": fp(certs.server_cert), "host-primary": fp(certs.client_cert),
                  "host-other": fp(other)},
        "items": {"item-a": {"writer": "host-primary", "readers": ["host-primary", "host-secondary"],
                             "point_key": base64.b64encode(KEY_A).decode()},
                  "item-b": {"writer": "host-other", "readers": ["host-other", "host-secondary"],
                             "point_key": base64.b64encode(KEY_B).decode()}},
        "revoked": {"hosts": [], "serials": [], "fingerprints": []}}
    doc.update(extra)
    return doc


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    certs = make_test_certs(tmp_path / "pki")
    other = issue_agent_cert(certs.ca, tmp_path / "pki" / "certs", "host-other", site="site-c")
    acl = StoreAcl(tmp_path / "agent" / "store-acl.json")
    doc = acl_doc(certs, other[0])
    acl.update(doc)
    site = RunningSiteStore(tmp_path / "site", certs=certs, acl=acl)
    yield World(site, acl, certs, other, doc)
    site.stop()


def write_point(store: SiteObjectStore, item: str, key: bytes | None, cycle: str,
                data: bytes = b"\x07" * MiB) -> str:
    repo = Repository(store, item, auth=PointAuth(item, key) if key else None)
    w = repo.begin(cycle, base=None, disk_sizes={"d0": 4 * MiB}, kind="initial")
    w.write("d0", 0, data)
    p = w.commit(created_at=1000.0, consistency=Consistency.CRASH)
    repo.close()
    return p.point_id


# ----------------------------------------------------------------------------- who may do what

def test_a_host_of_another_site_cannot_touch_another_items_objects(world: World) -> None:
    with world.client("primary") as a:
        pid = write_point(a, "item-a", KEY_A, "c1")
        keys_a = list(a.list("items/item-a/"))
    assert f"items/item-a/points/{pid}" in keys_a
    pack = next(k for k in keys_a if "/packs/" in k)
    with world.client("other") as b:
        write_point(b, "item-b", KEY_B, "c9")   # its own item: fine
        for call in (lambda: b.get(pack), lambda: b.size(pack), lambda: b.get_range(pack, 0, 10),
                     lambda: list(b.list("items/item-a/")),
                     lambda: b.put("items/item-a/packs/c1/" + "0" * 64, b"x"),
                     lambda: b.put(f"items/item-a/points/{pid}", b"{}", overwrite=True),
                     lambda: b.delete(pack), lambda: b.delete(f"items/item-a/points/{pid}"),
                     lambda: b.catch_up("item-a"),
                     lambda: b.digests("item-a", "d0", from_store=True)):
            with pytest.raises(Forbidden, match=r"host-other may not|HTTP 403") as ei:
                call()
            assert ei.value.http_status == 403 and ei.value.hint
        # listing is scoped to what it may read: all of item-b, nothing of item-a
        listed = list(b.list("items/"))
        assert listed and all(k.startswith("items/item-b/") for k in listed)
        assert not [k for k in b.list("") if "item-a" in k]
    # nothing of item-a changed
    assert sorted(world.site.backend.list("items/item-a/")) == sorted(keys_a)
    # the store's own host reads everything
    with world.client("store") as s:
        assert set(keys_a) <= set(s.list("items/"))


def test_unknown_revoked_and_replaced_certificates_are_refused(world: World,
                                                              tmp_path: Path) -> None:
    ca = world.certs.ca
    stranger = issue_agent_cert(ca, tmp_path / "x", "host-stranger", site="site-a")
    with world.site.client(*stranger) as c, pytest.raises(Forbidden, match="not a host this store"):
        c.get("items/item-a/seq")
    # a re-issue replaced host-primary's certificate: the old one no longer works
    new = issue_agent_cert(ca, tmp_path / "reissued", "host-primary", site="site-a")
    world.acl.update({**world.doc, "hosts": {**world.doc["hosts"], "host-primary": fp(new[0])}})
    with world.client("primary") as old, pytest.raises(Forbidden, match="not its current one"):
        old.get("items/item-a/seq")
    with world.site.client(*new) as fresh:
        assert fresh.exists("items/item-a/seq") is False
    # revoked (by host id, serial or fingerprint): refused whatever the grants say
    for field, value in (("hosts", "host-other"), ("serials", fp(world.other[0])["serial"]),
                         ("fingerprints", fp(world.other[0])["fingerprint"])):
        revoked = {"hosts": [], "serials": [], "fingerprints": [], field: [value]}
        world.acl.update({**world.doc, "revoked": revoked})
        with world.client("other") as b, pytest.raises(Forbidden, match="revoked"):
            list(b.list("items/item-b/"))
    world.acl.update(world.doc)
    with world.client("other") as b:
        assert list(b.list("items/item-b/")) == []


def test_before_the_first_list_every_request_is_refused(tmp_path: Path) -> None:
    certs = make_test_certs(tmp_path / "pki")
    site = RunningSiteStore(tmp_path / "site", certs=certs,
                            acl=StoreAcl(tmp_path / "agent" / "store-acl.json"))
    try:
        for c in (site.client(), site.client(certs.server_cert, certs.server_key)):
            with c, pytest.raises(Forbidden, match="not received its access list") as ei:
                c.get("items/item-a/seq")
            assert "heartbeat" in (ei.value.hint or "")
    finally:
        site.stop()


def test_the_list_survives_a_restart_and_is_private(world: World, tmp_path: Path) -> None:
    path = tmp_path / "agent" / "store-acl.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = StoreAcl(path)   # a restarted agent: the last list is in force at once
    assert again.digest == world.acl.digest and again.point_auth("item-a") is not None
    # a damaged file fails closed (and a new list repairs it)
    path.write_text("{not json")
    broken = StoreAcl(path)
    assert not broken.loaded
    broken.update(world.doc)
    assert StoreAcl(path).loaded


# ----------------------------------------------------------------------------- immutability

def test_no_client_can_overwrite_or_delete_a_committed_point_even_of_its_own_item(
        world: World) -> None:
    with world.client("primary") as a:
        pid = write_point(a, "item-a", KEY_A, "c1")
        keys = sorted(a.list("items/item-a/"))
        before = {k: world.site.backend.get(k) for k in keys}
        manifest = f"items/item-a/points/{pid}"
        pack = next(k for k in keys if "/packs/" in k)
        amap = next(k for k in keys if "/maps/" in k)
        for key in (manifest, pack, amap, "items/item-a/generation"):
            with pytest.raises(Forbidden, match="cannot be overwritten remotely"):
                a.put(key, b"forged", overwrite=True)
        for key in (manifest, pack, amap, "items/item-a/seq"):
            with pytest.raises(Forbidden, match="cannot be deleted remotely"):
                a.delete(key)
        with pytest.raises(ObjectExists):
            a.put(manifest, b"forged")
        # the sequence marker only grows
        with pytest.raises(Forbidden, match="never goes down"):
            a.put("items/item-a/seq", b"0", overwrite=True)
        a.put("items/item-a/seq", b"5", overwrite=True)
    for who in ("store", "other"):   # nobody else either, the store's own host included
        with world.client(who) as c, pytest.raises(Forbidden):
            c.delete(pack)
    after = {k: world.site.backend.get(k) for k in keys if k != "items/item-a/seq"}
    assert after == {k: v for k, v in before.items() if k != "items/item-a/seq"}


def test_a_writer_still_aborts_its_staged_cycle_and_quarantines_damage(world: World) -> None:
    with world.client("primary") as a:
        write_point(a, "item-a", KEY_A, "c1")
        repo = Repository(a, "item-a", auth=PointAuth("item-a", KEY_A))
        w = repo.begin("c2", base=None, disk_sizes={"d0": 4 * MiB}, kind="delta")
        w.write("d0", 0, b"\x01" * MiB)
        w.flush()
        staged = list(a.list("items/item-a/packs/c2/"))
        assert staged
        w.close()
        repo.abort("c2")                      # deletes its packs, then its marker
        assert list(a.list("items/item-a/packs/c2/")) == []
        assert repo.staged_cycles() == []
        # a damaged pack of a committed point may be quarantined (the server checks the damage)
        pack = next(k for k in a.list("items/item-a/packs/c1/"))
        good = world.site.backend.get(pack)
        world.site.backend.put(pack, b"rot" + good[3:], overwrite=True)   # bit rot on disk
        repo.quarantine(pack)
        assert not a.exists(pack)
        assert [k for k in a.list("items/item-a/quarantine/")]
        repo.close()


# ----------------------------------------------------------------------------- audit

def test_every_delete_and_overwrite_is_audited_with_the_caller(world: World) -> None:
    world.site.audit.take(10_000)
    with world.client("primary") as a:
        pid = write_point(a, "item-a", KEY_A, "c1")
        with pytest.raises(Forbidden):
            a.delete(f"items/item-a/points/{pid}")
    with world.client("other") as b, pytest.raises(Forbidden):
        b.put("items/item-a/seq", b"99", overwrite=True)
    got = world.site.audit.take(10_000)
    rows = {(e["op"], e["key"], e["caller"], e["outcome"]) for e in got}
    assert ("delete", f"items/item-a/points/{pid}", "host-primary", "refused") in rows
    assert ("overwrite", "items/item-a/seq", "host-other", "refused") in rows
    assert ("overwrite", "items/item-a/seq", "host-primary", "ok") in rows       # the commit
    assert ("delete", "items/item-a/staging/c1", "host-primary", "ok") in rows   # the commit
    assert all(e["item_id"] == "item-a" and e["at"] > 0 for e in got)


# ----------------------------------------------------------------------------- authenticity

def forge_point(backend: Any, item: str, like: str, new_id: str) -> None:
    """What someone with the store's files can do: a manifest with a valid checksum (and no
    MAC, or a MAC under a guessed key), pointing at existing objects."""
    env = json.loads(backend.get(f"items/{item}/points/{like}"))
    body = dict(env["body"], point_id=new_id, seq=int(new_id[1:]), created_at=2000.0)
    canon = canonical_json(body)
    forged = {"blake3": hex_hash(canon), "body": body,
              "mac": PointAuth(item, b"\x00" * 32).mac("manifest", canon)}
    backend.put(f"items/{item}/points/{new_id}", canonical_json(forged))


def test_hydration_refuses_a_point_forged_through_the_filesystem(world: World) -> None:
    with world.client("primary") as a:
        pid = write_point(a, "item-a", KEY_A, "c1")
        assert a.catch_up("item-a") == [pid]      # authentic: hydrated
        forge_point(world.site.backend, "item-a", pid, "p000000000009")
        with pytest.raises(PointNotAuthentic, match="p000000000009 of item item-a is not "
                                                    "authentic"):
            a.catch_up("item-a")
    # the forged manifest is "damaged" for the server: the writer may quarantine it
    with world.client("primary") as a:
        Repository(a, "item-a", auth=PointAuth("item-a", KEY_A)).quarantine(
            "items/item-a/points/p000000000009")
        assert a.catch_up("item-a") == []
