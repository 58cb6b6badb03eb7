"""Trust boundaries of the vault's API (issue 11), through the real FastAPI app on SQLite and
PostgreSQL: registration never takes over an existing host (re-issuing a certificate is an
explicit admin action), and a heartbeat is believed only for the items its host owns, with
point removals explained by the item's retention rule or an operation the vault ordered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from drsite import tlsutil
from drsite.agent.process import agent_register
from drsite.agent.registration import AgentIdentity
from drsite.cli.main import app
from drsite.core.errors import Conflict
from drsite.pki import make_key_and_csr
from drsite.replication.report import ItemState
from drsite.vault.app import create_app
from drsite.vault.context import Vault
from drsite.vault.settings import VaultSettings
from drsite.vault.testing import Agent, Harness, point, report, vm_info
from tests.integration.test_vault_api import err, policy_and_group, protect, snapshot, two_sites
from tests.integration.test_vault_failover_api import fo_result, play, setup

ENGINES = ["sqlite", "postgresql"]
VMS = [vm_info("vm-1", "web1"), vm_info("vm-2", "db1", labels=["db"])]


@pytest.fixture(params=ENGINES)
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


def register_raw(h: Harness, key: str, host_name: str, **extra: Any) -> Any:
    _key_pem, csr = make_key_and_csr(host_name)
    return h.client.post("/api/v1/agent/register",
                         json={"key": key, "host_name": host_name, "csr_pem": csr.decode(), **extra})


def as_agent(h: Harness, r: Any, site: str, host_name: str) -> Agent:
    assert r.status_code == 201, r.text
    body = r.json()
    return Agent(h, body["host_id"], site, host_name, body["cert_pem"].encode())


def site_key(h: Harness, site: str = "prim") -> str:
    return str(h.ok("POST", f"/sites/{site}/registration-keys", json={"ttl_s": 600})["key"])


def catalogue(h: Harness, item_id: str) -> list[str]:
    return [p["point_id"] for p in h.entries(f"/items/{item_id}/points")]


def beat_item(agent: Agent, item_id: str, *, new: list[dict[str, Any]] | None = None,
              removed: list[str] | None = None, state: ItemState = ItemState.PROTECTED,
              vms: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return agent.beat(vms=vms, items=[{"item_id": item_id,
                                       "report": report(item_id, "vm-1", "web1", state=state),
                                       "new_points": new or [], "removed_points": removed or []}])


def security_alerts(h: Harness) -> list[dict[str, Any]]:
    return [a for a in h.entries("/alerts?state=active") if a["kind"] == "security"]


# ------------------------------------------------------------------- registration, reissue

def test_registration_never_takes_over_an_existing_host(h: Harness) -> None:
    a, _b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    h.clock.advance(31)
    h.tick()  # a cycle is due for the item: the vault queues it for hv1
    before = snapshot(h)
    # an attacker with a fresh site key registers a new agent under hv1's name
    r = register_raw(h, site_key(h), "hv1")
    body = err(r, 409, "conflict")
    assert "hv1" in body["message"] and "drsite hosts reissue hv1" in body["hint"]
    assert snapshot(h) == before
    # the real agent is not cut off and keeps its commands
    reply = a.beat(vms=VMS)
    assert [c["kind"] for c in reply["commands"] if c["item_id"] == item_id] == ["cycle"]
    assert h.ok("GET", f"/hosts/{a.host_id}")["up"] is True
    # a revoked host's name may be registered again (the admin's revocation is the decision)
    h.ok("DELETE", f"/hosts/{a.host_id}")
    again = as_agent(h, register_raw(h, site_key(h), "hv1"), "prim", "hv1")
    assert again.host_id == a.host_id and h.ok("GET", f"/hosts/{a.host_id}")["revoked"] is False
    assert again.beat()["commands"] is not None


def test_reissue_gives_a_one_time_key_for_that_host_only(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    op, ro = h.token("operator", "op"), h.token("reader", "ro")
    err(h.call("POST", f"/hosts/{a.host_id}/reissue", token=op, json={}), 403, "forbidden")
    err(h.call("POST", f"/hosts/{a.host_id}/reissue", token=ro, json={}), 403, "forbidden")
    err(h.call("POST", f"/hosts/{a.host_id}/reissue", token=None, json={}), 401)
    err(h.call("POST", "/hosts/h-unknown/reissue", json={}), 404, "not_found")
    err(h.call("POST", f"/hosts/{a.host_id}/reissue", json={"ttl_s": 5}), 400, "invalid_input")
    out = h.ok("POST", f"/hosts/{a.host_id}/reissue", json={"ttl_s": 600})
    assert out["key"].startswith("drsk_") and out["host_id"] == a.host_id
    assert out["host"] == "hv1" and out["expires_at"] == h.clock.now() + 600
    key = out["key"]
    # valid for hv1 only: not for another name, not to replace another host
    err(register_raw(h, key, "hv-new"), 400, "invalid_input")
    err(register_raw(h, key, "hv1", host_id=b.host_id), 409, "conflict")
    assert [x["name"] for x in h.ok("GET", "/hosts")] == ["hv1", "hv2"]
    # a site key cannot be used to replace a certificate either
    err(register_raw(h, site_key(h), "hv1", host_id=a.host_id), 409, "conflict")
    # on the host: the key replaces hv1's certificate; the old one stops working at once
    new = as_agent(h, register_raw(h, key, "hv1", host_id=a.host_id), "prim", "hv1")
    assert new.host_id == a.host_id
    err(a.post("/heartbeat", {"host_name": "hv1", "vms": [], "items": []}), 401, "auth_failed")
    assert new.beat(vms=VMS)["ack"] == {}
    assert h.ok("GET", f"/items/{item_id}")["source_host_id"] == a.host_id
    # one-time
    err(register_raw(h, key, "hv1"), 401, "auth_failed")
    # and expiring
    late = h.ok("POST", f"/hosts/{a.host_id}/reissue", json={"ttl_s": 60})["key"]
    h.clock.advance(61)
    err(register_raw(h, late, "hv1"), 401, "auth_failed")
    assert new.beat()["commands"] is not None


# --------------------------------------------------------------- what a heartbeat may claim

def test_a_host_cannot_report_or_remove_points_of_an_item_it_does_not_own(h: Harness) -> None:
    a, b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    t = h.clock.now()
    beat_item(a, item_id, new=[point(item_id, 2, t + 1), point(item_id, 3, t + 2)], vms=VMS)
    assert catalogue(h, item_id) == ["p000001", "p000002", "p000003"]
    other = as_agent(h, register_raw(h, site_key(h), "hv3"), "prim", "hv3")  # same site
    for hostile in (b, other):
        reply = beat_item(hostile, item_id, state=ItemState.CRITICAL,
                          new=[point(item_id, 9, t + 3)], removed=["p000001", "p000002", "p000003"])
        assert reply["ack"] == {}
    assert catalogue(h, item_id) == ["p000001", "p000002", "p000003"]
    item = h.ok("GET", f"/items/{item_id}")
    assert item["state"] == "protected" and item["report"]["state"] == "protected"
    alerts = security_alerts(h)
    assert {(al["severity"], al["subject"]) for al in alerts} == {("critical", "hv2"), ("critical", "hv3")}
    assert all(item_id in al["message"] and "does not own" in al["message"] for al in alerts)
    # an item id the vault does not know: ignored and alerted the same way
    beat_item(other, "i-unknown")
    assert any("i-unknown" in al["message"] for al in security_alerts(h))
    # alerts stay open across health passes until an operator has seen them
    h.tick()
    assert len(security_alerts(h)) == 3
    for al in security_alerts(h):
        h.ok("POST", f"/alerts/{al['id']}/ack")
    h.tick()
    assert security_alerts(h) == []
    # the owner is believed
    assert beat_item(a, item_id, new=[point(item_id, 4, t + 4)])["ack"] == {item_id: 4}


def test_a_removal_must_be_explained_by_the_retention_rule(h: Harness) -> None:
    a, _b = two_sites(h)
    policy_and_group(h, retention_hours=24)  # keep all 1 h, then one point per hour for 24 h
    item_id = protect(h, a)
    t = h.clock.now()
    beat_item(a, item_id, new=[point(item_id, s, t + 30 * (s - 1)) for s in range(2, 6)])
    everything = ["p000001", "p000002", "p000003", "p000004", "p000005"]
    assert catalogue(h, item_id) == everything
    # young points: retention keeps them all, so their removal is refused (and alerted)
    beat_item(a, item_id, removed=["p000002"])
    assert catalogue(h, item_id) == everything
    (alert,) = security_alerts(h)
    assert alert["subject"] == "web1" and "p000002" in alert["message"]
    assert "retention" in alert["message"]
    # two hours later the points of one hour are thinned to the newest of that hour: removing
    # the others is explained; the newest point is never removable
    h.clock.advance(2 * 3600)
    reply = beat_item(a, item_id, removed=["p000001", "p000002", "p000003", "p000005"])
    kept = catalogue(h, item_id)
    assert kept == ["p000004", "p000005"]  # p000005: the newest point, p000004: not removed
    assert reply["ack"] == {item_id: 5}
    # after the retention window every point but the newest may go
    h.clock.advance(25 * 3600)
    beat_item(a, item_id, removed=kept)
    assert catalogue(h, item_id) == ["p000005"]


def test_removals_the_vault_ordered_are_accepted(h: Harness) -> None:
    a, _b = two_sites(h)
    policy_and_group(h)
    item_id = protect(h, a)
    t = h.clock.now()
    beat_item(a, item_id, new=[point(item_id, 2, t + 1), point(item_id, 3, t + 2)])
    h.ok("DELETE", f"/items/{item_id}?delete_points=true")
    h.tick()
    cmd = next(c for c in a.beat()["commands"] if c["kind"] == "unprotect")
    assert cmd["args"] == {"delete_points": True}
    beat_item(a, item_id, removed=["p000001", "p000002", "p000003"])
    assert catalogue(h, item_id) == []
    assert security_alerts(h) == []


# ------------------------------------------------- the same over HTTPS, with the real CLI

@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Vault]]:
    settings = VaultSettings(data_dir=tmp_path / "vault", loop_interval=0.05)
    app = create_app(settings)
    vault: Vault = app.state.vault
    handle = tlsutil.start_in_thread(app, host="127.0.0.1", port=0, certfile=vault.tls.cert,
                                     keyfile=vault.tls.key, cafile=vault.tls.ca,
                                     client_cert="optional")
    try:
        yield handle.url, vault
    finally:
        handle.stop()
        vault.close()


def test_cli_reissue_then_agent_register_replaces_the_certificate(
        served: tuple[str, Vault], tmp_path: Path) -> None:
    url, vault = served
    ca = vault.tls.ca
    admin = (vault.settings.data_dir / "admin.token").read_text().strip()
    runner = CliRunner()
    opts = ["--vault", url, "--token", admin, "--ca-file", str(ca)]
    assert runner.invoke(app, ["sites", "create", "prim", *opts]).exit_code == 0
    key = runner.invoke(app, ["vault", "registration-key", "--site", "prim", *opts]).output.strip()
    data = tmp_path / "agent"
    r = runner.invoke(app, ["agent", "register", "--vault", url, "--key", key, "--data", str(data),
                            "--name", "hv1", "--ca-file", str(ca)])
    assert r.exit_code == 0, r.output
    ident = AgentIdentity.load(data)
    old = tmp_path / "old"
    old.mkdir()
    for f in ("agent.key", "agent.pem"):
        (old / f).write_bytes((data / f).read_bytes())

    def beat(d: Path) -> int:
        with httpx.Client(base_url=url + "/api/v1/agent",
                          verify=tlsutil.client_context(ca, d / "agent.pem", d / "agent.key")) as c:
            return c.post("/heartbeat", json={"host_name": "hv1", "vms": [], "items": []}).status_code

    assert beat(data) == 200
    # a second agent with a site key under the same name: refused, with the command to use
    thief = tmp_path / "thief"
    key2 = runner.invoke(app, ["vault", "registration-key", "--site", "prim", *opts]).output.strip()
    with pytest.raises(Conflict) as ei:
        agent_register(url, key2, thief, "hv1", ca_file=ca)
    assert "drsite hosts reissue hv1" in ei.value.hint
    assert not (thief / "agent.json").exists() and beat(data) == 200
    # the admin's re-issue key, used on the host itself, replaces the certificate
    r = runner.invoke(app, ["hosts", "reissue", "hv1", *opts])
    assert r.exit_code == 0, r.output
    reissue = r.output.strip()
    assert reissue.startswith("drsk_")
    r = runner.invoke(app, ["agent", "register", "--vault", url, "--key", reissue, "--data", str(data)])
    assert r.exit_code == 0, r.output
    assert "re-registered" in r.output and "restart" in r.output
    assert AgentIdentity.load(data) == ident
    assert beat(data) == 200 and beat(old) == 401
    # the key was one-time
    r = runner.invoke(app, ["agent", "register", "--vault", url, "--key", reissue, "--data", str(data)])
    assert r.exit_code != 0
    assert beat(data) == 200
    # all of it is in the audit trail, from 127.0.0.1, as 'drsite audit list' shows it
    r = runner.invoke(app, ["audit", "list", "--json", "--all", "--limit", "5", *opts])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert all(e["client"] == "127.0.0.1" for e in rows)
    regs = [(e["outcome"], e["detail"].get("via"), e["error_code"]) for e in rows
            if e["action"] == "POST /api/v1/agent/register"]
    assert regs == [("refused", None, "auth_failed"), ("ok", "re-issue key", None),
                    ("refused", "site key", "conflict"), ("ok", "site key", None)]
    assert [e["target"] for e in rows if e["action"] == "POST /api/v1/hosts/{host_id}/reissue"] == \
        [f"host_id={ident.host_id}"]
    r = runner.invoke(app, ["audit", "list", "--actor", ident.host_id, "--since", "1h", "--json",
                            *opts])
    assert r.exit_code == 0, r.output
    mine = json.loads(r.output)
    assert {e["actor"] for e in mine} == {ident.host_id}
    assert [(e["action"], e["outcome"]) for e in mine] == [
        ("POST /api/v1/agent/heartbeat", "refused"),  # the old certificate, once
        ("POST /api/v1/agent/register", "ok"), ("POST /api/v1/agent/register", "ok")]
    r = runner.invoke(app, ["audit", "list", "--since", "yesterday", *opts])
    assert r.exit_code != 0
    for secret in (key, key2, reissue, admin):
        assert secret not in json.dumps(rows)


def test_a_failover_commit_explains_removing_every_other_point(h: Harness) -> None:
    a, b, item_id = setup(h)
    t = h.clock.now()
    beat_item(a, item_id, new=[point(item_id, 2, t + 1), point(item_id, 3, t + 2)], vms=VMS)
    h.ok("POST", f"/items/{item_id}/failover/planned-failover", json={})
    play(h, a, "failover_prepare", {"point_id": "p000002", "fingerprints": {"d0": "x"}})
    play(h, b, "failover", fo_result("pending_commit", point_id="p000002"))
    # before the commit is ordered, the failover's point and the newest stay
    beat_item(a, item_id, removed=["p000002", "p000003"])
    assert catalogue(h, item_id) == ["p000001", "p000002", "p000003"]
    h.ok("POST", f"/items/{item_id}/failover/commit", json={"create_reverse_mapping": True})
    play(h, b, "failover_commit", fo_result("committed", point_id="p000002"))
    beat_item(a, item_id, removed=["p000001", "p000002", "p000003"])
    assert catalogue(h, item_id) == ["p000002"]
