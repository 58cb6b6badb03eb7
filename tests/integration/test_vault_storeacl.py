"""The vault's half of store authorization (issue 11): the access list a store-serving agent
gets in its heartbeat reply (grants, current certificates, revocations; re-sent only when it
changed), the item's point key (sent in ``protect``, in the list, scrubbed from command
arguments when the command ended, never in clear in the database file), site-store retention
sent to the store's own agent, and the security alert of a refused, non-authentic point."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from drsite.core.errors import PointNotAuthentic
from drsite.core.states import ItemProtection
from drsite.sitestore.acl import AclState, acl_digest
from drsite.vault import storeacl
from drsite.vault.db.models import Command, Item
from drsite.vault.testing import Harness
from tests.integration.test_vault_api import policy_and_group, protect, two_sites
from tests.integration.test_vault_trust import security_alerts


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def test_store_access_list_grants_revocations_and_point_keys(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    # before any item: the store's own host only, and the list is not sent again unchanged
    doc = b.beat(store_url=b.store_url)["store_acl"] if b.store_acl is None else b.store_acl
    assert doc["store_host"] == b.host_id and doc["items"] == {}
    assert "store_acl" not in b.beat(store_url=b.store_url)
    assert "store_acl" not in a.beat(vms=a.last_vms)   # a host serving no store gets none
    item_id = protect(h, a)
    st = AclState.parse(b.store_acl)
    grant = st.items[item_id]
    assert grant.writer == a.host_id and grant.readers == {a.host_id, b.host_id}
    assert set(st.hosts) == {a.host_id, b.host_id}
    assert b.store_acl is not None
    key_b64 = b.store_acl["items"][item_id]["point_key"]
    assert grant.point_key is not None and len(grant.point_key) == 32
    # the key went to the source in protect: scrubbed once the command ended; never in clear
    with h.vault.db.read() as s:
        protects = [dict(a) for a in s.scalars(select(Command.args)
                                               .where(Command.kind == "protect"))]
    assert protects and all(a["point_key"] == "redacted" for a in protects)
    raw = b"".join(p.read_bytes() for p in h.settings.data_dir.glob("vault.db*"))
    key = base64.b64decode(key_b64)
    for needle in (key_b64.encode(), key, key.hex().encode(), base64.urlsafe_b64encode(key)):
        assert needle not in raw
    # revocation: the source host is revoked → listed, its grant gone, within the next beat
    h.ok("DELETE", f"/hosts/{a.host_id}")
    doc = b.beat(store_url=b.store_url)["store_acl"]
    assert a.host_id in doc["revoked"]["hosts"] and a.host_id not in doc["hosts"]
    assert item_id not in doc["items"]
    assert doc["revoked"]["fingerprints"] and doc["revoked"]["serials"]
    assert acl_digest(doc) == acl_digest(b.store_acl or {})


def test_site_store_retention_runs_on_the_stores_agent(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    h.clock.advance(4000)
    h.tick()
    assert not [c for c in a.beat()["commands"] if c["kind"] == "retention"]
    (ret,) = [c for c in b.beat(store_url=b.store_url)["commands"] if c["kind"] == "retention"]
    assert ret["item_id"] == item_id and ret["args"]["store_side"] is True
    assert ret["args"]["settings"]["retention_hours"] > 0


def test_a_refused_point_raises_a_security_alert(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    h.clock.advance(4000)
    h.tick()
    (ret,) = [c for c in b.beat(store_url=b.store_url)["commands"] if c["kind"] == "retention"]
    err = PointNotAuthentic(f"recovery point p000000000009 of item {item_id} is not authentic")
    assert b.result(ret["command_id"], "failed", error=err.to_dict()).status_code == 200
    alerts = security_alerts(h)
    assert [al for al in alerts if "not authentic" in al["message"]], alerts
    trail = h.ok("GET", "/audit?limit=200")["entries"]
    assert [e for e in trail if e["action"] == "agent.retention"
            and e["error_code"] == "point_not_authentic"]


def test_a_grant_is_not_confirmed_while_another_list_is_in_flight(h: Harness) -> None:
    """A failover makes the item read-only for its source; a cancel makes it writable again —
    the very list the store agent may still hold. A reply carrying the read-only list may then
    be in flight: until the agent confirms the list sent last, the grant stays pending (the
    source's first write would be refused otherwise)."""
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    held = b.store_acl
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None and storeacl.grant_pending(s, item, h.clock.now()) is None
        item.status = ItemProtection.FAILED_OVER
    # the heartbeat's reply carries the read-only list; the agent has not applied it yet
    reply = b.beat(store_url=b.store_url)
    assert reply["store_acl"]["items"][item_id]["writer"] == ""
    b.store_acl = held
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None
        item.status = ItemProtection.PROTECTED   # cancelled: the held list grants writes again
        assert storeacl.grant_pending(s, item, h.clock.now()) is not None
    # the agent applies the read-only list, reports it, gets the writable one, confirms it
    b.store_acl = reply["store_acl"]
    b.beat(store_url=b.store_url)
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None and storeacl.grant_pending(s, item, h.clock.now()) is not None
    b.beat(store_url=b.store_url)
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None and storeacl.grant_pending(s, item, h.clock.now()) is None
    assert b.store_acl is not None and b.store_acl["items"][item_id]["writer"] == a.host_id
