"""The store role of a site (``vault/storerole.py``): only the host an admin gave the role
serves the site's store — access list (point keys), recovery book, store host of new items,
break-glass reports. A store URL in another host's heartbeat is a claim: kept, never acted on,
alerted once. Moving the role while items use the current store host needs ``force``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from drsite.agent.process import agent_register
from drsite.cli.main import app
from drsite.vault.context import Vault
from drsite.vault.testing import Agent, Harness
from tests.integration.test_vault_api import policy_and_group, protect, two_sites
from tests.integration.test_vault_trust import security_alerts, served  # noqa: F401 (fixture)

CLAIM = "https://127.0.0.1:9777"


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault")
    yield hh
    hh.close()


def _host(h: Harness, name: str) -> dict[str, Any]:
    (row,) = [x for x in h.ok("GET", "/hosts") if x["name"] == name]
    return row


def _claim_alerts(h: Harness) -> list[dict[str, Any]]:
    return [a for a in security_alerts(h) if "without the site's store role" in a["message"]]


def _breakglass(agent: Agent, item_id: str, fid: str) -> Any:
    return agent.post("/heartbeat", {
        "host_name": agent.name, "version": "test", "store_url": agent.store_url, "vms": None,
        "items": [], "breakglass": [{"failover_id": fid, "kind": "unplanned", "item_id": item_id,
                                     "state": "pending_commit", "point_id": "p000001",
                                     "generation": 2, "vm_id": "vm-x", "vm_name": "web1"}]})


def test_the_assigned_store_host_serves_and_the_assignment_is_audited(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    assert b.store_acl is not None and item_id in b.store_acl["items"]
    assert b.store_acl["items"][item_id]["point_key"]
    reply = b.beat(store_url=b.store_url)
    assert item_id in reply["recovery_book"]["items"]
    assert _host(h, "hv2")["store_role"] is True and _host(h, "hv1")["store_role"] is False
    (sec,) = [x for x in h.ok("GET", "/sites") if x["name"] == "sec"]
    assert sec["store_host"] == b.host_id
    trail = h.ok("GET", "/audit?limit=200")["entries"]
    assert [e for e in trail if e["action"].startswith("PUT") and "store-host" in e["action"]
            and e["outcome"] == "ok"], [e["action"] for e in trail]
    assert not _claim_alerts(h)   # the role holder's store URL is no claim
    # its break-glass report is believed (the item fails over, the old primary is fenced)
    assert _breakglass(b, item_id, "bg-0000000000b1").status_code == 200
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "failed_over"


def test_a_claim_only_host_gets_nothing_is_never_chosen_and_raises_one_alert(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    intruder = h.register("sec", "hv3")
    for _ in range(3):
        reply = intruder.beat(store_url=CLAIM)
        assert "store_acl" not in reply and "recovery_book" not in reply
    h.clock.advance(5)
    intruder.beat(store_url=CLAIM)   # heard after the real store host: still not chosen
    item_id = protect(h, a)          # asserts the protect command names b's store URL
    intruder.beat(store_url=CLAIM)
    assert intruder.store_acl is None
    assert b.store_acl is not None and item_id in b.store_acl["items"]
    row = _host(h, "hv3")
    assert row["store_url"] == CLAIM and row["store_role"] is False   # kept as a claim
    (alert,) = _claim_alerts(h)
    assert "hv3" in alert["message"] and "drsite sites set-store sec hv3" in alert["message"]
    trail = h.ok("GET", "/audit?limit=200")["entries"]
    claims = [e for e in trail if e["action"] == "agent.store_claim"]
    assert len(claims) == 1 and claims[0]["outcome"] == "refused"
    # its break-glass report is refused: nothing fails over, nothing is fenced
    assert _breakglass(intruder, item_id, "bg-0000000000c1").status_code == 200
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    assert not [c for c in a.beat()["commands"] if c["kind"] == "failover_fence"]
    # a claim of another URL is a new claim: audited again, the alert refreshed, not doubled
    intruder.beat(store_url=CLAIM + "1")
    assert len(_claim_alerts(h)) == 1
    assert len([e for e in h.ok("GET", "/audit?limit=200")["entries"]
                if e["action"] == "agent.store_claim"]) == 2


def test_moving_the_role_while_items_use_the_store_needs_force(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    c = h.register("sec", "hv3")
    r = h.set_store("sec", "hv3")
    assert r.status_code == 409, r.text
    body = r.json()
    assert item_id in body["message"] and "--force" in body["hint"] \
        and "drsite items protect" in body["hint"]
    assert _host(h, "hv2")["store_role"] is True    # refused: nothing moved
    r = h.set_store("sec", "hv3", force=True)
    assert r.status_code == 200, r.text
    assert r.json()["moved_items"] == [item_id] and r.json()["changed"] is True
    # the new holder serves (list with the item's grant); the old one holds no keys any more
    assert c.beat(store_url=CLAIM)["store_acl"]["items"].keys() == {item_id}
    old = b.beat(store_url=b.store_url)
    assert old["store_acl"]["items"] == {} and old["store_acl"]["hosts"] == {}
    assert "recovery_book" not in old
    assert "store_acl" not in b.beat(store_url=b.store_url)   # sent once
    assert _breakglass(b, item_id, "bg-0000000000d1").status_code == 200
    assert h.ok("GET", f"/items/{item_id}")["protection"] == "protected"
    assert not _claim_alerts(h)   # c had the role before its first claim; b's URL is unchanged


def test_setting_the_role_validates_the_host_and_needs_an_admin(h: Harness) -> None:
    a, _b = two_sites(h)
    assert h.set_store("sec", "hv1").status_code == 404        # hv1 is in prim, not sec
    assert h.set_store("sec", a.host_id).status_code == 400    # by id: another site's host
    assert h.set_store("nosuch", "hv2").status_code == 404
    op = h.token("operator", "op")
    r = h.call("PUT", "/sites/sec/store-host", token=op, json={"host": "hv2"})
    assert r.status_code == 403
    assert h.set_store("sec", "hv2").json()["changed"] is False   # idempotent
    assert h.set_store("sec", None).json()["store_host"] is None   # no items: no force needed
    c = h.register("sec", "hv3")
    h.ok("DELETE", f"/hosts/{c.host_id}")
    r = h.set_store("sec", "hv3")
    assert r.status_code == 400 and "revoked" in r.json()["message"]


def test_cli_set_store_over_https(served: tuple[str, Vault], tmp_path: Path) -> None:  # noqa: F811
    url, vault = served
    ca = vault.tls.ca
    admin = (vault.settings.data_dir / "admin.token").read_text().strip()
    runner = CliRunner()
    opts = ["--vault", url, "--token", admin, "--ca-file", str(ca)]
    assert runner.invoke(app, ["sites", "create", "sec", *opts]).exit_code == 0
    key = runner.invoke(app, ["vault", "registration-key", "--site", "sec", *opts]).output.strip()
    ident = agent_register(url, key, tmp_path / "agent", "dr1", ca_file=ca)
    r = runner.invoke(app, ["sites", "set-store", "sec", *opts])
    assert r.exit_code != 0 and "give either HOST or --none" in str(r.exception)
    r = runner.invoke(app, ["sites", "set-store", "sec", "dr1", *opts])
    assert r.exit_code == 0 and "store role held by dr1" in r.output, r.output
    r = runner.invoke(app, ["sites", "set-store", "sec", "dr1", *opts])
    assert r.exit_code == 0 and "(unchanged)" in r.output, r.output
    r = runner.invoke(app, ["sites", "list", "--json", *opts])
    assert json.loads(r.output)[0]["store_host"] == ident.host_id
    r = runner.invoke(app, ["hosts", "list", "--json", *opts])
    assert [h["store_role"] for h in json.loads(r.output)] == [True]
    r = runner.invoke(app, ["sites", "set-store", "sec", "--none", *opts])
    assert r.exit_code == 0 and "store role held by no host" in r.output, r.output
    r = runner.invoke(app, ["sites", "set-store", "sec", "nosuch", *opts])
    assert r.exit_code != 0 and "no host 'nosuch'" in str(r.exception), r.output
