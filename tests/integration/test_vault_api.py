"""Vault API: every route, good and bad input, on SQLite and on PostgreSQL (in-process app,
``TestClient``; agent routes get their client certificate through the dependency override)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import InvalidInput
from drsite.pki import make_key_and_csr
from drsite.replication.report import ItemState
from drsite.vault.testing import Agent, Harness, point, report, vm_info

ENGINES = ["sqlite", "postgresql"]


@pytest.fixture(params=ENGINES)
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


def err(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    body: dict[str, Any] = r.json()
    assert set(body) == {"code", "class", "message", "hint"}, body
    if code is not None:
        assert body["code"] == code, body
    return body


def snapshot(h: Harness) -> dict[str, Any]:
    """Everything an operator can see, to prove a refused call changed nothing."""
    out = {p: h.ok("GET", p) for p in ("/sites", "/hosts", "/vms", "/policies", "/groups",
                                       "/items?all=true", "/jobs", "/tokens")}
    out["/tokens"] = [{k: v for k, v in t.items() if k != "last_used_at"} for t in out["/tokens"]]
    return out


def two_sites(h: Harness) -> tuple[Agent, Agent]:
    h.site("prim")
    h.site("sec")
    a = h.register("prim", "hv1")
    b = h.register("sec", "hv2")
    assert h.set_store("sec", "hv2").status_code == 200   # the site's store role (storerole)
    a.beat(vms=[vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])])
    b.beat(store_url="https://127.0.0.1:9443")
    return a, b


def protect(h: Harness, a: Agent, vm_id: str = "vm-1", vm_name: str = "web1") -> str:
    """Protect a VM through the API and play the agent until the item is protected."""
    out = h.ok("POST", "/items", token=h.token("operator", f"op-{vm_id}"),
               json={"vm_id": vm_id, "group": "g1"})
    h.store_beat()  # the store receives and confirms the item's grant
    h.tick()
    reply = a.beat(vms=[vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])])
    (cmd,) = [c for c in reply["commands"] if c["kind"] == "protect"]
    assert cmd["item_id"] == out["item_id"]
    assert cmd["args"]["store_url"] == "https://127.0.0.1:9443"
    assert a.result(cmd["command_id"], "running", progress=5).status_code == 200
    item_id = str(out["item_id"])
    a.beat(vms=[vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])],
           items=[{"item_id": item_id, "report": report(item_id, vm_id, vm_name,
                                                         last_point_time=h.clock.now()),
                   "new_points": [point(item_id, 1, h.clock.now())]}])
    assert a.result(cmd["command_id"], "succeeded").status_code == 200
    h.tick()
    job = h.job(out["job_id"])
    assert job["state"] == "succeeded", job
    return item_id


def policy_and_group(h: Harness, **policy: Any) -> None:
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30, **policy})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p1"})


# ----------------------------------------------------------------------------------- public

def test_version_metrics_openapi(h: Harness) -> None:
    assert h.client.get("/api/v1/version").json() == {"version": "0.1.0"}
    m = h.client.get("/api/v1/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert "drsite_jobs" in m.text or "# HELP" in m.text
    spec = h.client.get("/openapi.json").json()
    for path in ("/api/v1/items", "/api/v1/agent/register", "/api/v1/agent/heartbeat",
                 "/api/v1/jobs/{job_id}/cancel", "/api/v1/tokens/{token}"):
        assert path in spec["paths"], path


# ------------------------------------------------------------------------------------- auth

def test_tokens_roles_and_secrets(h: Harness, tmp_path: Path) -> None:
    token_file = tmp_path / "vault" / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    err(h.call("GET", "/sites", token=None), 401, "auth_failed")
    err(h.call("GET", "/sites", token="drst_not-a-token"), 401, "auth_failed")
    err(h.client.get("/api/v1/sites", headers={"Authorization": "Basic abc"}), 401)
    created = h.ok("POST", "/tokens", json={"name": "ro", "role": "reader"})
    assert created["token"].startswith("drst_") and created["role"] == "reader"
    listed = h.ok("GET", "/tokens")
    assert {t["name"] for t in listed} == {"admin", "ro"}
    assert all("token" not in t and "secret_hash" not in t for t in listed)
    assert "token" not in h.ok("GET", "/tokens/ro")
    ro = created["token"]
    assert h.ok("GET", "/sites", token=ro) == []
    before = snapshot(h)
    err(h.call("POST", "/sites", token=ro, json={"name": "x"}), 403, "forbidden")
    err(h.call("POST", "/tokens", token=ro, json={"name": "y", "role": "admin"}), 403, "forbidden")
    op = h.token("operator", "op")
    err(h.call("POST", "/tokens", token=op, json={"name": "y", "role": "admin"}), 403, "forbidden")
    before = snapshot(h)
    err(h.call("POST", "/tokens", json={"name": "bad", "role": "root"}), 400, "invalid_input")
    err(h.call("POST", "/tokens", json={"name": "ro", "role": "reader"}), 409, "conflict")
    err(h.call("POST", "/tokens", json={"name": "../x", "role": "reader"}), 400, "invalid_input")
    err(h.call("GET", "/tokens/nope"), 404, "not_found")
    err(h.call("DELETE", "/tokens/admin"), 409, "conflict")  # the last admin token
    assert snapshot(h) == before
    assert h.call("DELETE", "/tokens/ro").status_code == 204
    err(h.call("GET", "/sites", token=ro), 401, "auth_failed")


# ------------------------------------------------------------------------- sites and agents

def test_sites_registration_and_hosts(h: Harness) -> None:
    site = h.ok("POST", "/sites", json={"name": "prim", "description": "primary DC"})
    assert site == {"name": "prim", "description": "primary DC", "created_at": site["created_at"],
                    "hosts": 0, "store_host": None}
    before = snapshot(h)
    err(h.call("POST", "/sites", json={"name": "prim"}), 409, "conflict")
    for bad in ("../etc", "a/b", "bad\x00name", "tab\tname", "", ".hidden", "x" * 64):
        err(h.call("POST", "/sites", json={"name": bad}), 400, "invalid_input")
    err(h.call("POST", "/sites", json={"name": "ok", "description": "bell\x07"}), 400)
    err(h.call("POST", "/sites", json={"name": 5}), 422, "invalid_input")
    err(h.call("POST", "/sites", json={}), 422, "invalid_input")
    err(h.call("POST", "/sites", json={"name": "x", "extra": 1}), 422)
    err(h.call("POST", "/sites", content=b"{not json", headers={"content-type": "application/json"}), 422)
    err(h.call("POST", "/sites/nope/registration-keys", json={"ttl_s": 600}), 404, "not_found")
    err(h.call("POST", "/sites/prim/registration-keys", json={"ttl_s": 5}), 400, "invalid_input")
    err(h.call("POST", "/sites/prim/registration-keys", json={"ttl_s": "600"}), 422)
    assert snapshot(h) == before
    assert h.ok("GET", "/sites/prim")["name"] == "prim"
    err(h.call("GET", "/sites/nope"), 404)

    key = h.ok("POST", "/sites/prim/registration-keys", json={"ttl_s": 600})
    assert key["key"].startswith("drsk_") and key["expires_at"] == h.clock.now() + 600
    _k, csr = make_key_and_csr("hv1")
    body = {"key": key["key"], "host_name": "hv1", "csr_pem": csr.decode()}
    # a bad CSR is refused and does not consume the key
    err(h.client.post("/api/v1/agent/register", json={**body, "csr_pem": "garbage"}), 400, "invalid_input")
    err(h.client.post("/api/v1/agent/register", json={**body, "host_name": "../hv"}), 400)
    err(h.client.post("/api/v1/agent/register", json={"key": key["key"]}), 422)
    assert h.ok("GET", "/hosts") == []
    r = h.client.post("/api/v1/agent/register", json=body)
    assert r.status_code == 201, r.text
    reg = r.json()
    assert set(reg) == {"host_id", "site", "cert_pem", "ca_pem"} and reg["site"] == "prim"
    assert "PRIVATE KEY" not in r.text
    # the key is one-time
    err(h.client.post("/api/v1/agent/register", json=body), 401, "auth_failed")
    err(h.client.post("/api/v1/agent/register", json={**body, "key": "drsk_unknown"}), 401)
    # an expired key
    key2 = h.ok("POST", "/sites/prim/registration-keys", json={"ttl_s": 60})["key"]
    h.clock.advance(61)
    before = snapshot(h)
    _k, csr2 = make_key_and_csr("hv9")
    err(h.client.post("/api/v1/agent/register",
                      json={"key": key2, "host_name": "hv9", "csr_pem": csr2.decode()}), 401)
    assert snapshot(h) == before

    hosts = h.ok("GET", "/hosts")
    assert [x["name"] for x in hosts] == ["hv1"] and hosts[0]["up"] is False
    host = h.ok("GET", f"/hosts/{reg['host_id']}")
    assert host["site"] == "prim" and host["revoked"] is False
    err(h.call("GET", "/hosts/h-unknown"), 404)
    err(h.call("GET", "/hosts/bad%01id"), 400)


def test_agent_routes_need_a_current_certificate(h: Harness) -> None:
    h.site("prim")
    a = h.register("prim", "hv1")
    beat = {"host_name": "hv1", "version": "1", "vms": [], "items": []}
    err(h.client.post("/api/v1/agent/heartbeat", json=beat), 401, "auth_failed")
    h.peer = b"not a certificate"
    err(h.client.post("/api/v1/agent/heartbeat", json=beat), 401, "auth_failed")
    h.peer = None
    assert a.post("/heartbeat", beat).status_code == 200
    assert h.ok("GET", f"/hosts/{a.host_id}")["up"] is True
    # wrong shapes
    assert a.post("/heartbeat", {"version": "1"}).status_code == 422
    assert a.post("/heartbeat", {**beat, "vms": "x"}).status_code == 422
    assert a.post("/heartbeat", {**beat, "vms": [{"name": "no id"}]}).status_code == 400
    assert a.post("/heartbeat", {**beat, "store_url": "file:///etc/passwd"}).status_code == 400
    assert a.post("/commands/c-unknown/result", {"status": "succeeded"}).status_code == 404
    assert a.post("/commands/c-unknown/result", {"status": "exploded"}).status_code == 422
    # a re-issue key (admin) replaces the certificate: the old one stops working
    key = h.ok("POST", f"/hosts/{a.host_id}/reissue", json={"ttl_s": 600})["key"]
    _k, csr = make_key_and_csr("hv1")
    r = h.client.post("/api/v1/agent/register",
                      json={"key": key, "host_name": "hv1", "csr_pem": csr.decode()})
    assert r.status_code == 201, r.text
    b = Agent(h, r.json()["host_id"], "prim", "hv1", r.json()["cert_pem"].encode())
    assert b.host_id == a.host_id
    err(a.post("/heartbeat", beat), 401, "auth_failed")
    assert b.post("/heartbeat", beat).status_code == 200
    # revocation
    assert h.ok("DELETE", f"/hosts/{b.host_id}")["revoked"] is True
    err(b.post("/heartbeat", beat), 401, "auth_failed")
    ro = h.token("reader")
    err(h.call("DELETE", f"/hosts/{b.host_id}", token=ro), 403)


# ----------------------------------------------------------------------- policies and groups

def test_policies(h: Harness) -> None:
    p = h.ok("POST", "/policies", json={"name": "gold", "frequency_s": 30, "retention_hours": 48,
                                        "app_consistent_every_s": 3600,
                                        "initial_replication_start": "22:00",
                                        "bandwidth_limit_bps": 10_000_000, "rpo_threshold_s": 300})
    assert p["resync_window"] == "18:00-08:00" and p["encryption"] is False
    assert p["compression"] == "auto"  # the default: zstd unless the CPU holds the copy up
    assert h.ok("GET", "/policies/gold") == p
    assert [x["name"] for x in h.ok("GET", "/policies")] == ["gold"]
    before = snapshot(h)
    for bad in ({"frequency_s": 4}, {"retention_hours": 0}, {"resync_window": "25:00-08:00"},
                {"resync_window": "18:00"}, {"initial_replication_start": "tomorrow"},
                {"rpo_threshold_s": 10}, {"app_consistent_every_s": 10}, {"bandwidth_limit_bps": 5}):
        err(h.call("POST", "/policies", json={"name": "bad", **bad}), 400, "invalid_input")
    err(h.call("POST", "/policies", json={"name": "bad", "frequency_s": "30"}), 422)
    # NaN and infinities (JSON extensions Python reads): refused, not a 500 or a null
    for raw in ('{"name": "bad", "frequency_s": NaN}', '{"name": "bad", "rpo_threshold_s": NaN}',
                '{"name": "bad", "app_consistent_every_s": Infinity}'):
        r = h.call("POST", "/policies", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422) and "finite" in r.text.lower(), (raw, r.text)
    err(h.call("POST", "/policies", json={"name": "bad", "compression": 1}), 422)
    e = h.call("POST", "/policies", json={"name": "bad", "compression": "gzip"})
    err(e, 400, "invalid_input")
    assert "compression must be 'auto', 'zstd' or 'off'" in e.text
    err(h.call("POST", "/policies", json={"frequency_s": 30}), 400)
    err(h.call("POST", "/policies", json={"name": "gold"}), 409)
    err(h.call("POST", "/policies", json={"name": "a\nb"}), 400)
    ro = h.token("reader")
    err(h.call("POST", "/policies", token=ro, json={"name": "x"}), 403)
    before = {**before, "/tokens": snapshot(h)["/tokens"]}
    assert snapshot(h) == before
    r = h.call("PUT", "/policies/gold", content='{"rpo_threshold_s": NaN}',
               headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    p2 = h.ok("PUT", "/policies/gold", json={"frequency_s": 300, "rpo_threshold_s": 900})
    assert p2["frequency_s"] == 300 and p2["retention_hours"] == 24  # PUT replaces every value
    # the boolean compression of older clients still works: true is "zstd", false is "off"
    for given, stored in ((True, "zstd"), (False, "off"), ("off", "off"), ("zstd", "zstd"),
                          ("auto", "auto")):
        p3 = h.ok("PUT", "/policies/gold", json={"compression": given})
        assert p3["compression"] == stored and h.ok("GET", "/policies/gold") == p3
    err(h.call("PUT", "/policies/gold", json={"name": "silver"}), 400)
    err(h.call("PUT", "/policies/none", json={}), 404)
    err(h.call("GET", "/policies/..%2Fetc"), 404)  # never reaches a route
    err(h.call("GET", "/policies/a..b"), 400, "invalid_input")
    err(h.call("GET", "/policies/x%1Bz"), 400, "invalid_input")
    assert h.call("DELETE", "/policies/gold").status_code == 204
    err(h.call("DELETE", "/policies/gold"), 404)


def test_groups(h: Harness) -> None:
    two_sites(h)
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30})
    g = h.ok("POST", "/groups", json={"name": "g0", "site": "prim", "target_site": "sec",
                                      "match": {"hosts": ["hv1"]}})
    assert g["policy"] is None and g["job_id"] is None and g["match"]["hosts"] == ["hv1"]
    before = snapshot(h)
    err(h.call("POST", "/groups", json={"name": "g0", "site": "prim", "target_site": "sec"}), 409)
    err(h.call("POST", "/groups", json={"name": "gx", "site": "prim", "target_site": "prim"}), 400)
    err(h.call("POST", "/groups", json={"name": "gx", "site": "nope", "target_site": "sec"}), 404)
    err(h.call("POST", "/groups", json={"name": "gx", "site": "prim", "target_site": "sec",
                                        "policy": "nope"}), 404)
    err(h.call("POST", "/groups", json={"name": "gx", "site": "prim", "target_site": "sec",
                                        "match": {"vm_names": ["../../x"]}}), 400)
    err(h.call("POST", "/groups", json={"name": "gx", "site": "prim", "target_site": "sec",
                                        "match": {"vm_names": "web1"}}), 422)
    err(h.call("POST", "/groups", json={"name": "gx", "site": "prim"}), 422)
    assert snapshot(h) == before
    # associating a policy runs a PolicyAssociation job that protects matching VMs
    g = h.ok("PUT", "/groups/g0", json={"policy": "p1"})
    assert g["policy"] == "p1" and g["job_id"]
    h.tick()
    job = h.job(g["job_id"])
    assert job["kind"] == "PolicyAssociation" and job["state"] == "succeeded"
    assert [t["name"] for t in job["tasks"]] == ["apply_settings", "protect_vms"]
    assert "2 EnableProtection" in job["message"]  # hv1 holds both VMs
    enable = h.entries("/jobs?kind=EnableProtection")
    assert len(enable) == 2
    err(h.call("DELETE", "/policies/p1"), 409)
    err(h.call("DELETE", "/groups/g0"), 409)
    assert h.ok("GET", "/groups/g0")["items"] == 2
    err(h.call("GET", "/groups/nope"), 404)
    err(h.call("PUT", "/groups/g0", json={"policy": 3}), 422)


# ------------------------------------------------------------------------------------ items

def test_protect_item_points_and_unprotect(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    ro = h.token("reader")
    before = snapshot(h)
    err(h.call("POST", "/items", token=ro, json={"vm_id": "vm-1", "group": "g1"}), 403, "forbidden")
    err(h.call("POST", "/items", token=None, json={"vm_id": "vm-1", "group": "g1"}), 401)
    err(h.call("POST", "/items", json={"vm_id": "vm-404", "group": "g1"}), 404)
    err(h.call("POST", "/items", json={"vm_id": "vm-1", "group": "nope"}), 404)
    err(h.call("POST", "/items", json={"vm_id": "vm\x00", "group": "g1"}), 400)
    err(h.call("POST", "/items", json={"vm_id": 1, "group": "g1"}), 422)
    err(h.call("POST", "/items", json={"group": "g1"}), 422)
    assert snapshot(h) == before

    item_id = protect(h, a)
    err(h.call("POST", "/items", json={"vm_id": "vm-1", "group": "g1"}), 409, "conflict")
    item = h.ok("GET", f"/items/{item_id}")
    assert item["protection"] == "protected" and item["state"] == "protected"
    assert item["health"] == "normal" and item["rpo_s"] == 0.0 and item["group"] == "g1"
    assert item["source_host"] == "hv1" and item["target_site"] == "sec" and item["policy"] == "p1"
    assert [i["id"] for i in h.entries("/items")] == [item_id]
    vms = {v["vm_id"]: v for v in h.ok("GET", "/vms")}
    assert vms["vm-1"]["item_id"] == item_id and vms["vm-2"]["item_id"] is None
    assert vms["vm-2"]["labels"] == ["db"]

    # points: catalogue from heartbeats, acked by seq, removed by id, idempotent
    t = h.clock.now()
    beat_items = [{"item_id": item_id, "report": report(item_id, "vm-1", "web1", last_point_time=t + 1),
                   "new_points": [point(item_id, 2, t + 1), point(item_id, 3, t + 2, app=True)]}]
    assert a.beat(items=beat_items)["ack"] == {item_id: 3}
    assert a.beat(items=beat_items)["ack"] == {item_id: 3}
    pts = h.entries(f"/items/{item_id}/points")
    assert [p["seq"] for p in pts] == [1, 2, 3] and pts[2]["consistency"] == "app"
    # a removal counts when the retention rule explains it: p000001 is young, then old enough
    # to be thinned (the newest point of its hour, p000003, stays)
    a.beat(items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                   "removed_points": ["p000001"]}])
    assert [p["seq"] for p in h.entries(f"/items/{item_id}/points")] == [1, 2, 3]
    h.clock.advance(2 * 3600)
    a.beat(items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                   "removed_points": ["p000001"]}])
    assert [p["seq"] for p in h.entries(f"/items/{item_id}/points")] == [2, 3]
    err(h.call("GET", "/items/i-unknown/points"), 404)
    err(h.call("GET", "/items/i-unknown"), 404)

    # resync by hand and unprotect: jobs; one active job per item
    op = h.token("operator", "op2")
    rs = h.ok("POST", f"/items/{item_id}/resync", token=op)
    err(h.call("DELETE", f"/items/{item_id}", token=op), 409, "conflict")
    err(h.call("POST", f"/items/{item_id}/resync", token=ro), 403)
    h.tick()
    cmd = next(c for c in a.beat()["commands"] if c["kind"] == "resync")
    assert cmd["args"] == {"by_hand": True, "from_store": True}  # compared with what the store restores
    a.result(cmd["command_id"], "succeeded")
    h.tick()
    assert h.job(rs["job_id"])["state"] == "succeeded"
    d = h.ok("DELETE", f"/items/{item_id}?delete_points=true", token=op)
    h.tick()
    cmd = next(c for c in a.beat()["commands"] if c["kind"] == "unprotect")
    assert cmd["args"] == {"delete_points": True}
    assert a.result(cmd["command_id"], "succeeded").json()["status"] == "succeeded"
    # repeating a final result is accepted, contradicting it is not
    assert a.result(cmd["command_id"], "succeeded").status_code == 200
    assert a.result(cmd["command_id"], "failed", error={"message": "x"}).status_code == 409
    h.tick()
    # committed points on a site store are deleted by the store's own agent
    assert h.job(d["job_id"])["state"] == "running"
    (purge,) = [c for c in b.beat(store_url=b.store_url)["commands"] if c["kind"] == "retention"]
    assert purge["item_id"] == item_id and purge["args"] == {"store_side": True, "delete_all": True}
    assert b.result(purge["command_id"], "succeeded",
                    result={"deleted_points": [], "store_side": True}).status_code == 200
    h.tick()
    assert h.job(d["job_id"])["state"] == "succeeded"
    assert h.entries("/items") == []
    assert h.entries("/items?all=true")[0]["protection"] == "removed"
    assert h.entries(f"/items/{item_id}/points") == []
    # a VM whose protection was disabled by hand is not re-protected by its group's policy
    h.ok("PUT", "/groups/g1", json={"match": {"vm_names": ["web1"]}})
    h.tick()
    assert h.entries("/items") == []
    assert h.call("DELETE", "/groups/g1").status_code == 204


def test_jobs_alerts_events_health(h: Harness) -> None:
    a, _b = two_sites(h)
    policy_and_group(h, rpo_threshold_s=60)
    out = h.ok("POST", "/items", json={"vm_id": "vm-1", "group": "g1"})
    job = h.job(out["job_id"])
    assert job["kind"] == "EnableProtection" and job["state"] == "queued"
    assert [t["name"] for t in job["tasks"]] == ["prerequisites", "create_relationship",
                                                 "initial_replication", "finalize"]
    assert {j["id"] for j in h.entries("/jobs?state=queued&kind=EnableProtection")} == {out["job_id"]}
    assert h.entries("/jobs?kind=Resync") == []
    assert len(h.ok("GET", "/jobs?limit=1")["entries"]) == 1
    err(h.call("GET", "/jobs?state=bogus"), 400)
    err(h.call("GET", "/jobs?kind=Bogus"), 400)
    err(h.call("GET", "/jobs?limit=0"), 400)
    err(h.call("GET", "/jobs?limit=x"), 422)
    err(h.call("GET", "/jobs/j-nope"), 404)
    err(h.call("POST", "/jobs/j-nope/cancel"), 404)
    ro = h.token("reader")
    err(h.call("POST", f"/jobs/{out['job_id']}/cancel", token=ro), 403)
    cancelled = h.ok("POST", f"/jobs/{out['job_id']}/cancel")
    assert cancelled["cancel_requested"] is True
    h.tick()
    assert h.job(out["job_id"])["state"] == "cancelled"
    err(h.call("POST", f"/jobs/{out['job_id']}/cancel"), 409)

    item_id = protect(h, a)
    h.clock.advance(120)  # no new point, no heartbeat: RPO over threshold and agent down
    h.tick()
    alerts = h.entries("/alerts?state=active")
    assert {x["kind"] for x in alerts} == {"rpo", "agent_down"}
    health = h.ok("GET", "/health")
    assert health["items"] == {"normal": 0, "warning": 1, "critical": 0}
    assert health["agents"] == {"up": 0, "down": 2} and health["alerts_active"] == 3
    assert health["worst_rpo"][0]["item_id"] == item_id
    rpo_alert = next(x for x in alerts if x["kind"] == "rpo")
    err(h.call("POST", f"/alerts/{rpo_alert['id']}/ack", token=ro), 403)
    err(h.call("POST", "/alerts/999999/ack"), 404)
    err(h.call("POST", "/alerts/abc/ack"), 404)
    assert h.ok("POST", f"/alerts/{rpo_alert['id']}/ack")["acked_at"] == h.clock.now()
    err(h.call("GET", "/alerts?state=odd"), 400)
    events = h.entries("/events?limit=500")
    kinds = {e["kind"] for e in events}
    assert {"site", "host", "job", "alert", "item"} <= kinds
    # filtered by kind and subject, newest first; bad filters are refused
    mine = h.entries(f"/events?kind=item&subject={item_id}")
    assert mine and all(e["kind"] == "item" and e["subject"] == item_id for e in mine)
    assert mine == [e for e in events if e["kind"] == "item" and e["subject"] == item_id]
    assert h.entries("/events?kind=nosuchkind") == []
    assert len(h.ok("GET", "/events?kind=job&limit=1")["entries"]) == 1
    err(h.call("GET", "/events?kind=../x"), 400)
    err(h.call("GET", "/events?limit=1001"), 400)
    m = h.client.get("/api/v1/metrics").text
    assert f'drsite_item_rpo_seconds{{item="{item_id}",vm="web1"}} 120.0' in m
    assert 'drsite_agent_up{host="hv1",site="prim"} 0.0' in m
    assert 'drsite_jobs{kind="EnableProtection",state="succeeded"} 1.0' in m


def cli_against(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``drsite`` CLI talk to the harness's vault in-process, as admin (its client's
    HTTP session replaced by a ``TestClient`` of the vault's app)."""
    from fastapi.testclient import TestClient

    from drsite.cli import common
    from drsite.client.api import VaultClient, VaultConfig

    def fake_client(*_a: Any) -> VaultClient:
        c = VaultClient(VaultConfig("http://testserver", h.admin))
        c._http.close()
        c._http = TestClient(h.app, base_url="http://testserver/api/v1",
                             headers={"Authorization": f"Bearer {h.admin}"})
        return c

    monkeypatch.setattr(common, "client", fake_client)


