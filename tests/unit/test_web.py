"""The dashboard's routes with an in-process vault (TestClient): login and cookies, CSRF,
reader 403, every page and fragment (empty and populated), escaping, plans, and the SVG plots."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_vault_api import protect

from drsite.vault.db.models import Drill, Item, Job, Point, Task
from drsite.vault.testing import Agent, Harness, point, report, vm_info
from drsite.web import charts, fmt
from drsite.web.routes import router as dashboard
from drsite.web.session import COOKIE, csrf_for

VMS = [vm_info("vm-1", "web1"), vm_info("vm-2", "db1")]
PAGES = ["/ui", "/ui/vms", "/ui/jobs", "/ui/jobs?state=active", "/ui/alerts", "/ui/alerts?state=active",
         "/ui/plans", "/ui/drills", "/ui/drills?plan=tier1", "/ui/policies"]
FRAGMENTS = ["/ui/f/overview", "/ui/f/vms", "/ui/f/jobs", "/ui/f/jobs?state=failed", "/ui/f/alerts",
             "/ui/f/plans", "/ui/f/drills", "/ui/f/policies"]


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    # agents stay "up" under the fake clock
    hh = Harness(tmp_path / "vault", routers=[dashboard], heartbeat_interval=600.0)
    yield hh
    hh.close()


def login(h: Harness, token: str) -> str:
    """Log the harness's client in; the session's CSRF token."""
    h.client.cookies.clear()
    r = h.client.post("/ui/login", data={"token": token, "next": "/ui"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf_for(token)


def populate(h: Harness) -> str:
    """Two sites, a protected VM with crash and app-consistent points; the item id."""
    return populate_agent(h)[0]


def populate_agent(h: Harness) -> tuple[str, Agent]:
    """:func:`populate`, and the VM's host as the vault sees it."""
    h.site("prim")
    h.site("sec")
    a, b = h.register("prim", "hv1"), h.register("sec", "hv2")
    assert h.set_store("sec", "hv2").status_code == 200
    a.beat(vms=VMS)
    b.beat(store_url="https://127.0.0.1:9443")
    h.ok("POST", "/policies", json={"name": "p1", "frequency_s": 30, "rpo_threshold_s": 120})
    h.ok("POST", "/groups", json={"name": "g1", "site": "prim", "target_site": "sec", "policy": "p1"})
    item_id = protect(h, a)  # its EnableProtection job played to the end
    map_networks(h)
    for seq in range(1, 9):
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": report(item_id, "vm-1", "web1"),
                                "new_points": [point(item_id, seq, h.clock.now(), app=seq % 4 == 0,
                                                     nbytes=1 << 20)]}])
        h.tick()
        h.clock.advance(30)
    return item_id, a


def map_networks(h: Harness) -> int:
    """Map the VM's network ``lan`` to the recovery site (``dr``, test network ``bubble``): a
    failover of an unmapped NIC is refused. The mapping's id."""
    out: dict[str, Any] = h.ok("PUT", "/network-mappings", json={
        "source_site": "prim", "recovery_site": "sec", "source_network": "lan",
        "recovery_network": "dr", "test_network": "bubble"})
    return int(out["id"])


def add_failed_job(h: Harness) -> str:
    now = h.clock.now()
    with h.vault.db.tx() as s:
        s.add(Job(id="job-failed-1", kind="Resync", state="failed", target="web1", item_id=None, args={},
                  progress=50.0, message="failed", created_at=now - 60, started_at=now - 60,
                  ended_at=now - 10, updated_at=now,
                  error={"code": "broken_chain", "class": "permanent", "message": "the chain is <broken>",
                         "hint": "Run a resync by hand to repair the item."}))
        s.add(Task(job_id="job-failed-1", idx=0, name="start_resync", title="Start resynchronization",
                   state="succeeded", progress=100.0, message="sent", data={}, started_at=now - 60,
                   ended_at=now - 50))
        s.add(Task(job_id="job-failed-1", idx=1, name="resync", title="Resynchronize by checksums",
                   state="failed", progress=0.0, message="agent said: chain broken", data={},
                   started_at=now - 50, ended_at=now - 10))
    return "job-failed-1"


def add_plan(h: Harness, description: str = "web tier") -> None:
    h.ok("POST", "/plans", json={"plans": [{
        "name": "tier1", "description": description,
        "groups": [{"name": "web", "vms": ["web1"], "pre": [{"manual": "Tell the DBA"}],
                    "post": [{"script": "echo done", "on": "vault", "timeout_s": 30}]}]}]})


# ------------------------------------------------------------------------------------ auth

