"""The dashboard's per-VM actions, point picker, lists, new pages and HTML errors, with an
in-process vault (TestClient) and the agents played by the test:

- a VM page enables exactly the actions the API would accept now and says why the others
  are not; a confirmation page of an action the vault would refuse shows the refusal with its
  hint and a disabled button; the POSTs start the API's jobs with the form's values (point,
  test VM name, cleanup notes, re-protect and reverse mappings);
- the point picker: every point with its absolute time, a point chosen from the list or the
  timeline preselected, damaged points refused;
- lists sort, filter, search and page, saying how many there are; alerts are grouped by cause;
- sites and hosts, events; every other ``/ui`` path answers an HTML page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.test_web import add_plan, login, map_networks, populate

from drsite.vault.db.models import Alert, Event, Failover, Item, Job, Point
from drsite.vault.testing import Harness
from drsite.web.routes import router as dashboard


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    hh = Harness(tmp_path / "vault", routers=[dashboard], heartbeat_interval=600.0)
    yield hh
    hh.close()


def enabled(page: str) -> set[str]:
    """The ids of the VM page's action links (enabled) — disabled ones are buttons."""
    return set(re.findall(r'<a class="button[^"]*" href="[^"]*" id="act-([a-z-]+)"', page))


def disabled(page: str) -> set[str]:
    return set(re.findall(r'<button type="button"[^>]* disabled id="act-([a-z-]+)"', page))


def test_vm_page_enables_the_valid_actions_and_says_why_not(h: Harness) -> None:
    item_id = populate(h)
    login(h, h.token("operator", "ops"))
    # no network mapping: every failover is refused, with the reason and the way out
    mapping = h.ok("GET", "/network-mappings")[0]["id"]
    h.ok("DELETE", f"/network-mappings/{mapping}")
    page = h.client.get(f"/ui/items/{item_id}").text
    assert enabled(page) == {"resync", "verify"}, enabled(page)
    why = page[page.index('id="why-not"'):]
    assert "network &#39;lan&#39; has no network mapping" in why, why
    map_networks(h)
    page = h.client.get(f"/ui/items/{item_id}").text
    assert enabled(page) == {"test-failover", "planned-failover", "unplanned-failover",
                             "resync", "verify"}, enabled(page)
    assert disabled(page) == {"cleanup-test-failover", "commit", "change-point", "cancel",
                              "reprotect", "failback"}
    why = page[page.index('id="why-not"'):]
    assert "no test failover to clean up" in why and "re-protect needs a committed failover" in why
    # an action the vault refuses now: its confirmation says why, and cannot be pressed
    confirm = h.client.get(f"/ui/items/{item_id}/act/commit").text
    assert 'id="action-error"' in confirm and "there is no failover to commit" in confirm
    assert "drsite failover planned" in confirm  # the hint: what to do
    assert re.search(r'<button type="submit" id="confirm"[^>]*disabled', confirm)
    assert h.client.get(f"/ui/items/{item_id}/act/explode").status_code == 404