def test_cli_events_list_and_list_options(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """``drsite events list``: the trail newest first, filtered by kind and subject, as a
    table or JSON; a bad kind is the API's refusal with its hint. The lists' ``--where`` and
    ``--sort``, and their refusals of a field no row has or a condition without ``=``."""
    import json

    from typer.testing import CliRunner

    from drsite.cli.main import app
    from drsite.core.errors import InvalidInput, NotFound

    cli_against(h, monkeypatch)
    a, _b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    runner = CliRunner()
    r = runner.invoke(app, ["events", "list", "--kind", "item", "--subject", item_id, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows and {(e["kind"], e["subject"]) for e in rows} == {("item", item_id)}
    assert rows == sorted(rows, key=lambda e: -e["at"])
    r = runner.invoke(app, ["events", "list", "--limit", "2", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 2
    r = runner.invoke(app, ["events", "list", "--kind", "site"])
    assert r.exit_code == 0 and "events" in r.output and "prim" in r.output
    r = runner.invoke(app, ["events", "list", "--kind", "a/b"])
    assert isinstance(r.exception, InvalidInput) and r.exception.hint  # main() prints both
    r = runner.invoke(app, ["events", "list", "--limit", "0"])
    assert r.exit_code == 2 and "limit" in r.output.lower()
    # every list: --where FIELD=VALUE (case-insensitive, combined) and --sort [-]FIELD
    r = runner.invoke(app, ["hosts", "list", "--sort", "-name", "--json"])
    assert r.exit_code == 0, r.output
    assert [x["name"] for x in json.loads(r.stdout)] == ["hv2", "hv1"]
    r = runner.invoke(app, ["hosts", "list", "--where", "site=PRIM", "--json"])
    assert [x["name"] for x in json.loads(r.stdout)] == ["hv1"]
    r = runner.invoke(app, ["hosts", "list", "--where", "site=prim", "--where", "name=hv2",
                            "--json"])
    assert json.loads(r.stdout) == []
    r = runner.invoke(app, ["items", "list", "--where", f"id={item_id}", "--json"])
    assert [x["id"] for x in json.loads(r.stdout)] == [item_id]
    r = runner.invoke(app, ["vms", "list", "--sort", "name", "--json"])
    names = [x["name"] for x in json.loads(r.stdout)]
    assert names == sorted(names) and len(names) >= 2
    r = runner.invoke(app, ["jobs", "list", "--where", "kind=EnableProtection", "--json"])
    assert r.exit_code == 0 and {x["kind"] for x in json.loads(r.stdout)} == {"EnableProtection"}
    r = runner.invoke(app, ["alerts", "list", "--all", "--sort", "raised_at"])
    assert r.exit_code == 0
    r = runner.invoke(app, ["hosts", "list", "--where", "nosuchfield=1"])
    assert isinstance(r.exception, InvalidInput) and "site" in (r.exception.hint or "")
    r = runner.invoke(app, ["hosts", "list", "--sort", "-nosuchfield"])
    assert isinstance(r.exception, InvalidInput)
    r = runner.invoke(app, ["vms", "list", "--where", "site"])
    assert isinstance(r.exception, InvalidInput) and "FIELD=VALUE" in r.exception.message
    for cmd in (["policies", "list"], ["groups", "list"], ["store", "list"], ["plan", "list"],
                ["network", "list"], ["failover", "list"], ["drills", "list"]):
        r = runner.invoke(app, [*cmd, "--where", "name=nosuch", "--sort", "-name", "--json"])
        assert r.exit_code == 0 and json.loads(r.stdout) == [], (cmd, r.output)
    r = runner.invoke(app, ["groups", "list", "--where", "policy=p1", "--json"])
    assert r.exit_code == 0 and [g["name"] for g in json.loads(r.stdout)] == ["g1"], r.output
    r = runner.invoke(app, ["policies", "list", "--where", "nosuchfield=1"])
    assert isinstance(r.exception, InvalidInput) and "frequency_s" in (r.exception.hint or "")
    # one site, one host: their fields, hosts and VMs
    r = runner.invoke(app, ["sites", "show", "prim", "--json"])
    assert r.exit_code == 0, r.output
    site = json.loads(r.stdout)
    assert site["name"] == "prim" and [x["name"] for x in site["hosts"]] == ["hv1"]
    assert {v["name"] for v in site["vms"]} == {"web1", "db1"} and all(v["site"] == "prim"
                                                                for v in site["vms"])
    r = runner.invoke(app, ["sites", "show", "prim"])
    assert r.exit_code == 0 and "hosts of prim" in r.output and "hv1" in r.output
    r = runner.invoke(app, ["sites", "show", "nosuch"])
    assert isinstance(r.exception, NotFound) and "sites list" in (r.exception.hint or "")
    r = runner.invoke(app, ["hosts", "show", "hv1", "--json"])
    assert r.exit_code == 0, r.output
    host = json.loads(r.stdout)
    assert host["name"] == "hv1" and host["site"] == "prim" and "store_role" in host
    assert host["vms"] and all(v["host"] == "hv1" for v in host["vms"])
    r = runner.invoke(app, ["hosts", "show", "nosuch"])
    assert isinstance(r.exception, NotFound)


def test_secrets_never_in_logs_or_listings(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    h.site("prim")
    tok = h.ok("POST", "/tokens", json={"name": "op", "role": "operator"})["token"]
    key = h.ok("POST", "/sites/prim/registration-keys", json={"ttl_s": 600})["key"]
    key_pem, csr = make_key_and_csr("hv1")
    # a malformed call that carries the key must not echo it
    r = h.client.post("/api/v1/agent/register", json={"key": key, "host_name": 7, "csr_pem": csr.decode()})
    assert r.status_code == 422 and key not in r.text
    h.client.post("/api/v1/agent/register", json={"key": key, "host_name": "hv1", "csr_pem": csr.decode()})
    listing = str([h.ok("GET", p) for p in ("/tokens", "/events?limit=1000", "/hosts", "/sites")])
    for secret in (tok, key, h.admin):
        assert secret not in caplog.text and secret not in listing
    assert "PRIVATE KEY" not in caplog.text and key_pem.decode() not in caplog.text


def test_heartbeat_ignores_items_of_other_hosts(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    reply = b.beat(items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1",
                                                                 state=ItemState.CRITICAL),
                           "new_points": [point(item_id, 9, h.clock.now())]}],
                   store_url="https://127.0.0.1:9443")
    assert reply["ack"] == {}
    assert h.ok("GET", f"/items/{item_id}")["state"] == "protected"
    assert [p["seq"] for p in h.entries(f"/items/{item_id}/points")] == [1]


def test_cli_refuses_a_number_that_is_not_finite(h: Harness,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``drsite policies create x --frequency nan`` printed a Python traceback (JSON cannot
    carry NaN): now a clear error, exit 2, and nothing created."""
    from typer.testing import CliRunner

    from drsite.cli.main import app

    cli_against(h, monkeypatch)
    runner = CliRunner(env={"COLUMNS": "250"})
    for args in (["policies", "create", "x", "--frequency", "nan"],
                 ["policies", "create", "x", "--rpo-threshold", "inf"]):
        r = runner.invoke(app, args)   # (``main`` prints it and exits 2; see test_groups_cli)
        assert isinstance(r.exception, InvalidInput) and r.exception.exit_code == 2, r.exception
        assert "give a finite number" in r.exception.message
    assert h.ok("GET", "/policies") == []


def test_cli_lists_points_with_their_utc_time(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """``drsite items points`` showed '-' in its time column for every point (found by the
    outside review): the column is the point's creation in UTC."""
    import json
    import time as _time

    from typer.testing import CliRunner

    from drsite.cli.main import app

    cli_against(h, monkeypatch)
    a, _b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    t = h.clock.now()
    a.beat(vms=[vm_info("vm-1", "web1")], items=[{
        "item_id": item_id, "report": report(item_id, "vm-1", "web1"),
        "new_points": [point(item_id, 1, t)]}])
    want = _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(t))
    r = CliRunner().invoke(app, ["items", "points", item_id, "--json"])
    assert r.exit_code == 0, r.output
    assert [p["utc"] for p in json.loads(r.stdout)] == [want], r.stdout
    # the table (its width is the terminal's: a narrow one folds the cell, so no match on it)
    r = CliRunner().invoke(app, ["items", "points", item_id])
    assert r.exit_code == 0 and want[:4] in r.output and " - " not in r.output, r.output


def test_cli_shows_the_replication_mode(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """``drsite policies list|show`` give a policy's mode and budget; ``drsite items show``
    the item's mode and whether it is in sync (``suspended: why`` from its agent's report),
    as a table and in --json."""
    import json

    from typer.testing import CliRunner

    from drsite.cli.main import app

    cli_against(h, monkeypatch)
    a, _b = two_sites(h)
    policy_and_group(h, mode="sync", sync_budget_ms=120)
    item_id = protect(h, a)
    runner = CliRunner(env={"COLUMNS": "250"})
    r = runner.invoke(app, ["policies", "list", "--json"])
    assert r.exit_code == 0, r.output
    assert [(p["name"], p["mode"], p["sync_budget_ms"]) for p in json.loads(r.stdout)] \
        == [("p1", "sync", 120)]
    r = runner.invoke(app, ["policies", "list"])
    assert r.exit_code == 0 and "sync" in r.output and "120" in r.output, r.output
    r = runner.invoke(app, ["policies", "show", "p1"])
    assert "mode: sync" in r.output and "sync_budget_ms: 120" in r.output, r.output
    rep = report(item_id, "vm-1", "web1")
    rep["agent_issues"] = ["sync mode suspended: the recovery agent refused the sync journal"]
    a.beat(vms=[vm_info("vm-1", "web1")], items=[{"item_id": item_id, "report": rep}])
    r = runner.invoke(app, ["items", "show", item_id, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sync"] == {
        "mode": "sync", "budget_ms": 120, "state": "suspended",
        "reason": "the recovery agent refused the sync journal"}
    r = runner.invoke(app, ["items", "show", item_id])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "sync, 120 ms budget" in flat and "suspended: the recovery agent refused" in flat, \
        r.output
    a.beat(vms=[vm_info("vm-1", "web1")], items=[{"item_id": item_id, "report": report(
        item_id, "vm-1", "web1", last_cycle={"seal": 0.01, "ship": 5.04, "commit": 1.2,
                                             "total": 6.3})}])
    r = runner.invoke(app, ["items", "show", item_id])
    flat = " ".join(r.output.split())
    assert "in sync" in flat, r.output
    # where the last cycle's time went (ItemReport.last_cycle)
    assert "last cycle: 6.3 s: ship 5.0 · commit 1.2" in flat, r.output