def test_root_redirects_and_pages_need_a_session(h: Harness) -> None:
    r = h.client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui"
    r = h.client.get("/ui/vms", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fvms"
    r = h.client.get("/ui/f/overview", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["HX-Redirect"] == "/ui/login?next=%2Fui"
    # a live fragment's session ends: back to the page it belongs to after the login
    r = h.client.get("/ui/f/items/i-1?window=6h", headers={
        "HX-Request": "true", "HX-Current-URL": "http://testserver/ui/items/i-1?window=6h"})
    assert r.status_code == 401
    assert r.headers["HX-Redirect"] == "/ui/login?next=%2Fui%2Fitems%2Fi-1%3Fwindow%3D6h"
    r = h.client.get("/ui/login")
    assert r.status_code == 200 and 'name="token"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


def test_wrong_token_is_refused_with_a_clear_message(h: Harness) -> None:
    r = h.client.post("/ui/login", data={"token": "drst_not-a-real-token"}, follow_redirects=False)
    assert r.status_code == 401
    assert "That token was not accepted" in r.text
    assert "drst_not-a-real-token" not in r.text  # a presented secret is never echoed
    assert COOKIE not in r.headers.get("set-cookie", "")
    r = h.client.post("/ui/login", data={"token": ""}, follow_redirects=False)
    assert r.status_code == 401 and "Enter an API token" in r.text


def test_login_sets_a_strict_httponly_cookie_and_logout_clears_it(h: Harness) -> None:
    r = h.client.post("/ui/login", data={"token": h.admin, "next": "/ui/jobs"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Path=/ui" in cookie
    page = h.client.get("/ui")
    assert page.status_code == 200 and "admin" in page.text
    assert h.admin not in page.text  # the secret is never rendered
    csrf = csrf_for(h.admin)
    assert csrf in page.text and csrf != h.admin
    # an open redirect is not possible through ?next=
    r = h.client.post("/ui/login", data={"token": h.admin, "next": "//evil.example/x"},
                      follow_redirects=False)
    assert r.headers["location"] == "/ui"
    # logout needs the CSRF token
    assert h.client.post("/ui/logout", data={}, follow_redirects=False).status_code == 403
    r = h.client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    h.client.cookies.clear()
    assert h.client.get("/ui", follow_redirects=False).status_code == 303


def test_a_deleted_token_ends_its_sessions(h: Harness) -> None:
    tok = h.token("operator", "ops")
    login(h, tok)
    assert h.client.get("/ui/vms").status_code == 200
    h.ok("DELETE", "/tokens/ops")
    assert h.client.get("/ui/vms", follow_redirects=False).status_code == 303


# ------------------------------------------------------------------------- pages, fragments

def test_every_page_and_fragment_renders_with_an_empty_database(h: Harness) -> None:
    login(h, h.admin)
    for url in PAGES + FRAGMENTS:
        r = h.client.get(url)
        assert r.status_code == 200, (url, r.text[:500])
        assert "Traceback" not in r.text
    overview = h.client.get("/ui").text
    assert 'hx-get="/ui/f/overview"' in overview and 'hx-trigger="every 2s"' in overview
    assert "No site yet" in overview and "No open alert" in overview


def test_pages_show_the_vault_state(h: Harness) -> None:
    item_id = populate(h)
    login(h, h.admin)
    overview = h.client.get("/ui").text
    assert "prim" in overview and "sec" in overview and "hv1" in overview
    assert f"/ui/items/{item_id}" in overview  # worst RPOs link to the VM
    vms = h.client.get("/ui/vms").text
    assert "web1" in vms and "db1" in vms  # protected, and the unprotected inventory
    assert re.search(r"\d+\.\d KiB/s", vms)  # churn over the last hour
    assert '<time datetime="' in vms and "ago" in vms and "UTC" in vms
    page = h.client.get(f"/ui/items/{item_id}").text
    assert page.count("<svg") >= 2
    assert 'class="chart rpo wide"' in page and 'class="chart timeline wide"' in page
    assert 'class="chart rpo narrow"' in page  # the phone form, shown by the stylesheet
    assert "mark mark-app" in page and "mark mark-crash" in page
    assert "threshold 2 min" in page and "time (UTC)" in page
    assert h.client.get(f"/ui/items/{item_id}?window=15m").status_code == 200
    assert h.client.get(f"/ui/f/items/{item_id}?window=bogus").status_code == 200
    assert h.client.get("/ui/items/nope").status_code == 404
    jobs = h.client.get("/ui/jobs").text
    assert "EnableProtection" in jobs and "<progress" in jobs


def test_job_drill_down_shows_tasks_and_the_errors_hint(h: Harness) -> None:
    populate(h)
    job_id = add_failed_job(h)
    login(h, h.admin)
    r = h.client.get(f"/ui/jobs/{job_id}")
    assert r.status_code == 200
    assert "Resynchronize by checksums" in r.text and "agent said: chain broken" in r.text
    assert "Run a resync by hand to repair the item." in r.text
    assert "the chain is &lt;broken&gt;" in r.text and "<broken>" not in r.text  # escaped
    frag = h.client.get(f"/ui/f/jobs/{job_id}").text
    assert "What to do:" in frag and 'hx-get' not in frag
    assert h.client.get("/ui/jobs/no-such-job").status_code == 404


# ------------------------------------------------------------------------------ CSRF, roles

def running_job(h: Harness) -> str:
    jobs = h.entries("/jobs?state=active")
    if jobs:
        return str(jobs[0]["id"])
    h.ok("POST", "/items", json={"vm_id": "vm-2", "group": "g1"})
    return str(h.entries("/jobs?state=active")[0]["id"])


def test_posts_need_the_sessions_csrf_token_and_the_same_origin(h: Harness) -> None:
    populate(h)
    job_id = running_job(h)
    csrf = login(h, h.admin)
    url = f"/ui/jobs/{job_id}/cancel"
    assert h.client.post(url, data={}, follow_redirects=False).status_code == 403
    assert h.client.post(url, data={"csrf": "0" * 64}, follow_redirects=False).status_code == 403
    r = h.client.post(url, data={"csrf": csrf}, headers={"Origin": "https://evil.example"},
                      follow_redirects=False)
    assert r.status_code == 403
    assert h.job(job_id)["cancel_requested"] is False
    # another token's CSRF value does not work either
    assert h.client.post(url, data={"csrf": csrf_for(h.token("operator"))},
                         follow_redirects=False).status_code == 403
    r = h.client.post(url, data={"csrf": csrf}, headers={"Origin": "http://testserver"},
                      follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{job_id}"
    assert h.job(job_id)["cancel_requested"] is True
    h.client.cookies.clear()
    assert h.client.post(url, data={"csrf": csrf}, follow_redirects=False).status_code == 401


def test_a_reader_sees_everything_and_can_press_nothing(h: Harness) -> None:
    item_id = populate(h)
    job_id = running_job(h)
    add_plan(h)
    csrf = login(h, h.token("reader", "audit"))
    for url in [*PAGES, *FRAGMENTS, f"/ui/items/{item_id}", f"/ui/jobs/{job_id}", "/ui/plans/tier1",
                "/ui/plans/tier1/test-failover", f"/ui/jobs/{job_id}/cancel"]:
        assert h.client.get(url).status_code == 200, url
    job_page = h.client.get(f"/ui/jobs/{job_id}").text
    assert re.search(r"<button[^>]*disabled[^>]*>Cancel job</button>", job_page)
    plan_page = h.client.get("/ui/plans/tier1").text
    buttons = re.findall(r"<button[^>]*>[^<]*</button>", plan_page)
    labels = [b for b in buttons if "Log out" not in b]
    assert len(labels) == 9 and all("disabled" in b for b in labels), labels  # 8 + drill
    assert "/ui/plans/tier1/test-failover" not in plan_page  # no link to act through either
    confirm = h.client.get("/ui/plans/tier1/test-failover").text
    assert re.search(r'<button type="submit" id="confirm"[^>]*disabled', confirm)
    for url in [f"/ui/jobs/{job_id}/cancel", "/ui/plans/tier1/test-failover", "/ui/alerts/1/ack",
                "/ui/plans/tier1/drill"]:
        r = h.client.post(url, data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 403, url
        assert "reader role" in r.text
    assert h.job(job_id)["cancel_requested"] is False
    assert all(j["kind"] != "RecoveryPlan" for j in h.entries("/jobs"))


# ---------------------------------------------------------------------------------- plans

def test_plan_page_and_an_operator_starting_a_test_failover(h: Harness) -> None:
    item_id = populate(h)
    add_plan(h, description="<script>alert(1)</script>")
    csrf = login(h, h.token("operator", "ops"))
    plans = h.client.get("/ui/plans").text
    assert "tier1" in plans and "&lt;script&gt;" in plans and "<script>alert" not in plans
    page = h.client.get("/ui/plans/tier1").text
    assert "Tell the DBA" in page and "echo done" in page and f"/ui/items/{item_id}" in page
    assert 'href="/ui/plans/tier1/planned-failover"' in page
    confirm = h.client.get("/ui/plans/tier1/test-failover").text
    assert "What will happen" in confirm and "isolated test network" in confirm
    assert 'value="latest_app"' in confirm
    r = h.client.post("/ui/plans/tier1/test-failover", data={"csrf": csrf, "point": "latest"},
                      follow_redirects=False)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job: dict[str, Any] = h.job(job_id)
    assert job["kind"] == "RecoveryPlan" and job["target"] == "tier1"
    # a second one is refused by the vault's own rule, shown on the confirmation page
    r = h.client.post("/ui/plans/tier1/test-failover", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 409 and "already has a job running" in r.text
    assert h.client.post("/ui/plans/tier1/test-failover", data={"csrf": csrf, "point": "bogus"},
                         follow_redirects=False).status_code == 400
    assert h.client.get("/ui/plans/tier1/explode").status_code == 404
    assert h.client.get("/ui/plans/nope").status_code == 404


def test_static_files(h: Harness) -> None:
    css = h.client.get("/ui/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    js = h.client.get("/ui/static/htmx.min.js")
    assert js.status_code == 200 and b"htmx" in js.content
    assert h.client.get("/ui/static/..%2Fdata.py").status_code == 404
    assert h.client.get("/ui/static/nope.js").status_code == 404


# ---------------------------------------------------------------------------- pure helpers

def test_rpo_series_is_a_sawtooth() -> None:
    pts = [{"created_at": t} for t in (100.0, 130.0, 160.0)]
    w = charts.Window(90.0, 200.0)
    s = charts.rpo_series(pts, w)
    assert s == [(100.0, 0.0), (130.0, 30.0), (130.0, 0.0), (160.0, 30.0), (160.0, 0.0), (200.0, 40.0)]
    # a point before the window carries the RPO into it
    assert charts.rpo_series(pts, charts.Window(140.0, 200.0))[0] == (140.0, 10.0)
    assert charts.rpo_series([], w) == []


def test_axes_ticks_and_windows() -> None:
    top, ticks = charts.value_ticks(130.0)
    assert top >= 130 and ticks[0] == 0 and ticks[-1] == top and len(ticks) <= 7
    w = charts.Window(0.0, 3600.0)
    t = charts.time_ticks(w)
    assert 3 <= len(t) <= 9 and all(0 <= x <= 3600 for x in t)
    key, win = charts.window_for("6h", 10_000.0, [{"created_at": 9_000.0}])
    assert key == "6h" and win.end == 10_000.0 and win.start < 9_000.0
    assert charts.window_for("bogus", 10_000.0, [])[0] == "1h"
    svg = str(charts.rpo_chart([], charts.Window(0, 600), 120.0))
    assert "no recovery point yet" in svg and "threshold" in svg


def test_churn_and_human_formats() -> None:
    pts = [{"created_at": 1000.0 + 10 * i, "bytes_written": 1000, "kind": "delta"} for i in range(4)]
    assert charts.churn(pts, 1100.0) == pytest.approx(3000 / 30)
    assert charts.churn(pts[:1], 1100.0) is None
    assert fmt.ago_text(100.0, 280.0) == "3 min ago"
    assert fmt.ago_text(None, 1.0) == "never" and fmt.ago_text(100.0, 100.5) == "just now"
    assert "title=\"1970-01-01 00:01:40 UTC\"" in str(fmt.ago(100.0, 280.0))
    assert fmt.size(3 * 1024 * 1024) == "3.0 MiB" and fmt.duration(7500) == "2 h 5 min"
    assert "badge crit" in str(fmt.badge("critical", "health"))


def test_a_job_waiting_for_an_operator_is_resumed_from_its_page(h: Harness) -> None:
    populate(h)
    add_plan(h)  # group "web": a manual pre action pauses the plan's failover
    csrf = login(h, h.admin)
    r = h.client.post("/ui/plans/tier1/test-failover", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    h.tick()
    h.tick()
    page = h.client.get(f"/ui/jobs/{job_id}").text
    assert 'id="waiting"' in page and "Tell the DBA" in page
    assert f'href="/ui/jobs/{job_id}/resume"' in page
    confirm = h.client.get(f"/ui/jobs/{job_id}/resume").text
    assert "paused at a manual step" in confirm
    r = h.client.post(f"/ui/jobs/{job_id}/resume", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{job_id}"
    h.tick()
    tasks = h.job(job_id)["tasks"]
    assert tasks[0]["state"] == "succeeded" and "operator confirmed" in tasks[0]["message"]
    # resuming again is refused by the vault's rule, shown on the confirmation page
    r = h.client.post(f"/ui/jobs/{job_id}/resume", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 409 and "not waiting for an operator" in r.text


def test_an_operator_acknowledges_an_alert(tmp_path: Path) -> None:
    # 2 s heartbeats: the agent goes down under the fake clock
    h = Harness(tmp_path / "vault", routers=[dashboard])
    try:
        h.site("prim")
        h.register("prim", "hv1").beat()
        h.clock.advance(30)
        h.tick()
        (alert,) = h.entries("/alerts?state=active")
        csrf = login(h, h.token("operator", "ops"))
        overview = h.client.get("/ui").text
        assert "hv1" in overview and "down" in overview
        page = h.client.get("/ui/alerts?state=active").text
        assert f'action="/ui/alerts/{alert["id"]}/ack"' in page
        r = h.client.post(f"/ui/alerts/{alert['id']}/ack", data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303
        assert h.entries("/alerts")[0]["acked_at"] is not None
        assert h.client.post("/ui/alerts/999/ack", data={"csrf": csrf}).status_code == 404
    finally:
        h.close()


# ---------------------------------------------------------------------------------- audit

def test_the_audit_page_is_for_admins_and_shows_dashboard_actions(h: Harness) -> None:
    populate(h)
    job_id = running_job(h)
    ops = h.token("operator", "ops")
    # an operator cancels a job from the dashboard: the audit trail names the token
    csrf = login(h, ops)
    assert h.client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf},
                         follow_redirects=False).status_code == 303
    assert 'href="/ui/audit"' not in h.client.get("/ui").text  # no link for a non-admin
    for url in ("/ui/audit", "/ui/f/audit"):
        r = h.client.get(url)
        assert r.status_code == 403 and "admin" in r.text
    h.client.post("/ui/login", data={"token": "drst_wrong"}, follow_redirects=False)
    csrf = login(h, h.admin)
    page = h.client.get("/ui/audit")
    assert page.status_code == 200 and 'href="/ui/audit"' in page.text
    assert 'hx-get="/ui/f/audit?actor=&amp;before="' in page.text
    rows = re.findall(r'<tr class="audit-row (\w+)" data-audit="(\d+)">', page.text)
    assert rows and all(outcome in ("ok", "refused", "failed") for outcome, _ in rows)
    assert "POST /ui/jobs/{job_id}/{action}" in page.text and f"job_id={job_id}" in page.text
    assert "POST /ui/login" in page.text  # the refused login, anonymous, and the admin's
    assert "drst_wrong" not in page.text and h.admin not in page.text and ops not in page.text
    mine = h.client.get("/ui/f/audit?actor=ops")
    assert mine.status_code == 200
    assert "POST /ui/jobs/{job_id}/{action}" in mine.text and "POST /api/v1/policies" not in mine.text
    entries = h.ok("GET", "/audit?actor=ops")["entries"]
    assert entries[0]["action"] == "POST /ui/jobs/{job_id}/{action}" and entries[0]["status"] == 303
    assert h.client.get("/ui/audit?before=x").status_code == 400
    older = h.client.get(f"/ui/audit?before={rows[-1][1]}")
    assert older.status_code == 200


def test_lists_say_how_many_of_how_many(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list cut to a page says so ("Showing a–b of M") and links the next page; nothing is
    cut without notice. The VM list reads the API's pages along their cursor
    (``ITEMS_PER_PAGE`` a request): in the API's order only up to the page shown, in another
    order every matching item."""
    from drsite.web import data, lists

    populate(h)
    login(h, h.admin)
    page = h.client.get("/ui/vms")
    assert "Showing 1–1 of 1 protected VMs" in page.text, page.text
    monkeypatch.setattr(data, "ITEMS_PER_PAGE", 1)
    monkeypatch.setattr(lists, "LIMITS", (1, *lists.LIMITS))
    h.ok("POST", "/items", json={"vm_id": "vm-2", "group": "g1"})
    page = h.client.get("/ui/vms?limit=1")
    assert "Showing 1–1 of 2 protected VMs" in page.text, page.text
    assert "db1" in page.text.split('id="items"')[1].split("</table>")[0]  # by VM name
    m = re.search(r'<a href="([^"]+)" rel="next">', page.text)
    assert m, page.text
    nxt = h.client.get(m.group(1).replace("&amp;", "&"))
    rows = nxt.text.split('id="items"')[1].split("</table>")[0]
    assert "web1" in rows and "db1" not in rows
    assert "Showing 2–2 of 2 protected VMs" in nxt.text
    every = h.client.get("/ui/vms").text  # two API pages of one item
    rows = every.split('id="items"')[1].split("</table>")[0]
    assert "Showing 1–2 of 2 protected VMs" in every and rows.index("db1") < rows.index("web1")
    desc = h.client.get("/ui/vms?sort=vm_name&order=desc").text  # sorted here, all pages read
    rows = desc.split('id="items"')[1].split("</table>")[0]
    assert "Showing 1–2 of 2 protected VMs" in desc and rows.index("web1") < rows.index("db1")
    jobs = h.client.get("/ui/jobs").text
    total = len(h.entries("/jobs"))
    assert f"Showing 1–{total} of {total} jobs" in jobs
    jobs = h.client.get("/ui/jobs?limit=1").text
    assert f"Showing 1–1 of {total} jobs" in jobs and 'rel="next"' in jobs
    overview = h.client.get("/ui").text
    assert f"({min(8, total)} of {total}: " in overview


# ------------------------------------------------------------------- scrub, verify, drills

def damage_item(h: Harness, item_id: str) -> list[str]:
    """The item's last scrub found a corrupt pack that two older points need; their ids."""
    now = h.clock.now()
    with h.vault.db.tx() as s:
        pts = s.query(Point).filter(Point.item_id == item_id).order_by(Point.seq).all()
        bad = [p.point_id for p in pts[:2]]
        for p in pts[:2]:
            p.damage = {"reason": "corrupt object packs/c1/ab<12>", "found_at": now - 5, "by": "scrub"}
        item = s.get(Item, item_id)
        assert item is not None
        item.last_scrub_at = now - 20
        item.scrub = {"at": now - 5, "host": "hv2", "complete": True, "objects_checked": 42,
                      "bytes_checked": 3 << 20, "seconds": 1.5, "packs_total": 4, "packs_done": 4,
                      "findings": [{"key": "packs/c1/ab12", "kind": "corrupt",
                                    "reason": "pack failed its hash check", "points": bad,
                                    "quarantined_to": "quarantine/packs/c1/ab12.17"}],
                      "findings_total": 1, "error": None}
    return bad


def test_item_page_shows_the_scrub_and_damaged_points(h: Harness) -> None:
    item_id = populate(h)
    login(h, h.admin)
    page = h.client.get(f"/ui/items/{item_id}").text
    assert 'id="scrub"' in page and "not scrubbed yet" in page and "none known" in page
    assert "every 1 d" in page  # the policy's default scrub interval
    bad = damage_item(h, item_id)
    h.tick()
    page = h.client.get(f"/ui/f/items/{item_id}").text
    assert "42 objects, 3.0 MiB checked" in page and "on hv2" in page
    assert "<b>2</b> cannot be restored and are refused for failover" in page
    assert all(f'data-point="{p}"' in page for p in bad)
    assert "ab&lt;12&gt;" in page and "ab<12>" not in page  # escaped
    assert "quarantine/packs/c1/ab12.17" in page
    assert "older recovery point(s) cannot be restored" in page  # the health reason
    with h.vault.db.tx() as s:
        item = s.get(Item, item_id)
        assert item is not None
        item.scrub = {**dict(item.scrub or {}), "error": {"message": "store unreachable",
                                                          "hint": "Check the store host."}}
    page = h.client.get(f"/ui/f/items/{item_id}").text
    assert "failed: store unreachable" in page and "Check the store host." in page


def test_an_operator_verifies_from_the_item_page(h: Harness) -> None:
    item_id = populate(h)
    csrf = login(h, h.token("operator", "ops"))
    page = h.client.get(f"/ui/items/{item_id}").text
    assert f'href="/ui/items/{item_id}/verify"' in page
    confirm = h.client.get(f"/ui/items/{item_id}/verify").text
    assert "What will happen" in confirm and "checking every piece of data" in confirm
    assert 'value="latest"' in confirm and 'value="all"' in confirm
    url = f"/ui/items/{item_id}/verify"
    assert h.client.post(url, data={"point": "all"}, follow_redirects=False).status_code == 403
    assert h.client.post(url, data={"csrf": csrf, "point": "some"},
                         follow_redirects=False).status_code == 400
    r = h.client.post(url, data={"csrf": csrf, "point": "all"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    job: dict[str, Any] = h.job(job_id)
    assert job["kind"] == "Verify" and job["item_id"] == item_id and job["target"] == "web1"
    with h.vault.db.read() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.args == {"points": "all"}
    assert h.client.get("/ui/items/nope/verify").status_code == 404
    r = h.client.post("/ui/items/nope/verify", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 404 and "no item" in r.text
    # a reader sees the button disabled and cannot post
    csrf = login(h, h.token("reader", "audit"))
    page = h.client.get(f"/ui/items/{item_id}").text
    assert re.search(r"<button[^>]*disabled[^>]*>Verify recovery points</button>", page)
    assert f'href="/ui/items/{item_id}/verify"' not in page
    r = h.client.post(url, data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403 and "reader role" in r.text
    assert len([j for j in h.entries("/jobs") if j["kind"] == "Verify"]) == 1


def add_drills(h: Harness, item_id: str) -> None:
    now = h.clock.now()
    vm = {"vm": "web1", "item_id": item_id, "test_vm": "web1-test", "failover_id": "f-1",
          "point_id": "p000000000007", "point_created_at": now - 100, "rpo_s": 42.0,
          "rto_s": 12.5, "to_running_s": 9.0, "guest_ready_after_s": 3.5, "verified": True,
          "image_source": "replica-copy", "guest_ready": True,
          "probe": {"rc": 0, "attempts": 1, "ok": True, "output": "HTTP/1.1 200 <ok>"},
          "ok": True, "reason": ""}
    bad = {**vm, "probe": {"rc": 7, "attempts": 3, "ok": False, "output": "refused"},
           "ok": False, "reason": "probe did not pass within 30 s (3 attempt(s), last exit code 7)"}
    with h.vault.db.tx() as s:
        s.add(Drill(id="d-pass", plan="tier1", job_id="j-1", state="passed", trigger="schedule",
                    report={"plan": "tier1", "ok": True, "vms": [vm], "cleaned_up": True,
                            "rto_s": 12.5, "rpo_s": 42.0}, started_at=now - 900, ended_at=now - 860))
        s.add(Drill(id="d-fail", plan="tier1", job_id="j-2", state="failed", trigger="hand",
                    report={"plan": "tier1", "ok": False, "vms": [bad], "cleaned_up": True,
                            "rto_s": None, "rpo_s": 42.0}, started_at=now - 300, ended_at=now - 250))
        s.add(Drill(id="d-other", plan="other", job_id=None, state="running", trigger="hand",
                    report={}, started_at=now - 10, ended_at=None))
        s.add(Drill(id="d-group", plan=None, group="g1", job_id="j-3", state="passed",
                    trigger="schedule", report={"group": "g1", "ok": True, "vms": [vm],
                                                "cleaned_up": True, "rto_s": 12.5, "rpo_s": 42.0},
                    started_at=now - 2000, ended_at=now - 1990))


def test_drill_history_and_a_drills_report(h: Harness) -> None:
    item_id = populate(h)
    h.ok("POST", "/plans", json={"plans": [{
        "name": "tier1", "groups": [{"name": "web", "vms": ["web1"]}],
        "drill": {"every_s": "weekly", "window": "01:00-05:00", "boot_timeout_s": 60,
                  "probe": {"script": "curl -sf http://$DRSITE_DRILL_IPS/", "timeout_s": 5}}}]})
    add_drills(h, item_id)
    login(h, h.token("reader", "audit"))  # drills are for every role to read
    page = h.client.get("/ui/drills").text
    assert 'href="/ui/drills"' in page and 'hx-get="/ui/f/drills?plan=&amp;group="' in page
    rows = re.findall(r'<tr class="drill-row" data-drill="([\w-]+)" data-state="(\w+)">', page)
    assert rows == [("d-other", "running"), ("d-fail", "failed"), ("d-pass", "passed"),
                    ("d-group", "passed")]
    assert 'group <a href="/ui/drills?group=g1">g1</a>' in page
    assert "1 / 1" in page and "0 / 1" in page and "by hand" in page
    mine = h.client.get("/ui/f/drills?plan=tier1").text
    assert "d-pass" in mine and "d-other" not in mine and "d-group" not in mine
    groups = h.client.get("/ui/drills?group=g1").text
    assert "d-group" in groups and "d-pass" not in groups and "of protection group g1" in groups
    assert "Drill of group" in h.client.get("/ui/drills/d-group").text
    rep = h.client.get("/ui/drills/d-pass").text
    assert 'hx-get="/ui/f/drills/d-pass"' in rep
    assert "p000000000007" in rep and "42 s" in rep and "12 s" in rep  # RPO, RTO
    assert "verified" in rep and "replica-copy" in rep and "answers" in rep
    assert "HTTP/1.1 200 &lt;ok&gt;" in rep and "<ok>" not in rep
    assert f'href="/ui/items/{item_id}"' in rep and 'href="/ui/jobs/j-1"' in rep
    failed = h.client.get("/ui/f/drills/d-fail").text
    assert "probe did not pass within 30 s" in failed and "exit 7, 3 attempt(s)" in failed
    running = h.client.get("/ui/drills/d-other").text
    assert "The drill is running" in running
    assert h.client.get("/ui/drills/nope").status_code == 404
    plan = h.client.get("/ui/plans/tier1").text
    assert "Drill every 7 d inside 01:00-05:00" in plan and 'href="/ui/drills?plan=tier1"' in plan


def test_an_operator_runs_a_drill_from_the_plan_page(h: Harness) -> None:
    """The plan page's 'Run a drill now': a confirmation page that says what a drill does, a
    POST that starts the vault's own drill and lands on its report; a reader sees the button
    disabled (and cannot post it: see test_a_reader_sees_everything_and_can_press_nothing); an
    unknown plan is a 404; a plan with no protected VM is refused on the confirmation page
    with the reason."""
    populate(h)
    add_plan(h)
    h.ok("POST", "/plans", json={"plans": [{"name": "empty", "groups": [
        {"name": "g", "vms": ["ghost"]}]}]})
    login(h, h.token("reader", "audit"))
    page = h.client.get("/ui/plans/tier1").text
    assert re.search(r'<button type="button" class="\s*" disabled id="plan-drill"', page), page
    csrf = login(h, h.token("operator", "ops"))
    page = h.client.get("/ui/plans/tier1").text
    assert 'href="/ui/plans/tier1/drill" id="plan-drill"' in page
    confirm = h.client.get("/ui/plans/tier1/drill").text
    assert "What will happen" in confirm and "records the drill" in confirm
    r = h.client.post("/ui/plans/tier1/drill", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    drill_id = r.headers["location"].rsplit("/", 1)[1]
    d = h.ok("GET", f"/drills/{drill_id}")
    assert d["plan"] == "tier1" and d["trigger"] == "hand"
    assert drill_id in h.client.get("/ui/drills?plan=tier1").text
    assert h.client.get("/ui/plans/nope/drill").status_code == 404
    assert h.client.post("/ui/plans/nope/drill", data={"csrf": csrf},
                         follow_redirects=False).status_code == 404
    empty = h.client.get("/ui/plans/empty/drill").text
    assert "ghost is not protected" in empty and "disabled" in empty
    r = h.client.post("/ui/plans/empty/drill", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 409 and "ghost" in r.text


def test_the_replication_mode_on_the_policies_and_item_pages_and_in_the_api(h: Harness) -> None:
    """Asynchronous, then synchronous in sync, then suspended with the agent's reason, then
    unknown while its agent is silent: the item's ``sync`` in the API, the VM page and the
    policies page (counts per state, and the VMs not in sync) say the same."""
    item_id, a = populate_agent(h)
    login(h, h.admin)
    assert h.ok("GET", f"/items/{item_id}")["sync"] == {
        "mode": "async", "budget_ms": None, "state": None, "reason": None}
    assert "asynchronous" in h.client.get("/ui/f/policies").text
    h.ok("PUT", "/policies/p1", json={"frequency_s": 30, "rpo_threshold_s": 120,
                                      "mode": "sync", "sync_budget_ms": 80})

    def beat(issues: list[str]) -> None:
        rep = report(item_id, "vm-1", "web1")
        if issues:
            rep["agent_issues"] = issues   # the agent's own lines (agent/heartbeat.py)
        a.beat(vms=VMS, items=[{"item_id": item_id, "report": rep}])
        h.tick()

    beat([])
    assert h.ok("GET", f"/items/{item_id}")["sync"] == {
        "mode": "sync", "budget_ms": 80, "state": "in_sync", "reason": None}
    page = h.client.get(f"/ui/f/items/{item_id}").text
    assert re.search(r'id="sync-mode">synchronous .*80 ms.*<span class="badge ok">in sync</span>',
                     page), page
    pol = h.client.get("/ui/f/policies").text
    assert re.search(r'id="policy-p1".*synchronous <span class="muted">\(budget 80 ms\)</span>'
                     r'.*<span class="badge ok">in sync</span> 1', pol, re.S), pol
    why = "the recovery agent did not acknowledge within 80 ms"
    beat([f"sync mode suspended: {why}; writes replicate asynchronously until the next "
          "recovery point"])
    sync = h.ok("GET", f"/items/{item_id}")["sync"]
    assert sync["state"] == "suspended" and sync["reason"].startswith(why), sync
    page = h.client.get(f"/ui/f/items/{item_id}").text
    assert '<span class="badge warn">suspended</span> ' + why in page
    pol = h.client.get("/ui/f/policies").text
    assert '<span class="badge warn">suspended</span> 1' in pol
    assert f'href="/ui/items/{item_id}">web1</a>' in pol and why in pol
    h.clock.advance(3600)   # the agent is silent: what it said last is not believed
    sync = h.ok("GET", f"/items/{item_id}")["sync"]
    assert sync == {"mode": "sync", "budget_ms": 80, "state": "unknown",
                    "reason": "its agent does not report"}, sync
