"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a real
cluster: the vault and two agents README's "Using it" started (``drsite up``, shared with
``test_readme.py``: ``conftest.readme``), with two more protected file VMs.

Log in (and be refused with a wrong token), see the overview with the VMs, a VM page with its
plots updating live, the jobs list and a job's tasks, a reader who sees everything and can press
nothing, a recovery plan's test failover started from the UI, watched to Succeeded, then
cleaned up, a verification started from a VM page (with its scrub status), the drill history
with one drill's report; every per-VM action from the VM pages (a point picked on the timeline
and in the list, cleanup notes, failover, commit, failback, change of point, cancel, resync),
focus kept across the live refreshes, lists searched and paged; and axe-core on every page at
desktop and phone sizes: no serious or critical violation. Screenshots go to a pytest tmp dir,
and to ``$DRSITE_SCREENSHOTS`` when it is set (``docs/screenshots``).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.e2e.conftest import REPO, ReadmeRun

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.up import Cluster

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MiB = 1024 * 1024
VIEWPORT = {"width": 1440, "height": 1000}
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
AXE = REPO / ".tools" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
UI_REQUIRED = bool(os.environ.get("CI") or os.environ.get("DRSITE_TEST_UI"))


def until(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        res = check()
        if res:
            return res
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


@dataclass
class Env:
    cluster: Cluster
    items: dict[str, str]      # VM name → item id
    enable_jobs: dict[str, str]  # VM name → EnableProtection job id
    reader_token: str
    shots: Path

    @property
    def url(self) -> str:
        return self.cluster.vault_url

    def client(self) -> VaultClient:
        return self.cluster.client()


def make_vm(c: Cluster, name: str, ip: str) -> str:
    hv = FileHypervisor(c.root / "primary" / "vms")
    vm = hv.create_blank(VmSpec(name=name, nics=(Nic("prod", f"52:54:00:00:01:{len(name):02x}", ip),),
                                disks=(DiskSpec("d0", 16 * MiB),)))
    rng = np.random.default_rng(len(name))
    for d in vm.disks:
        seed_disk(hv.disk_path(vm.vm_id, d.disk_id), d.size, 0.5, rng)
    hv.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=128 * 1024, seed=5))
    hv.power_on(vm.vm_id)
    return vm.vm_id


def setup_vault(cl: VaultClient) -> None:
    cl.create_policy({"name": "ui-fast", "frequency_s": 5.0, "retention_hours": 24,
                      "app_consistent_every_s": 15.0, "rpo_threshold_s": 60,
                      "resync_window": "00:00-00:00", "compression": True, "encryption": False,
                      "bandwidth_limit_bps": None})
    cl.create_group({"name": "g", "site": "primary", "target_site": "secondary", "policy": "ui-fast",
                     "match": {"vm_names": [], "hosts": [], "labels": []}})
    cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                            "source_network": "prod", "recovery_network": "dr", "test_network": "dr-test",
                            "ip_rule": {"kind": "subnet", "source": "10.0.0.0/24",
                                        "target": "10.9.0.0/24"}})


@pytest.fixture(scope="module")
def env(readme: ReadmeRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if readme.rc != 0:
        pytest.fail(f"README's commands failed, no cluster to test: {readme.output[-2000:]}")
    shots = tmp_path_factory.mktemp("screenshots")
    c = readme.cluster
    vms = {"web": make_vm(c, "web", "10.0.0.5"), "db": make_vm(c, "db", "10.0.0.6")}
    with c.client() as cl:
        setup_vault(cl)
        until("inventory", lambda: {v["vm_id"] for v in cl.vms()} >= set(vms.values()))
        jobs = {n: cl.protect(vm_id, "g")["job_id"] for n, vm_id in vms.items()}
        for n, job_id in jobs.items():
            job = cl.wait_job(job_id, timeout=180)
            assert job["state"] == "succeeded", (n, job)
        items = {it["vm_name"]: it["id"] for it in cl.items() if it["vm_name"] in vms}
        cl.apply_plans([{"name": "tier1", "description": "database first, then the web server",
                         "groups": [{"name": "data", "vms": ["db"]},
                                    {"name": "front", "vms": ["web"]}]}])
        reader = cl.create_token("auditor", "reader")["token"]
    yield Env(c, items, jobs, reader, shots)  # README's 'drsite down' stops it all


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        why = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it)"
        if UI_REQUIRED:
            pytest.fail(why)  # CI installs it: a missing browser must not pass as a skip
        pytest.skip(why)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(ignore_https_errors=True, viewport=VIEWPORT)
    ctx.set_default_timeout(20_000)
    pg = ctx.new_page()
    try:
        yield pg
    finally:
        ctx.close()


