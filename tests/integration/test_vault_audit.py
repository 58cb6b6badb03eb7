"""The audit trail (issue 11) through the real FastAPI app, on SQLite and PostgreSQL: an entry
for every mutation of a scripted scenario (who, what, target, from where, when, outcome),
refused calls (401/403/409) too, agent claims the vault refused, store deletes/overwrites agents
report (only from the store's own host), ``GET /audit`` admin only and paginated, INFO log
lines — and never a secret in any of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from drsite.replication.report import ItemState
from drsite.vault.db.models import Audit
from drsite.vault.testing import Harness, point, report
from tests.integration.test_vault_api import err, policy_and_group, protect, two_sites
from tests.integration.test_vault_trust import VMS, as_agent, register_raw, site_key

ENGINES = ["sqlite", "postgresql"]
ACCESS = "AKIA-audit-never-logged-1234"
SECRET = "audit-secret-key-never-in-a-row-5678"


@pytest.fixture(params=ENGINES)
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


def trail(h: Harness, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    before = None
    while True:
        q = "&".join(f"{k}={v}" for k, v in {**params, "limit": 50,
                                             **({"before": before} if before else {})}.items())
        page = h.ok("GET", f"/audit?{q}")
        out += page["entries"]
        before = page["next_before"]
        if before is None:
            return out


def find(entries: list[dict[str, Any]], action: str, outcome: str = "ok",
         **kw: Any) -> dict[str, Any]:
    got = [e for e in entries if e["action"] == action and e["outcome"] == outcome
           and all(e.get(k) == v for k, v in kw.items())]
    assert got, f"no {outcome} {action} {kw} in {[(e['action'], e['outcome']) for e in entries]}"
    return got[0]


def raw_audit(h: Harness) -> str:
    with h.vault.db.read() as s:
        return json.dumps([[a.actor, a.client, a.action, a.target, a.error_code, a.detail]
                           for a in s.scalars(select(Audit))])


def test_every_mutation_of_a_scripted_scenario_is_audited(h: Harness,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="drsite.vault.audit")
    a, _b = two_sites(h)
    policy_and_group(h)
    op = h.token("operator", "op")
    ro = h.token("reader", "ro")
    item_id = protect(h, a)
    tokens = [h.admin, op, ro]
    reg_key = h.ok("POST", "/sites/prim/registration-keys", json={"ttl_s": 600})["key"]
    # refused: no token, a reader, a conflict (takeover), a bad registration key
    err(h.call("POST", "/policies", token=None, json={"name": "px"}), 401)
    err(h.call("POST", "/policies", token=ro, json={"name": "px"}), 403)
    err(register_raw(h, reg_key, "hv1"), 409)
    err(register_raw(h, "drsk_not-a-key", "hv9"), 401)
    # a re-issue, its registration, a revocation
    reissue = h.ok("POST", f"/hosts/{a.host_id}/reissue", json={"ttl_s": 600})["key"]
    tokens += [reg_key, reissue]
    a2 = as_agent(h, register_raw(h, reissue, "hv1", host_id=a.host_id), "prim", "hv1")
    third = as_agent(h, register_raw(h, reg_key, "hv3"), "prim", "hv3")
    h.ok("DELETE", f"/hosts/{third.host_id}")
    # stores: create (credentials), change credentials, rotate the key, delete
    h.ok("POST", "/stores", json={"name": "offsite", "kind": "s3",
                                  "config": {"bucket": "audit-b", "endpoint_url": "http://127.0.0.1:9"},
                                  "secret": {"access_key": ACCESS, "secret_key": SECRET}})
    h.ok("PUT", "/stores/offsite", json={"secret": {"access_key": ACCESS, "secret_key": SECRET + "2"}})
    h.ok("POST", "/stores/offsite/rotate-key")
    assert h.call("DELETE", "/stores/offsite").status_code == 204
    # an operator resyncs and unprotects; the admin deletes a token
    h.ok("POST", f"/items/{item_id}/resync", token=op)
    assert h.call("DELETE", "/tokens/ro").status_code == 204
    a2.beat(vms=VMS)
    assert a2.post("/commands/wait", {"timeout_s": 0}).status_code == 200

    entries = trail(h)
    find(entries, "POST /api/v1/sites", actor="admin", target="name=prim", actor_kind="token",
         client="testclient", status=201)
    find(entries, "POST /api/v1/tokens", actor="admin", target="name=op, role=operator")
    find(entries, "POST /api/v1/sites/{site}/registration-keys", actor="admin", target="site=prim")
    regs = [e for e in entries if e["action"] == "POST /api/v1/agent/register"
            and e["outcome"] == "ok" and e["actor"] == a.host_id]
    assert [(e["detail"]["via"], e["detail"]["replaced"]) for e in regs] == [
        ("re-issue key", True), ("site key", False)]  # newest first
    assert all(e["detail"]["cert_serial"] and e["actor_kind"] == "host" for e in regs)
    assert regs[0]["detail"]["cert_serial"] != regs[1]["detail"]["cert_serial"]
    find(entries, "POST /api/v1/policies", actor="admin", target="name=p1")
    find(entries, "POST /api/v1/groups", actor="admin",
         target="name=g1, site=prim, target_site=sec, policy=p1")
    find(entries, "POST /api/v1/items", actor="op-vm-1", target="vm_id=vm-1, group=g1")
    find(entries, "POST /api/v1/policies", "refused", actor_kind="anonymous", status=401,
         error_code="auth_failed")
    find(entries, "POST /api/v1/policies", "refused", actor="ro", status=403, error_code="forbidden")
    takeover = find(entries, "POST /api/v1/agent/register", "refused", status=409,
                    error_code="conflict")
    assert takeover["detail"]["host_name"] == "hv1" and takeover["detail"]["via"] == "site key"
    find(entries, "POST /api/v1/agent/register", "refused", status=401, error_code="auth_failed")
    find(entries, "POST /api/v1/hosts/{host_id}/reissue", actor="admin", target=f"host_id={a.host_id}")
    find(entries, "DELETE /api/v1/hosts/{host_id}", actor="admin", target=f"host_id={third.host_id}")
    find(entries, "POST /api/v1/stores", actor="admin", target="name=offsite, kind=s3")
    find(entries, "PUT /api/v1/stores/{store}", actor="admin", target="store=offsite")
    find(entries, "POST /api/v1/stores/{store}/rotate-key", actor="admin", target="store=offsite")
    find(entries, "DELETE /api/v1/stores/{store}", actor="admin", target="store=offsite")
    find(entries, "POST /api/v1/items/{item_id}/resync", actor="op", target=f"item_id={item_id}")
    find(entries, "DELETE /api/v1/tokens/{token}", actor="admin", target="token=ro")
    # agent facts are not audited when accepted: heartbeats, results and polls leave no rows
    assert not [e for e in entries if e["action"] in ("POST /api/v1/agent/heartbeat",
                                                      "POST /api/v1/agent/commands/wait")]
    assert all(e["at"] == h.clock.now() for e in entries)
    # never a secret: not in the API's rows, the raw rows, nor the log lines
    text = json.dumps(entries) + raw_audit(h) + caplog.text
    for secret in (*tokens, ACCESS, SECRET, SECRET + "2"):
        assert secret not in text
    assert "PRIVATE KEY" not in text and "CERTIFICATE REQUEST" not in text
    assert "audit " in caplog.text and "POST /api/v1/stores" in caplog.text


def test_audit_route_is_admin_only_filtered_and_paginated(h: Harness) -> None:
    h.site("prim")
    op, ro = h.token("operator", "op"), h.token("reader", "ro")
    for tok in (op, ro):
        err(h.call("GET", "/audit", token=tok), 403, "forbidden")
    err(h.call("GET", "/audit", token=None), 401)
    for n in range(5):
        h.ok("POST", "/policies", token=op, json={"name": f"p{n}"})
        h.clock.advance(10)
    page = h.ok("GET", "/audit?limit=3")
    assert len(page["entries"]) == 3 and page["next_before"] == page["entries"][-1]["id"]
    ids = [e["id"] for e in page["entries"]]
    assert ids == sorted(ids, reverse=True)
    rest = h.ok("GET", f"/audit?limit=3&before={page['next_before']}")["entries"]
    assert all(e["id"] < min(ids) for e in rest)
    mine = trail(h, actor="op")
    assert [e["target"] for e in mine if e["outcome"] == "ok"] == [f"name=p{n}" for n in range(4, -1, -1)]
    # the refused reads of the audit itself are in the trail
    assert {e["actor"] for e in trail(h) if e["action"] == "GET /api/v1/audit"} >= {"op", "ro"}
    recent = h.ok("GET", f"/audit?since={h.clock.now() - 25}")["entries"]
    assert [e["target"] for e in recent] == ["name=p4", "name=p3"]
    err(h.call("GET", "/audit?limit=0"), 400, "invalid_input")
    err(h.call("GET", "/audit?limit=x"), 422)
    err(h.call("GET", f"/audit?actor={'x' * 200}"), 400)


def test_refused_agent_claims_and_store_reports_are_audited(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    c = as_agent(h, register_raw(h, site_key(h), "hv3"), "prim", "hv3")  # no store
    t = h.clock.now()
    # another host's report of the item: refused, audited once while its alert is open
    for _ in range(3):
        c.beat(items=[{"item_id": item_id, "removed_points": ["p000001"],
                       "report": report(item_id, "vm-1", "web1", state=ItemState.CRITICAL)}])
    # an unexplained removal by the owner
    a.beat(items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                   "new_points": [point(item_id, 2, t + 1)], "removed_points": ["p000001"]}])
    # store deletes/overwrites: from the item's store host (b, site sec) and its owner (a)
    entries = [{"op": "delete", "key": f"items/{item_id}/packs/x", "item_id": item_id,
                "caller": a.host_id, "outcome": "ok"},
               {"op": "overwrite", "key": f"items/{item_id}/points/p000001", "item_id": item_id,
                "caller": c.host_id, "outcome": "refused", "at": t - 5}]
    b.post("/heartbeat", {"host_name": "hv2", "store_url": "https://127.0.0.1:9443", "audit": entries})
    a.post("/heartbeat", {"host_name": "hv1", "vms": VMS, "audit": entries[:1]})
    # ... but not from a host whose store does not hold the item
    r = c.post("/heartbeat", {"host_name": "hv3", "audit": entries})
    assert r.status_code == 200
    # malformed entries are refused with the whole heartbeat
    bad = [{**entries[0], "op": "wipe"}]
    assert c.post("/heartbeat", {"host_name": "hv3", "audit": bad}).status_code == 400
    assert c.post("/heartbeat", {"host_name": "hv3", "audit": [{"op": "delete"}]}).status_code == 422

    trail_ = trail(h)
    refused = [e for e in trail_ if e["action"] == "agent.report_item"]
    assert len(refused) == 1 and refused[0]["actor"] == c.host_id
    assert refused[0]["target"] == f"item={item_id}" and refused[0]["error_code"] == "untrusted_report"
    removal = find(trail_, "agent.remove_points", "refused", actor=a.host_id)
    assert removal["detail"]["points"] == ["p000001"] and removal["error_code"] == "unexplained_removal"
    deletes = [e for e in trail_ if e["action"] == "store.delete"]
    assert {e["detail"]["reported_by"] for e in deletes} == {a.host_id, b.host_id}
    assert all(e["actor"] == a.host_id and e["outcome"] == "ok" for e in deletes)
    over = find(trail_, "store.overwrite", "refused", actor=c.host_id)
    assert over["at"] == t - 5 and over["detail"]["reported_by"] == b.host_id
    assert over["target"] == f"item={item_id}, key=items/{item_id}/points/p000001"
    untrusted = [e for e in trail_ if e["action"] == "agent.store_audit"]
    assert len(untrusted) == 2 and all(e["actor"] == c.host_id and e["outcome"] == "refused"
                                       for e in untrusted)
    alerts = {al["key"] for al in h.entries("/alerts?state=active") if al["kind"] == "security"}
    assert alerts == {f"untrusted_report:{c.host_id}:{item_id}", f"point_removal:{item_id}",
                      f"untrusted_audit:{c.host_id}"}


def test_an_unauthenticated_refusal_that_repeats_is_recorded_once_a_minute(h: Harness) -> None:
    h.site("prim")
    a = h.register("prim", "hv1")
    h.ok("DELETE", f"/hosts/{a.host_id}")
    for _ in range(5):
        err(a.post("/heartbeat", {"host_name": "hv1"}), 401, "auth_failed")
    rows = [e for e in trail(h) if e["action"] == "POST /api/v1/agent/heartbeat"]
    assert len(rows) == 1 and rows[0]["actor"] == a.host_id and rows[0]["outcome"] == "refused"
    # authenticated refusals are each recorded
    ro = h.token("reader", "ro")
    for _ in range(3):
        err(h.call("POST", "/sites", token=ro, json={"name": "x"}), 403)
    assert len([e for e in trail(h) if e["action"] == "POST /api/v1/sites"
                and e["outcome"] == "refused"]) == 3
