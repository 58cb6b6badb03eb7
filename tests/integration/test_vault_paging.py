"""List endpoints a page at a time (issue 13 part 4), on SQLite and PostgreSQL: every page of
``/items``, ``/jobs``, ``/alerts``, ``/events``, ``/audit`` and ``/items/{id}/points`` is
``{"entries", "total", "limit", "next_cursor"}`` in a stable order; rows inserted while a
client pages neither repeat nor shift a page; filters narrow the total; bad limits, cursors and
filter values are refused (400)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from drsite import tlsutil
from drsite.cli.main import app as cli
from drsite.pki import make_key_and_csr
from drsite.replication.report import Health
from drsite.vault.api.paging import encode_cursor
from drsite.vault.app import create_app
from drsite.vault.context import Vault
from drsite.vault.db.models import Item
from drsite.vault.settings import VaultSettings
from drsite.vault.testing import Agent, Harness, point, report, vm_info

N_VMS = 23


@pytest.fixture(params=["sqlite", "postgresql"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    hh = Harness(tmp_path / "vault", url)
    yield hh
    hh.close()


def vms(n: int, prefix: str = "vm") -> list[dict[str, Any]]:
    return [vm_info(f"{prefix}-{i:03d}", f"{prefix}{i:03d}", labels=["all"]) for i in range(n)]


def fleet(h: Harness) -> tuple[Agent, Agent, Agent]:
    """Two source hosts (``hv1``: N_VMS VMs, ``hv2``: 3) protected under a policy, and a
    recovery-site host with a store."""
    h.site("prim")
    h.site("sec")
    a, b, dr = h.register("prim", "hv1"), h.register("prim", "hv2"), h.register("sec", "dr1")
    assert h.set_store("sec", "dr1").status_code == 200
    dr.beat(store_url="https://127.0.0.1:9443")
    a.beat(vms=vms(N_VMS))
    b.beat(vms=vms(3, "db"))
    h.ok("POST", "/policies", json={"name": "p", "frequency_s": 300})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec",
                                   "policy": "p", "match": {"labels": ["all"]}})
    h.tick()
    for _ in range(2):  # the store agent receives the items' access list, then confirms it
        dr.beat(store_url="https://127.0.0.1:9443")
    h.tick()
    return a, b, dr


def pages(h: Harness, path: str, limit: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Every entry, page by page; the totals each page reported."""
    sep = "&" if "?" in path else "?"
    out: list[dict[str, Any]] = []
    totals: list[int] = []
    cursor = None
    while True:
        pg = h.ok("GET", f"{path}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
        assert set(pg) - {"next_before"} == {"entries", "total", "limit", "next_cursor"}
        assert pg["limit"] == limit and len(pg["entries"]) <= limit
        out.extend(pg["entries"])
        totals.append(pg["total"])
        cursor = pg["next_cursor"]
        if cursor is None:
            return out, totals


def bad(h: Harness, path: str, status: int = 400, code: str = "invalid_input") -> None:
    r = h.call("GET", path)
    assert r.status_code == status, f"{path}: {r.status_code} {r.text}"
    assert r.json()["code"] == code


def test_items_pages_filters_and_stable_cursor(h: Harness) -> None:
    a, b, _dr = fleet(h)
    n = N_VMS + 3
    items, totals = pages(h, "/items", 10)
    assert totals == [n, n, n] and len(items) == n
    assert [i["vm_name"] for i in items] == sorted(i["vm_name"] for i in items)
    assert len({i["id"] for i in items}) == n
    # a VM that sorts first appears while a client pages: the next page is not shifted
    first = h.ok("GET", "/items?limit=10")
    b.beat(vms=[*vms(3, "db"), vm_info("aa-new", "aa-new", labels=["all"])])
    h.tick()
    second = h.ok("GET", f"/items?limit=10&cursor={first['next_cursor']}")
    assert second["total"] == n + 1
    assert second["entries"][0]["vm_name"] == items[10]["vm_name"]
    assert not {i["id"] for i in first["entries"]} & {i["id"] for i in second["entries"]}
    # filters narrow the total
    assert h.ok("GET", "/items?host=hv2")["total"] == 4
    assert h.ok("GET", f"/items?host={b.host_id}")["total"] == 4
    assert h.ok("GET", "/items?site=prim&limit=1")["total"] == n + 1
    assert h.ok("GET", "/items?target_site=sec")["total"] == n + 1
    assert h.ok("GET", "/items?site=sec")["total"] == 0
    assert h.ok("GET", "/items?group=g1")["total"] == n + 1
    assert [i["vm_name"] for i in h.ok("GET", "/items?q=DB00")["entries"]] == ["db000", "db001",
                                                                               "db002"]
    assert h.ok("GET", "/items?q=%25")["total"] == 0  # a literal %, not a wildcard
    assert h.ok("GET", "/items?protection=enabling")["total"] == n + 1
    assert h.ok("GET", "/items?protection=protected")["total"] == 0
    # protect one VM: state, health
    (vm0,) = [i for i in items if i["vm_name"] == "vm000"]
    reply = a.beat(vms=vms(N_VMS))
    (cmd,) = [c for c in reply["commands"] if c["item_id"] == vm0["id"]]
    a.beat(vms=vms(N_VMS), items=[{"item_id": vm0["id"],
                                   "report": report(vm0["id"], "vm-000", "vm000",
                                                    last_point_time=h.clock.now()),
                                   "new_points": [point(vm0["id"], 1, h.clock.now())]}])
    a.result(cmd["command_id"], "succeeded")
    h.tick()
    assert [i["id"] for i in h.ok("GET", "/items?state=protected")["entries"]] == [vm0["id"]]
    with h.vault.db.tx() as s:  # one item critical (as the health pass would store it)
        s.execute(update(Item).where(Item.id == items[1]["id"])
                  .values(health=Health.CRITICAL.value, state="critical",
                          critical_error={"message": "x"}))
    assert [i["id"] for i in h.ok("GET", "/items?health=critical")["entries"]] == [items[1]["id"]]
    assert [i["id"] for i in h.ok("GET", "/items?state=critical")["entries"]] == [items[1]["id"]]
    # refused
    for path in ("/items?limit=0", "/items?limit=1001", "/items?cursor=garbage",
                 "/items?cursor=" + encode_cursor(["only one value"]),
                 "/items?cursor=" + "A" * 600, "/items?health=bad", "/items?state=nope",
                 "/items?protection=x", "/items?q=" + "x" * 65, "/items?host=bad%20name"):
        bad(h, path)
    bad(h, "/items?site=nowhere", 404, "not_found")  # an unknown site is not found, like everywhere
    bad(h, "/items?limit=x", 422)


def test_jobs_events_alerts_and_audit_pages(h: Harness) -> None:
    fleet(h)
    t_mid = h.clock.now()
    jobs, totals = pages(h, "/jobs", 7)
    n_jobs = N_VMS + 3 + 1  # EnableProtection per VM, one PolicyAssociation
    assert totals == [n_jobs] * 4 and len(jobs) == n_jobs and len({j["id"] for j in jobs}) == n_jobs
    keys = [(j["created_at"], j["id"]) for j in jobs]
    assert keys == sorted(keys, reverse=True)  # newest first
    # new jobs while paging: page two still follows page one
    first = h.ok("GET", "/jobs?limit=5")
    h.clock.advance(10)
    h.ok("POST", "/policies", json={"name": "p2"})
    h.ok("POST", "/groups", json={"name": "g2", "site": "prim", "target_site": "sec",
                                   "policy": "p2"})
    second = h.ok("GET", f"/jobs?limit=5&cursor={first['next_cursor']}")
    assert second["total"] == n_jobs + 1
    assert [j["id"] for j in second["entries"]] == [j["id"] for j in jobs[5:10]]
    assert h.ok("GET", "/jobs?kind=PolicyAssociation")["total"] == 2
    assert h.ok("GET", f"/jobs?since={t_mid + 1}")["total"] == 1
    item_id = jobs[-1]["item_id"] or jobs[0]["item_id"]
    assert item_id is not None
    assert {j["item_id"] for j in h.ok("GET", f"/jobs?item={item_id}")["entries"]} == {item_id}
    # events
    events, totals = pages(h, "/events", 9)
    assert len(events) == totals[0] and len({e["id"] for e in events}) == len(events)
    assert [(e["at"], e["id"]) for e in events] == sorted(((e["at"], e["id"]) for e in events),
                                                          reverse=True)
    hosts = h.ok("GET", "/events?kind=host")
    assert hosts["total"] == 3 and {e["kind"] for e in hosts["entries"]} == {"host"}
    assert h.ok("GET", "/events?subject=hv1&kind=host")["total"] == 1
    assert h.ok("GET", f"/events?since={t_mid + 1}")["total"] >= 1
    # alerts: the agents stop; every host's alert, newest first
    h.clock.advance(3600)
    h.tick()
    alerts, totals = pages(h, "/alerts?state=active", 2)
    assert len(alerts) == totals[0] >= 3
    assert h.ok("GET", "/alerts?kind=agent_down")["total"] == 3
    assert h.ok("GET", "/alerts?severity=critical&state=active")["total"] == 0
    assert h.ok("GET", f"/alerts?since={h.clock.now() + 1}")["total"] == 0
    bad(h, "/alerts?severity=loud")
    bad(h, "/alerts?state=odd")
    bad(h, "/jobs?cursor=e30")
    # the audit trail: the same shape, plus before/next_before
    audit, totals = pages(h, "/audit", 4)
    assert len(audit) == totals[0] and [e["id"] for e in audit] == sorted(
        (e["id"] for e in audit), reverse=True)
    pg = h.ok("GET", "/audit?limit=3")
    assert pg["next_before"] == pg["entries"][-1]["id"]
    assert h.ok("GET", f"/audit?limit=3&before={pg['next_before']}")["entries"] == \
        h.ok("GET", f"/audit?limit=3&cursor={pg['next_cursor']}")["entries"]
    assert h.ok("GET", "/audit?outcome=refused")["total"] == 0
    bad(h, "/audit?outcome=maybe")


def test_points_pages(h: Harness) -> None:
    a, _b, _dr = fleet(h)
    item_id = h.ok("GET", "/items?q=vm000")["entries"][0]["id"]
    t0 = h.clock.now()
    pts = [point(item_id, i + 1, t0 + 10 * i, app=i % 5 == 0) for i in range(37)]
    a.beat(vms=vms(N_VMS), items=[{"item_id": item_id, "report": report(item_id, "vm-000",
                                                                          "vm000"),
                                   "new_points": pts}])
    got, totals = pages(h, f"/items/{item_id}/points", 10)
    assert totals == [37] * 4 and [p["seq"] for p in got] == list(range(1, 38))
    assert h.ok("GET", f"/items/{item_id}/points?consistency=app")["total"] == 8
    since = h.ok("GET", f"/items/{item_id}/points?since={t0 + 300}")
    assert [p["seq"] for p in since["entries"]] == list(range(31, 38))
    bad(h, f"/items/{item_id}/points?consistency=both")
    assert h.call("GET", "/items/i-nope/points").status_code == 404


# ------------------------------------------------------------- the CLI, over real HTTPS

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


def test_cli_pages_and_never_cuts_a_list_silently(served: tuple[str, Vault],
                                                  tmp_path: Path) -> None:
    url, vault = served
    ca = vault.tls.ca
    admin = (vault.settings.data_dir / "admin.token").read_text().strip()
    op = httpx.Client(base_url=url + "/api/v1", verify=tlsutil.client_context(ca),
                      headers={"Authorization": f"Bearer {admin}"})
    for site in ("prim", "sec"):
        op.post("/sites", json={"name": site}).raise_for_status()
    op.post("/policies", json={"name": "p"}).raise_for_status()
    op.post("/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p",
                             "match": {"labels": ["all"]}}).raise_for_status()
    key = op.post("/sites/prim/registration-keys", json={"ttl_s": 600}).json()["key"]
    key_pem, csr = make_key_and_csr("hv1")
    reg = httpx.post(url + "/api/v1/agent/register", verify=tlsutil.client_context(ca),
                     json={"key": key, "host_name": "hv1", "csr_pem": csr.decode()}).json()
    (tmp_path / "a.key").write_bytes(key_pem)
    (tmp_path / "a.pem").write_text(reg["cert_pem"])
    agent = tlsutil.client_context(ca, tmp_path / "a.pem", tmp_path / "a.key")
    httpx.post(url + "/api/v1/agent/heartbeat", verify=agent, json={
        "host_name": "hv1", "version": "t", "vms": vms(N_VMS), "items": []}).raise_for_status()
    runner = CliRunner()
    opts = ["--vault", url, "--token", admin, "--ca-file", str(ca)]
    r = runner.invoke(cli, ["items", "list", "--limit", "5", *opts])
    assert r.exit_code == 0, r.output
    assert f"showing 5 of {N_VMS} items" in r.output and "vm004" in r.output
    assert "vm005" not in r.output
    r = runner.invoke(cli, ["items", "list", "--all", *opts])
    assert r.exit_code == 0 and "showing" not in r.output and "vm022" in r.output
    r = runner.invoke(cli, ["items", "list", "--json", "--limit", "7", *opts])
    assert r.exit_code == 0
    assert len(json.loads(r.stdout)) == 7  # the JSON stays a list; the note goes to stderr
    assert f"showing 7 of {N_VMS} items" in r.stderr
    r = runner.invoke(cli, ["items", "list", "--json", "--search", "VM01", *opts])
    assert [i["vm_name"] for i in json.loads(r.stdout)] == [f"vm{i:03d}" for i in range(10, 20)]
    r = runner.invoke(cli, ["jobs", "list", "--limit", "3", "--kind", "EnableProtection", *opts])
    assert r.exit_code == 0 and f"showing 3 of {N_VMS} jobs" in r.output
    r = runner.invoke(cli, ["jobs", "list", "--json", "--all", *opts])
    assert len(json.loads(r.stdout)) == N_VMS + 1 and "showing" not in r.stderr
    r = runner.invoke(cli, ["items", "list", "--health", "sick", *opts])
    assert r.exit_code != 0 and "unknown health" in str(r.exception)
    # --sort sorts every matching item (all pages read), then --limit cuts
    r = runner.invoke(cli, ["items", "list", "--json", "--limit", "3", "--sort", "-vm_name", *opts])
    assert [i["vm_name"] for i in json.loads(r.stdout)] == [f"vm{i:03d}" for i in (22, 21, 20)]
    assert f"showing 3 of {N_VMS} items" in r.stderr
    # a --where the API filters stays paged; any other is applied to every page here
    r = runner.invoke(cli, ["items", "list", "--json", "--limit", "2", "--where", "STATE=x", *opts])
    assert r.exit_code != 0 and "STATE" in str(r.exception)  # no such field in the rows
    r = runner.invoke(cli, ["items", "list", "--json", "--where", "vm_name=VM017", *opts])
    assert [i["vm_name"] for i in json.loads(r.stdout)] == ["vm017"]
    r = runner.invoke(cli, ["jobs", "list", "--json", "--limit", "2", "--where", "state=Queued",
                            *opts])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) <= 2