def screenshot(pg: Any, env: Env, name: str, full_page: bool = True) -> Path:
    path = env.shots / f"{name}.png"
    pg.screenshot(path=str(path), full_page=full_page)
    out = os.environ.get("DRSITE_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out) / path.name)
    return path


def login(pg: Any, env: Env, token: str, path: str = "/ui") -> None:
    pg.goto(env.url + path)
    sync_api.expect(pg).to_have_url(re.compile(r"/ui/login"))
    pg.fill("#token", token)
    pg.click("button[type=submit]")
    sync_api.expect(pg.locator("header .who")).to_be_visible()


def admin_token(env: Env) -> str:
    return env.cluster.admin_token


def expect_text(locator: Any, pattern: str, timeout: float = 20_000) -> None:
    sync_api.expect(locator).to_contain_text(re.compile(pattern), timeout=timeout)


# ----------------------------------------------------------------------------------- tests

def test_a_wrong_token_is_refused_with_a_clear_message(env: Env, page: Any) -> None:
    page.goto(env.url + "/")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.fill("#token", "drst_this-is-not-a-token")
    page.click("button[type=submit]")
    expect_text(page.locator("#login-error"), "not accepted")
    assert "drst_this-is-not-a-token" not in page.content()
    assert not [c for c in page.context.cookies() if c["name"] == "drsite_session"]


def test_overview_vms_and_a_vm_page_update_live(env: Env, page: Any) -> None:
    with env.client() as cl:
        n_items = len(cl.items())  # web, db and README's app-01
    login(page, env, admin_token(env))
    expect_text(page.locator("#tile-items .tile-value"), rf"^{n_items}$")
    expect_text(page.locator("#worst-rpo"), "web")
    expect_text(page.locator("#worst-rpo"), "db")
    expect_text(page.locator("#tile-agents .tile-value"), r"2\s*/ 2 up")
    expect_text(page.locator("#sites"), "primary")
    screenshot(page, env, "overview")

    page.click("header nav >> text=VMs")
    rows = page.locator("#items tbody tr.item-row")
    sync_api.expect(rows).to_have_count(n_items)
    expect_text(page.locator("#items"), "normal")
    page.click(f"#items a[href='/ui/items/{env.items['web']}']")
    sync_api.expect(page).to_have_url(re.compile(rf"/ui/items/{env.items['web']}"))
    rpo = ".wide-only svg.chart.rpo"
    marks = page.locator(".wide-only svg.chart.timeline line.mark")
    sync_api.expect(page.locator(f"{rpo} polyline.rpo-line")).to_have_count(1)
    sync_api.expect(page.locator(f"{rpo} text.threshold-label")).to_contain_text("threshold 60 s")
    assert marks.count() >= 1
    # live: new points arrive on the page without a reload (htmx swaps the fragment)
    page.evaluate("window.__noReload = 1")
    n0 = marks.count()
    until("new points on the page", lambda: marks.count() >= n0 + 2, 60)
    assert page.evaluate("window.__noReload") == 1
    until("an app-consistent point",
          lambda: page.locator(".wide-only svg.chart.timeline line.mark-app").count() >= 1, 60)
    if os.environ.get("DRSITE_SCREENSHOTS"):  # a fuller picture for the docs
        until("a minute of points", lambda: marks.count() >= 14, 120)
    screenshot(page, env, "vm")


def test_jobs_list_and_drill_down_with_live_progress(env: Env, page: Any) -> None:
    login(page, env, admin_token(env), "/ui/jobs")
    job_id = env.enable_jobs["web"]
    row = page.locator(f"tr.job-row[data-job='{job_id}']")
    expect_text(row, "EnableProtection")
    expect_text(row, "succeeded")
    row.locator("a").first.click()
    sync_api.expect(page).to_have_url(re.compile(rf"/ui/jobs/{job_id}$"))
    tasks = page.locator("#tasks tbody tr.task-row")
    sync_api.expect(tasks).to_have_count(4)
    for name in ("prerequisites", "create_relationship", "initial_replication", "finalize"):
        expect_text(page.locator(f"tr[data-task='{name}']"), "succeeded")
    screenshot(page, env, "job")

    # a job started now is followed live on its page: running → succeeded without a reload
    with env.client() as cl:
        new_job = cl.resync(env.items["db"])["job_id"]
    page.goto(f"{env.url}/ui/jobs")
    expect_text(page.locator(f"tr.job-row[data-job='{new_job}']"), "Resync")
    page.goto(f"{env.url}/ui/jobs/{new_job}")
    page.evaluate("window.__noReload = 1")
    sync_api.expect(page.locator(".job-head progress")).to_have_count(1)
    expect_text(page.locator("#job-state"), "succeeded", timeout=120_000)
    assert page.evaluate("window.__noReload") == 1
    sync_api.expect(page.locator(".job-head progress")).to_have_attribute("value", "100.0")


def test_a_reader_sees_everything_and_can_press_nothing(env: Env, page: Any) -> None:
    login(page, env, env.reader_token)
    expect_text(page.locator("header .who"), "auditor reader")
    expect_text(page.locator("#worst-rpo"), "web")
    page.goto(f"{env.url}/ui/plans/tier1")
    buttons = page.locator("#plan-buttons button")
    sync_api.expect(buttons).to_have_count(8)
    for i in range(8):
        sync_api.expect(buttons.nth(i)).to_be_disabled()
    page.goto(f"{env.url}/ui/jobs/{env.enable_jobs['db']}")
    expect_text(page.locator("#tasks"), "Initial replication")
    page.goto(f"{env.url}/ui/plans/tier1/test-failover")
    sync_api.expect(page.locator("#confirm")).to_be_disabled()
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    r = page.request.post(f"{env.url}/ui/plans/tier1/test-failover", form={"csrf": csrf},
                          max_redirects=0)
    assert r.status == 403 and "reader role" in r.text()
    with env.client() as cl:
        assert not [j for j in cl.jobs() if j["kind"] == "RecoveryPlan" and j["created_at"] > time.time() - 5]


@pytest.mark.timeout(600)
def test_plan_test_failover_from_the_ui_then_cleanup(env: Env, page: Any) -> None:
    login(page, env, admin_token(env), "/ui/plans")
    page.click("#plans >> text=tier1")
    expect_text(page.locator("main"), "database first")
    page.click("#plan-buttons >> text=Test failover")
    expect_text(page.locator("#what-will-happen"), "isolated test network")
    page.click("#confirm")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/jobs/[^/]+$"))
    expect_text(page.locator("h1"), "RecoveryPlan")
    expect_text(page.locator("#job-state"), "succeeded|failed", timeout=240_000)
    if "failed" in page.locator("#job-state").inner_text():
        pytest.fail(f"test failover failed: {page.locator('#job-error').inner_text()}")
    screenshot(page, env, "plan-job")
    page.goto(f"{env.url}/ui/plans/tier1")
    expect_text(page.locator("#last-job"), "test failover")
    screenshot(page, env, "plan")
    page.click("#plan-buttons >> text=Clean up test failover")
    expect_text(page.locator("#what-will-happen"), "deletes the plan's test VMs")
    page.fill("#f-notes", "both tiers answered")
    page.click("#confirm")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/jobs/[^/]+$"))
    expect_text(page.locator("#job-state"), "succeeded|failed", timeout=240_000)
    assert page.locator("#job-state").inner_text().strip() == "succeeded", page.locator("main").inner_text()


def test_the_audit_page_is_for_admins(env: Env, page: Any) -> None:
    page.goto(env.url + "/ui/login")
    page.fill("#token", "drst_not-an-audited-secret")
    page.click("button[type=submit]")
    expect_text(page.locator("#login-error"), "not accepted")
    login(page, env, env.reader_token)
    sync_api.expect(page.locator("header nav >> text=Audit")).to_have_count(0)
    r = page.goto(f"{env.url}/ui/audit")
    assert r is not None and r.status == 403
    page.context.clear_cookies()
    login(page, env, admin_token(env))
    page.click("header nav >> text=Audit")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/audit$"))
    table = page.locator("#audit")
    expect_text(table, r"POST /api/v1/items")
    expect_text(table, r"POST /ui/login")
    expect_text(table, r"auth_failed")  # the refused login of the wrong token
    screenshot(page, env, "audit")
    page.fill("input[name=actor]", "auditor")
    page.click("form.filters button[type=submit]")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/audit\?actor=auditor"))
    rows = page.locator("#audit tr.audit-row")
    until("the reader's entries", lambda: rows.count() > 0, 20)
    for i in range(rows.count()):
        assert "auditor" in rows.nth(i).inner_text()
    for secret in (env.reader_token, admin_token(env), "drst_not-an-audited-secret"):
        assert secret not in page.content()


@pytest.mark.timeout(600)
def test_verify_from_a_vm_page_and_the_drill_history(env: Env, page: Any) -> None:
    item_id = env.items["web"]
    login(page, env, admin_token(env), f"/ui/items/{item_id}")
    # the store's first scrub pass runs when the item is protected; its result is on the page
    expect_text(page.locator("#scrub-last"), "passed", timeout=60_000)
    expect_text(page.locator("#scrub-last"), r"\d+ objects")
    expect_text(page.locator("#scrub-damage"), "none known")
    screenshot(page, env, "vm-scrub")
    page.click("#act-verify")
    expect_text(page.locator("#what-will-happen"), "checking every piece of data")
    sync_api.expect(page.locator("input[name=point][value=latest]")).to_be_checked()
    page.click("#confirm")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/jobs/[^/]+$"))
    expect_text(page.locator("h1"), "Verify")
    expect_text(page.locator("#job-state"), "succeeded|failed", timeout=120_000)
    assert page.locator("#job-state").inner_text().strip() == "succeeded", \
        page.locator("main").inner_text()
    expect_text(page.locator("#tasks"), "restore exactly to their manifests")

    # a drill of the plan (started through the API, as a schedule would), then its history
    with env.client() as cl:
        until("no plan job running", lambda: not [
            j for j in cl.jobs(state="active") if j["kind"] in ("RecoveryPlan", "Drill")], 120)
        started = cl.run_drill("tier1", boot_timeout_s=30,
                               probe={"script": 'test -n "$DRSITE_DRILL_IPS"', "timeout_s": 10})
        assert cl.wait_job(started["job_id"], timeout=240)["state"] == "succeeded"
    page.click("header nav >> text=Drills")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/drills$"))
    row = page.locator(f"tr.drill-row[data-drill='{started['drill_id']}']")
    expect_text(row, "passed")
    expect_text(row, r"2 / 2")
    screenshot(page, env, "drills")
    row.locator("a").first.click()
    sync_api.expect(page).to_have_url(re.compile(rf"/ui/drills/{started['drill_id']}$"))
    vms = page.locator("#drill-vms tbody tr.drill-vm")
    sync_api.expect(vms).to_have_count(2)
    for name in ("db", "web"):
        vm = page.locator(f"tr.drill-vm[data-vm='{name}']")
        expect_text(vm, "verified")
        expect_text(vm, "proven")
        expect_text(vm, r"exit 0")
    expect_text(page.locator("#drill-rto"), r"\d+ s")
    expect_text(page.locator("#drill-rpo"), r"\d+ s")
    screenshot(page, env, "drill")


# ------------------------------------------------------------- per-VM actions, lists, focus

def confirm_and_wait(page: Any, what: str, timeout: float = 180_000) -> str:
    """Press the confirmation's button; the job it started, watched until it succeeded."""
    sync_api.expect(page.locator("#confirm")).to_be_enabled()
    page.click("#confirm")
    sync_api.expect(page).to_have_url(re.compile(r"/ui/jobs/[^/]+$"))
    expect_text(page.locator("#job-state"), "succeeded|failed|cancelled", timeout=timeout)
    state = page.locator("#job-state").inner_text().strip()
    assert state == "succeeded", f"{what}: {page.locator('main').inner_text()}"
    return page.url.rsplit("/", 1)[1]


def vm_page(page: Any, env: Env, item_id: str) -> None:
    """The VM's page, once no job holds the item (a button of each valid action is a link)."""
    with env.client() as cl:
        until(f"item {item_id} idle", lambda: cl.item(item_id)["active_job_id"] is None, 120)
    page.goto(f"{env.url}/ui/items/{item_id}")
    sync_api.expect(page.locator("#item-buttons")).to_be_visible()


@pytest.mark.timeout(900)
def test_every_vm_action_from_the_vm_pages(env: Env, page: Any) -> None:
    web = env.items["web"]
    login(page, env, admin_token(env), f"/ui/items/{web}")
    vm_page(page, env, web)
    # a point picked on the timeline: its page, then a test failover from it
    marks = page.locator(".wide-only svg.chart.timeline a.point-link")
    until("points on the timeline", lambda: marks.count() >= 3, 60)
    mark = marks.nth(marks.count() - 3)  # not the newest
    point_id = mark.get_attribute("data-point")
    assert point_id
    mark.click()
    sync_api.expect(page).to_have_url(re.compile(rf"/ui/items/{web}/points/{point_id}$"))
    expect_text(page.locator("#point-facts"), r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
    page.click("#pick-test-failover")
    sync_api.expect(page.locator(f"input[name=point][value='{point_id}']")).to_be_checked()
    screenshot(page, env, "point-picker")
    page.fill("#f-vm_name", "web-check")
    confirm_and_wait(page, "test failover")
    expect_text(page.locator(".facts"), point_id)  # the point asked for, on the job's page
    # while it runs: cleanup is the way on, a planned failover is not offered
    vm_page(page, env, web)
    sync_api.expect(page.locator("#act-planned-failover")).to_be_disabled()
    expect_text(page.locator("#why-not"), "test failover running")
    expect_text(page.locator("#failover-state"), "web-check")
    page.click("#act-cleanup-test-failover")
    page.fill("#f-notes", "booted, the service answered")
    confirm_and_wait(page, "cleanup")
    vm_page(page, env, web)
    expect_text(page.locator("#failovers"), "booted, the service answered")
    # an unplanned failover to a point chosen in the picker's list, its point changed to the
    # latest, then cancelled: the VM is handed back to its site
    page.click("#act-unplanned-failover")
    older = page.locator(".point-list input[name=point]:not([disabled])").nth(2)
    chosen = older.get_attribute("value")
    older.check()
    confirm_and_wait(page, "unplanned failover")
    vm_page(page, env, web)
    expect_text(page.locator("#failover-state"), f"from point {chosen}")
    for disabled_action in ("#act-test-failover", "#act-planned-failover", "#act-failback"):
        sync_api.expect(page.locator(disabled_action)).to_be_disabled()
    page.click("#act-change-point")
    page.check("input[name=point][value=latest]")
    confirm_and_wait(page, "change point")
    vm_page(page, env, web)
    page.click("#act-cancel")
    confirm_and_wait(page, "cancel")
    vm_page(page, env, web)
    page.click("#act-resync")
    confirm_and_wait(page, "resync")

    # planned failover, commit (it re-protects), failback to the original VM, commit
    db = env.items["db"]
    vm_page(page, env, db)
    page.click("#act-planned-failover")
    expect_text(page.locator("#what-will-happen"), "no data is lost")
    confirm_and_wait(page, "planned failover")
    vm_page(page, env, db)
    page.click("#act-commit")
    sync_api.expect(page.locator("#f-reprotect")).to_be_checked()
    confirm_and_wait(page, "commit")
    vm_page(page, env, db)
    page.click("#moved a")  # the VM's current item: the reverse one
    sync_api.expect(page).to_have_url(re.compile(r"/ui/items/i-[0-9a-f]+$"))
    rev = page.url.rsplit("/", 1)[1]
    assert rev != db
    vm_page(page, env, rev)
    page.click("#act-failback")
    expect_text(page.locator("#what-will-happen"), "re-created")
    confirm_and_wait(page, "failback")
    vm_page(page, env, rev)
    page.click("#act-commit")
    confirm_and_wait(page, "commit of the failback")
    vm_page(page, env, db)
    rows = page.locator("#lineage tbody tr")
    sync_api.expect(rows).to_have_count(3)  # one VM, one history: three legs
    screenshot(page, env, "vm-history")


def test_focus_stays_across_live_refreshes_and_lists_page(env: Env, page: Any) -> None:
    login(page, env, admin_token(env), "/ui/vms")
    link = page.locator("#items tbody a").first
    href = link.get_attribute("href")
    link.focus()
    page.evaluate("window.__swaps = 0; document.addEventListener('htmx:afterSwap', "
                  "() => { window.__swaps += 1; })")
    until("a live refresh", lambda: page.evaluate("window.__swaps") >= 2, 20)
    assert page.evaluate("document.activeElement.getAttribute('href')") == href
    # search, sort by a column, and a page of jobs at a time
    page.fill("input[name=q]", "app-01")
    page.click("form.list-form button[type=submit]")
    expect_text(page.locator(".pager .count"), r"of 1 protected VMs")
    page.goto(f"{env.url}/ui/jobs?limit=20")
    expect_text(page.locator(".pager .count"), r"Showing 1–20 of \d+ jobs")
    page.click(".pager >> text=Next")
    expect_text(page.locator(".pager .count"), r"Showing 21–")
    page.click("th >> text=Kind")
    sync_api.expect(page.locator("th[aria-sort=ascending]")).to_have_count(1)
    page.goto(f"{env.url}/ui/alerts?state=all")
    sync_api.expect(page.locator("#alerts")).to_be_visible()
    page.goto(f"{env.url}/ui/nope")
    expect_text(page.locator("main h1"), "no page /ui/nope")


# ------------------------------------------------------------------------------ accessibility

def axe_source() -> str:
    if not AXE.exists():
        why = (f"{AXE} is missing: npm install --prefix .tools/axe axe-core@4.11.0 (.ci/run "
               "does it)")
        if UI_REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    return AXE.read_text()


def pages_to_check(env: Env) -> list[str]:
    web = env.items["web"]
    with env.client() as cl:
        job = cl.jobs(limit=1)[0]["id"]
        plan_job = next(j["id"] for j in cl.jobs(limit=200) if j["kind"] == "RecoveryPlan")
        point = cl.points(web)[-1]["point_id"]
        host = cl.hosts()[0]["id"]
        drills = cl.drills()
    return ["/ui", "/ui/vms", f"/ui/items/{web}", f"/ui/items/{web}/points",
            f"/ui/items/{web}/points/{point}", f"/ui/items/{web}/act/test-failover",
            f"/ui/items/{web}/act/commit", f"/ui/items/{web}/verify", "/ui/jobs",
            f"/ui/jobs/{job}", f"/ui/jobs/{plan_job}", "/ui/plans", "/ui/plans/tier1",
            "/ui/plans/tier1/cleanup-test-failover", "/ui/drills",
            *([f"/ui/drills/{drills[0]['id']}"] if drills else []), "/ui/alerts?state=all",
            "/ui/events", "/ui/sites", f"/ui/hosts/{host}", "/ui/audit", "/ui/policies",
            "/ui/nope"]


@pytest.mark.timeout(600)
def test_axe_finds_no_serious_violation_on_any_page(env: Env, browser: Any) -> None:
    axe = axe_source()
    urls = pages_to_check(env)
    found: list[str] = []
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        ctx = browser.new_context(ignore_https_errors=True, viewport=viewport, bypass_csp=True)
        ctx.set_default_timeout(20_000)
        pg = ctx.new_page()
        try:
            pg.goto(env.url + "/ui/login")
            check_page(pg, axe, "/ui/login", name, found)
            pg.fill("#token", admin_token(env))
            pg.click("button[type=submit]")
            sync_api.expect(pg.locator("header .who")).to_be_visible()
            for url in urls:
                pg.goto(env.url + url)
                check_page(pg, axe, url, name, found)
                if name == "phone" and url in ("/ui", f"/ui/items/{env.items['web']}"):
                    shot = "overview-phone" if url == "/ui" else "vm-phone"
                    screenshot(pg, env, shot)
                    if url != "/ui":  # the RPO chart's text stays readable on a phone
                        size = pg.evaluate(
                            "getComputedStyle(document.querySelector('.narrow-only svg.chart.rpo "
                            "text.tick')).fontSize")
                        box = pg.evaluate(
                            "document.querySelector('.narrow-only svg.chart.rpo text.tick')"
                            ".getBoundingClientRect().height")
                        assert float(box) >= 10, (size, box)
                if name == "phone":  # nothing is wider than the screen but the scrollers
                    wide = pg.evaluate("document.documentElement.scrollWidth")
                    assert wide <= PHONE["width"] + 1, (url, wide)
        finally:
            ctx.close()
    assert found == [], "\n".join(found)


def check_page(pg: Any, axe: str, url: str, viewport: str, found: list[str]) -> None:
    pg.evaluate(axe)
    res = pg.evaluate("""async () => {
        const r = await axe.run(document, {runOnly: {type: 'tag',
            values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}});
        return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
            .map(v => ({id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.slice(0, 3).map(n => n.target.join(' ') + ': '
                                                        + (n.failureSummary || '').slice(0, 160))}));
    }""")
    for v in res:
        found.append(f"{viewport} {url}: {v['impact']} {v['id']} ({v['help']}): "
                     + " | ".join(v["nodes"]))


@pytest.mark.timeout(300)
def test_the_replication_mode_shows_on_the_policies_and_vm_pages(env: Env, browser: Any) -> None:
    """A synchronous policy with a VM in sync: the policies page gives each policy's mode and
    budget and counts the VMs in sync; the VM page says synchronous, the budget and in sync;
    an asynchronous VM's page says asynchronous. axe finds nothing serious on either page."""
    hv = FileHypervisor(env.cluster.root / "primary" / "vms")
    vm = hv.create_blank(VmSpec(name="app", nics=(Nic("prod", "52:54:00:00:02:01", "10.0.0.7"),),
                                disks=(DiskSpec("d0", 8 * MiB),)))
    hv.power_on(vm.vm_id)
    with env.client() as cl:
        cl.create_policy({"name": "ui-sync", "frequency_s": 5.0, "retention_hours": 24,
                          "app_consistent_every_s": None, "rpo_threshold_s": 60,
                          "resync_window": "00:00-00:00", "compression": True,
                          "encryption": False, "bandwidth_limit_bps": None, "mode": "sync",
                          "sync_budget_ms": 500})
        cl.create_group({"name": "gs", "site": "primary", "target_site": "secondary",
                         "policy": "ui-sync",
                         "match": {"vm_names": [], "hosts": [], "labels": []}})
        until("inventory", lambda: vm.vm_id in {v["vm_id"] for v in cl.vms()})
        job = cl.wait_job(cl.protect(vm.vm_id, "gs")["job_id"], timeout=180)
        assert job["state"] == "succeeded", job
        app = next(it["id"] for it in cl.items() if it["vm_name"] == "app")
        until("the VM in sync", lambda: (cl.item(app).get("sync") or {}).get("state")
              == "in_sync", 90)
    axe = axe_source()
    found: list[str] = []
    ctx = browser.new_context(ignore_https_errors=True, viewport=DESKTOP, bypass_csp=True)
    ctx.set_default_timeout(20_000)
    pg = ctx.new_page()
    try:
        login(pg, env, admin_token(env), "/ui/policies")
        row = pg.locator("#policy-ui-sync")
        expect_text(row, r"synchronous \(budget 500 ms\)")
        expect_text(row, r"in sync 1")
        expect_text(row, r"gs")
        expect_text(pg.locator("#policy-ui-fast"), r"asynchronous")
        check_page(pg, axe, "/ui/policies", "desktop", found)
        pg.goto(f"{env.url}/ui/items/{app}")
        expect_text(pg.locator("#sync-mode"), r"synchronous .*500 ms.* in sync")
        check_page(pg, axe, f"/ui/items/{app}", "desktop", found)
        pg.click("#sync-mode >> xpath=preceding::dd[1]//a")   # the policy link
        sync_api.expect(pg).to_have_url(re.compile(r"/ui/policies#policy-ui-sync$"))
        pg.goto(f"{env.url}/ui/items/{env.items['web']}")
        expect_text(pg.locator("#sync-mode"), r"asynchronous")
    finally:
        ctx.close()
    assert found == [], "\n".join(found)