def test_test_failover_with_a_point_and_a_name_then_cleanup_with_notes(h: Harness) -> None:
    item_id = populate(h)
    csrf = login(h, h.token("operator", "ops"))
    confirm = h.client.get(f"/ui/items/{item_id}/act/test-failover?point=p000003").text
    # the picker: latest, latest app-consistent, and every point with its UTC time
    assert 'value="latest_app"' in confirm and "2023-11-14 22:13:20 UTC" in confirm
    assert re.search(r'value="p000003" checked', confirm)
    assert 'name="vm_name"' in confirm and 'placeholder="web1-test"' in confirm
    url = f"/ui/items/{item_id}/act/test-failover"
    r = h.client.post(url, data={"csrf": csrf, "point": "p000003", "vm_name": "web1-drill"},
                      follow_redirects=False)
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[1]
    with h.vault.db.read() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.kind == "TestFailover"
        assert row.args["point"] == "p000003" and row.args["vm_name"] == "web1-drill"
    job_page = h.client.get(f"/ui/jobs/{job_id}").text
    assert "Point asked for" in job_page and "p000003" in job_page
    # while the test runs: no planned failover (refused, with the cleanup as the way out)
    h.tick()
    page = h.client.get(f"/ui/items/{item_id}").text
    assert "planned-failover" not in enabled(page)
    r = h.client.post(f"/ui/items/{item_id}/act/planned-failover", data={"csrf": csrf},
                      follow_redirects=False)
    assert r.status_code == 409 and "busy with job" in r.text
    with h.vault.db.tx() as s:  # the test failover's job ended (its agent answered)
        row = s.get(Job, job_id)
        assert row is not None
        row.state = "succeeded"
        item = s.get(Item, item_id)
        assert item is not None
        item.active_job_id = None
        fo = s.get(Failover, row.args["failover_id"])
        assert fo is not None
        fo.state = "test_running"
    page = h.client.get(f"/ui/items/{item_id}").text
    assert "cleanup-test-failover" in enabled(page) and "planned-failover" not in enabled(page)
    assert 'id="failover-state"' in page and "Test failover" in page
    confirm = h.client.get(f"/ui/items/{item_id}/act/cleanup-test-failover").text
    assert '<textarea id="f-notes" name="notes"' in confirm
    r = h.client.post(f"/ui/items/{item_id}/act/cleanup-test-failover",
                      data={"csrf": csrf, "notes": "booted <fine>"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    with h.vault.db.read() as s:
        row = s.get(Job, r.headers["location"].rsplit("/", 1)[1])
        assert row is not None and row.kind == "CleanupTestFailover"
        assert row.args["notes"] == "booted <fine>"


def test_a_damaged_point_is_refused_in_the_picker_and_the_points_list_pages(h: Harness) -> None:
    item_id = populate(h)
    csrf = login(h, h.token("operator", "ops"))
    with h.vault.db.tx() as s:
        for p in s.query(Point).filter(Point.item_id == item_id, Point.seq == 2):
            p.damage = {"reason": "pack corrupt", "found_at": h.clock.now(), "by": "scrub"}
    confirm = h.client.get(f"/ui/items/{item_id}/act/unplanned-failover").text
    assert re.search(r'value="p000002" disabled', confirm)
    r = h.client.post(f"/ui/items/{item_id}/act/unplanned-failover",
                      data={"csrf": csrf, "point": "p000002"}, follow_redirects=False)
    assert r.status_code == 409 and "cannot be restored" in r.text
    lst = h.client.get(f"/ui/items/{item_id}/points?limit=20").text
    assert "Showing 1–8 of 8 recovery points" in lst and "2023-11-14 22:16:50 UTC" in lst
    assert lst.index("p000008") < lst.index("p000001")  # newest first
    page2 = h.client.get(f"/ui/items/{item_id}/points?limit=20&sort=created_at&order=asc").text
    assert page2.index("p000001") < page2.index("p000008")
    app = h.client.get(f"/ui/items/{item_id}/points?consistency=app").text
    assert "Showing 1–2 of 2" in app
    picked = h.client.get(f"/ui/items/{item_id}/points?pick=change-point").text
    assert 'id="picking"' in picked
    one = h.client.get(f"/ui/items/{item_id}/points/p000004").text
    assert "app-consistent" in one and f"/ui/items/{item_id}/act/test-failover?point=p000004" in one
    assert h.client.get(f"/ui/items/{item_id}/points/nope").status_code == 404
    # the timeline's marks link to their points
    page = h.client.get(f"/ui/items/{item_id}").text
    assert f'href="/ui/items/{item_id}/points/p000005"' in page


def test_lists_sort_filter_search_and_page(h: Harness) -> None:
    populate(h)
    login(h, h.admin)
    now = h.clock.now()
    with h.vault.db.tx() as s:
        for i in range(27):
            s.add(Alert(key=f"rpo:x{i}", kind="rpo", severity="warning", subject=f"vm{i:02d}",
                        message=f"RPO of vm{i:02d} is 99 s", raised_at=now - i, last_seen_at=now))
        for host in ("hv1", "hv2"):
            s.add(Alert(key=f"agent_down:{host}", kind="agent_down", severity="warning",
                        subject=host, message=f"agent {host} missed heartbeats",
                        raised_at=now - 100, last_seen_at=now))
        s.add(Alert(key="old", kind="critical", severity="critical", subject="gone",
                    message="was critical", raised_at=now - 500, last_seen_at=now - 400,
                    cleared_at=now - 300))
        for i in range(60):
            s.add(Job(id=f"j-{i:03d}", kind="Resync", state="succeeded", target=f"vm{i:02d}",
                      item_id=None, args={}, progress=100.0, message="ok", created_at=now - i,
                      updated_at=now))
    alerts = h.client.get("/ui/alerts").text
    assert "29 open alerts in 2 causes" in alerts
    assert alerts.index('id="cause-agent_down"') > 0 and "was critical" not in alerts
    assert "agent hv2 missed heartbeats" in alerts  # not lost among the 27 RPO alerts
    cleared = h.client.get("/ui/alerts?state=all&kind=critical").text
    assert "was critical" in cleared and "RPO of vm01" not in cleared
    jobs = h.client.get("/ui/jobs?limit=20").text
    assert re.search(r"Showing 1–20 of 6\d jobs", jobs) and 'rel="next"' in jobs
    nxt = re.search(r'href="([^"]*)" rel="next"', jobs)
    assert nxt is not None and "offset=20" in nxt.group(1)
    found = h.client.get("/ui/jobs?q=vm07").text
    assert "Showing 1–1 of 1 jobs" in found
    by_target = h.client.get("/ui/jobs?sort=target&order=asc&kind=Resync&limit=20").text
    assert by_target.index(">vm00<") < by_target.index(">vm01<")
    vms = h.client.get("/ui/vms?health=critical").text
    assert "No protected VM matches." in vms
    vms = h.client.get("/ui/vms?q=web&sort=rpo_s&order=desc").text
    assert "Showing 1–1 of 1 protected VMs" in vms and 'aria-sort="descending"' in vms
    assert h.client.get("/ui/vms?limit=bogus&offset=-3&sort=nope").status_code == 200
    events = h.client.get("/ui/events?kind=job").text
    assert "Showing" in events and "EnableProtection" in events


def test_alerts_beyond_the_newest_thousand_say_so(h: Harness) -> None:
    populate(h)
    login(h, h.admin)
    now = h.clock.now()
    with h.vault.db.tx() as s:
        for i in range(1003):
            s.add(Alert(key=f"rpo:y{i}", kind="rpo", severity="warning", subject=f"vm{i}",
                        message="RPO", raised_at=now - i, last_seen_at=now))
        s.add(Alert(key="old", kind="critical", severity="critical", subject="gone",
                    message="was critical", raised_at=now - 5, last_seen_at=now - 4,
                    cleared_at=now - 3))
    page = h.client.get("/ui/alerts").text
    assert re.search(r"10\d\d alerts exist in this state; the newest 1000 are grouped here", page)
    cleared = h.client.get("/ui/alerts?state=cleared").text
    assert "was critical" in cleared and "are grouped here" not in cleared


def test_events_beyond_the_newest_thousand_by_kind(h: Harness) -> None:
    """The events page pages the API's list newest first with its total; a search or another
    order works on the newest 1000 and says so; a kind is filtered by the API, so an old event
    of a rare kind is still found; an unknown kind matches nothing (no error)."""
    populate(h)
    login(h, h.admin)
    now = h.clock.now()
    with h.vault.db.tx() as s:
        s.add(Event(at=now - 5000, kind="plan", subject="tier9", message="plan tier9 created"))
        for i in range(1100):
            s.add(Event(at=now - i, kind="job", subject=f"j-{i:04d}", message="noise"))
    page = h.client.get("/ui/events").text  # newest first: the API's pages, its total
    assert re.search(r"Showing 1–\d+ of 11\d\d events", page) and "are listed" not in page
    assert "plan tier9 created" not in page
    searched = h.client.get("/ui/events?q=noise").text  # a search works on the newest 1000
    assert re.search(r"\d{4} events exist; the newest 1000 are listed", searched)
    assert '<option value="plan"' in page  # every kind of the trail, not of the newest 1000
    old = h.client.get("/ui/events?kind=plan").text
    assert "plan tier9 created" in old and "Showing 1–1 of 1" in old
    assert "are listed" not in old
    jobs = h.client.get("/ui/events?kind=job").text
    assert "Showing 1–50 of 11" in jobs and "are listed" not in jobs
    jobs = h.client.get("/ui/events?kind=job&sort=subject&order=asc").text
    assert "events of this kind exist; the newest 1000 are listed" in jobs
    r = h.client.get("/ui/events?kind=nosuchkind")
    assert r.status_code == 200 and "No event matches." in r.text


def test_sites_hosts_plan_jobs_and_html_errors(h: Harness) -> None:
    item_id = populate(h)
    add_plan(h)
    csrf = login(h, h.token("operator", "ops"))
    sites = h.client.get("/ui/sites").text
    assert "prim" in sites and "hv1" in sites and "https://127.0.0.1:9443" in sites
    host_id = re.search(r'href="/ui/hosts/([^"]+)"><b>hv1', sites)
    assert host_id is not None
    host = h.client.get(f"/ui/hosts/{host_id.group(1)}").text
    assert "web1" in host and "db1" in host and f"/ui/items/{item_id}" in host
    # a plan job links the job of each VM and says which point it used
    r = h.client.post("/ui/plans/tier1/test-failover", data={"csrf": csrf, "point": "latest"},
                      follow_redirects=False)
    assert r.status_code == 303, r.text
    plan_job = r.headers["location"].rsplit("/", 1)[1]
    h.tick()  # the group's manual pre action waits for an operator
    h.ok("POST", f"/jobs/{plan_job}/resume")
    for _ in range(3):
        h.tick()
    page = h.client.get(f"/ui/jobs/{plan_job}").text
    child = re.search(r'class="child-job" data-vm="web1" data-job="([^"]+)"', page)
    assert child is not None and "Point asked for" in page and "latest" in page
    assert f'href="/ui/jobs/{plan_job}"' in h.client.get(f"/ui/jobs/{child.group(1)}").text
    # every /ui path answers HTML, never the API's JSON
    for url, status in (("/ui/nope", 404), ("/ui/items/x/y/z", 404), ("/ui/static/nope.css", 404),
                        ("/ui/jobs/j-1/explode", 404), ("/ui/f/nope", 404)):
        resp = h.client.get(url)
        assert resp.status_code == status and resp.headers["content-type"].startswith("text/html"), url
    resp = h.client.post("/ui/vms", data={"csrf": csrf})
    assert resp.status_code == 405 and resp.headers["content-type"].startswith("text/html")
    h.client.cookies.clear()
    r = h.client.get("/ui/nope", follow_redirects=False)
    assert r.status_code == 404 and "no page /ui/nope" in r.text
