"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a real
cluster: a vault and two agents as processes (``drsite up``) with two protected file VMs.

Log in (and be refused with a wrong token), see the overview with the VMs, a VM page with its
plots updating live, the jobs list and a job's tasks, a reader who sees everything and can press
nothing, a recovery plan's test failover started from the UI, watched to Succeeded, then
cleaned up, a verification started from a VM page (with its scrub status), and the drill
history with one drill's report. Screenshots go to a pytest tmp dir, and to
``$DRSITE_SCREENSHOTS`` when it is set.
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

from drsite.client.api import VaultClient
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.demo import seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.up import Cluster, down, up

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MiB = 1024 * 1024
VIEWPORT = {"width": 1440, "height": 1000}


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
    cl.create_policy({"name": "fast", "frequency_s": 5.0, "retention_hours": 24,
                      "app_consistent_every_s": 15.0, "rpo_threshold_s": 60,
                      "resync_window": "00:00-00:00", "compression": True, "encryption": False,
                      "bandwidth_limit_bps": None})
    cl.create_group({"name": "g", "site": "primary", "target_site": "secondary", "policy": "fast",
                     "match": {"vm_names": [], "hosts": [], "labels": []}})
    cl.set_network_mapping({"source_site": "primary", "recovery_site": "secondary",
                            "source_network": "prod", "recovery_network": "dr", "test_network": "dr-test",
                            "ip_rule": {"kind": "subnet", "source": "10.0.0.0/24",
                                        "target": "10.9.0.0/24"}})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("web-cluster")
    shots = tmp_path_factory.mktemp("screenshots")
    c = up(root / "c")
    try:
        vms = {"web": make_vm(c, "web", "10.0.0.5"), "db": make_vm(c, "db", "10.0.0.6")}
        with c.client() as cl:
            setup_vault(cl)
            until("inventory", lambda: {v["vm_id"] for v in cl.vms()} >= set(vms.values()))
            jobs = {n: cl.protect(vm_id, "g")["job_id"] for n, vm_id in vms.items()}
            for n, job_id in jobs.items():
                job = cl.wait_job(job_id, timeout=180)
                assert job["state"] == "succeeded", (n, job)
            items = {it["vm_name"]: it["id"] for it in cl.items()}
            cl.apply_plans([{"name": "tier1", "description": "database first, then the web server",
                             "groups": [{"name": "data", "vms": ["db"]},
                                        {"name": "front", "vms": ["web"]}]}])
            reader = cl.create_token("auditor", "reader")["token"]
        yield Env(c, items, jobs, reader, shots)
    finally:
        down(c)
        for site in ("primary", "secondary"):
            hv = FileHypervisor(c.root / site / "vms")
            for vm in hv.list_vms():
                hv.power_off(vm.vm_id, force=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        why = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does it)"
        if os.environ.get("CI"):
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


def screenshot(pg: Any, env: Env, name: str) -> Path:
    path = env.shots / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
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
    login(page, env, admin_token(env))
    expect_text(page.locator("#tile-items .tile-value"), r"^2$")
    expect_text(page.locator("#worst-rpo"), "web")
    expect_text(page.locator("#worst-rpo"), "db")
    expect_text(page.locator("#tile-agents .tile-value"), r"2\s*/ 2 up")
    expect_text(page.locator("#sites"), "primary")
    screenshot(page, env, "overview")

    page.click("header nav >> text=Protected VMs")
    rows = page.locator("#items tbody tr.item-row")
    sync_api.expect(rows).to_have_count(2)
    expect_text(page.locator("#items"), "normal")
    page.click("#items >> text=web")
    sync_api.expect(page).to_have_url(re.compile(rf"/ui/items/{env.items['web']}"))
    sync_api.expect(page.locator("svg.chart.rpo polyline.rpo-line")).to_have_count(1)
    sync_api.expect(page.locator("svg.chart.rpo text.threshold-label")).to_contain_text("threshold 60 s")
    assert page.locator("svg.chart.timeline line.mark").count() >= 1
    # live: new points arrive on the page without a reload (htmx swaps the fragment)
    page.evaluate("window.__noReload = 1")
    n0 = page.locator("svg.chart.timeline line.mark").count()
    until("new points on the page", lambda: page.locator("svg.chart.timeline line.mark").count() >= n0 + 2,
          60)
    assert page.evaluate("window.__noReload") == 1
    until("an app-consistent point", lambda: page.locator("svg.chart.timeline line.mark-app").count() >= 1,
          60)
    if os.environ.get("DRSITE_SCREENSHOTS"):  # a fuller picture for the docs
        until("a minute of points", lambda: page.locator("svg.chart.timeline line.mark").count() >= 14, 120)
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
    sync_api.expect(buttons).to_have_count(7)
    for i in range(7):
        sync_api.expect(buttons.nth(i)).to_be_disabled()
    page.goto(f"{env.url}/ui/jobs/{env.enable_jobs['db']}")
    expect_text(page.locator("#tasks"), "Initial replication")
    page.goto(f"{env.url}/ui/plans/tier1/test_failover")
    sync_api.expect(page.locator("#confirm")).to_be_disabled()
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    r = page.request.post(f"{env.url}/ui/plans/tier1/test_failover", form={"csrf": csrf},
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
    page.click("#item-buttons >> text=Verify recovery points")
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
