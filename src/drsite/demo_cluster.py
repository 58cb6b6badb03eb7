"""``drsite demo``: the whole product on this machine, driven through the vault's API.

A vault and two site agents run as separate processes (``drsite up``); file VMs on the primary
site write continuously; a policy and a protection group are created through the API, the
EnableProtection jobs run (progress bars follow the jobs), the vault's scheduler drives delta
cycles; then a recovery plan (network mappings, two groups, a script) runs a test failover and
its cleanup, a planned failover (the blake3 digests of every stopped source disk and of its
recovery VM's disk are printed: they must be equal), a commit that re-protects in the reverse
direction (bytes sent vs disk size), and the failback to the original VMs (digests again).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from drsite.client.api import VaultClient
from drsite.core.errors import DrsiteError, TransientError
from drsite.core.model import DiskSpec, Nic, VmSpec
from drsite.core.states import TERMINAL_JOB_STATES, JobState, TaskState
from drsite.demo import DemoOptions, DemoResult, seed_disk
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import WorkloadSpec
from drsite.store.digest import file_digest
from drsite.up import Cluster, down, up

MiB = 1024 * 1024


@dataclass
class ClusterDemoOptions(DemoOptions):
    keep_running: bool = False


def _until(what: str, check: Any, timeout: float, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        res = check()
        if res:
            return res
        if time.monotonic() > deadline:
            raise TransientError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def run_cluster_demo(opts: ClusterDemoOptions, console: Console | None = None) -> DemoResult:
    con = console or Console(stderr=opts.json_out)
    t0 = time.monotonic()
    root = opts.workdir.resolve()
    if root.exists():
        if (root / "cluster.json").exists():
            down(Cluster.load(root))
        shutil.rmtree(root)
    con.print(Panel.fit(
        f"[bold]drsite demo[/]: a vault and two site agents as processes on 127.0.0.1, under "
        f"[cyan]{root}[/]\n{opts.vms} file VMs × {opts.disks} disks × {opts.disk_mib} MiB on the "
        f"primary site, random 4 KiB writes at {opts.write_rate // 1024} KiB/s each; policy: "
        f"a cycle every {opts.frequency_s:g} s", title="drsite demo"))
    with con.status("starting the vault and the agents (drsite up)…"):
        cluster = up(root)
    con.print(f"[green]✓[/] vault {cluster.vault_url}; agents of sites [bold]primary[/] and "
              f"[bold]secondary[/] registered with client certificates and heart-beating")
    try:
        result = _drive(cluster, opts, con)
    finally:
        if not opts.keep_running:
            down(cluster)
            cluster.save()
            for site in ("primary", "secondary"):  # the VMs' guests are not cluster processes
                site_hv = FileHypervisor(root / site / "vms")
                for vm in site_hv.list_vms():
                    site_hv.power_off(vm.vm_id, force=True)
    result.seconds = time.monotonic() - t0
    if result.ok:
        con.print(Panel.fit("[bold green]failover and failback: every recovery VM equals its "
                            "source bit for bit[/] "
                            f"({result.seconds:.1f} s). Work directory: {root}"))
    else:
        con.print(Panel.fit("[bold red]MISMATCH between source and replica[/]"))
    if opts.keep_running:
        con.print("\n".join(["The cluster keeps running; to use the CLI against it:",
                             *cluster.env_lines(), f"Stop it with: drsite down --data {root}"]))
    if opts.json_out:
        print(json.dumps({"ok": result.ok, "seconds": result.seconds, "vms": result.vms},
                         indent=1))
    return result


def _drive(cluster: Cluster, opts: ClusterDemoOptions, con: Console) -> DemoResult:
    root = cluster.root
    hv = FileHypervisor(root / "primary" / "vms")
    rng = np.random.default_rng(20261123)
    size = opts.disk_mib * MiB
    names: list[str] = []
    for i in range(opts.vms):
        name = f"app-{i + 1:02d}"
        spec = VmSpec(name=name, vcpus=2, memory_mib=2048,
                      nics=(Nic("prod-net", f"52:54:00:00:00:{i + 1:02x}", f"10.0.0.{i + 11}"),),
                      disks=tuple(DiskSpec(f"disk{d}", size) for d in range(opts.disks)))
        vm = hv.create_blank(spec)
        for d in vm.disks:
            seed_disk(hv.disk_path(vm.vm_id, d.disk_id), d.size, opts.fill, rng)
        hv.set_workload(vm.vm_id, WorkloadSpec(pattern="random", io_size=4096,
                                               rate=opts.write_rate, seed=i + 1))
        hv.power_on(vm.vm_id)
        names.append(name)

    with cluster.client() as c:
        vms = _until("the primary agent to report the VMs",
                     lambda: [v for v in c.vms() if v.get("name") in names]
                     if len([v for v in c.vms() if v.get("name") in names]) == len(names) else None,
                     60)
        con.print(f"[green]✓[/] inventory: the primary agent reports {len(vms)} running VMs")
        c.create_policy({"name": "demo-policy", "frequency_s": opts.frequency_s,
                         "retention_hours": 24, "app_consistent_every_s": opts.frequency_s * 2,
                         "rpo_threshold_s": opts.frequency_s * 6, "resync_window": "00:00-00:00",
                         "compression": True, "encryption": False, "bandwidth_limit_bps": None})
        c.create_group({"name": "demo-group", "site": "primary", "target_site": "secondary",
                        "policy": "demo-policy",
                        "match": {"vm_names": names, "hosts": [], "labels": []}})
        con.print("[green]✓[/] policy [bold]demo-policy[/] and protection group "
                  "[bold]demo-group[/] created through the API")
        job_ids = _protect(c, vms, con)
        _show_jobs(c, job_ids, con)
        items = {it["vm_name"]: it for it in c.items() if it.get("vm_name") in names}

        con.rule(f"[bold]delta replication driven by the vault's scheduler ({opts.cycles} cycles)")
        start_seq = {n: len(c.points(items[n]["id"])) for n in names}
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/"
                      "{task.total:.0f} points"), TimeElapsedColumn(), console=con) as progress:
            tasks = {n: progress.add_task(n, total=opts.cycles) for n in names}
            deadline = time.monotonic() + opts.cycles * opts.frequency_s * 4 + 60
            while True:
                done = True
                for n in names:
                    got = len(c.points(items[n]["id"])) - start_seq[n]
                    progress.update(tasks[n], completed=min(got, opts.cycles))
                    done = done and got >= opts.cycles
                if done:
                    break
                if time.monotonic() > deadline:
                    raise TransientError("delta points did not arrive on time",
                                         hint=f"See the logs in {cluster.root / 'logs'}.")
                time.sleep(0.5)
        _show_items(c, names, con)

        return _failover_and_back(cluster, c, hv, vms, items, con)


def _follow_job(c: VaultClient, job: dict[str, Any], con: Console, what: str) -> dict[str, Any]:
    with Progress(TextColumn("{task.description:60}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=con) as pr:
        bar = pr.add_task(what, total=100)

        def upd(j: dict[str, Any]) -> None:
            running = [t for t in j.get("tasks", []) if t.get("state") == TaskState.RUNNING]
            label = f"{what}: {running[0]['title'] if running else j['state']}"
            pr.update(bar, description=label[:60], completed=float(j.get("progress") or 0))

        final = c.wait_job(job["id"], timeout=600, on_update=upd)
    if final["state"] != JobState.SUCCEEDED:
        raise DrsiteError(f"{what}: job {final['id']} {final['state']}: {final.get('error')}",
                          hint=f"drsite jobs show {final['id']}")
    _show_jobs(c, [final["id"]], con)
    return final


def _disk_digests(hv: FileHypervisor, vm_id: str) -> dict[str, str]:
    return {d.disk_id: file_digest(hv.disk_path(vm_id, d.disk_id), d.size)
            for d in hv.get_vm(vm_id).disks}


def _failover_and_back(cluster: Cluster, c: VaultClient, hv: FileHypervisor,
                       vms: list[dict[str, Any]], items: dict[str, dict[str, Any]],
                       con: Console) -> DemoResult:
    """A recovery plan through the API: test failover and cleanup, planned failover (proof: the
    recovery VMs' disks equal the stopped sources'), commit (re-protects: only differences
    travel), failback to the original VMs (proof again), commit."""
    root = cluster.root
    sec = FileHypervisor(root / "secondary" / "vms")
    names = [v["name"] for v in vms]
    for a, b, test, rule in (("primary", "secondary", "dr-test",
                              {"kind": "subnet", "source": "10.0.0.0/24", "target": "10.1.0.0/24"}),
                             ("secondary", "primary", "prod-test",
                              {"kind": "subnet", "source": "10.1.0.0/24", "target": "10.0.0.0/24"})):
        c.set_network_mapping({"source_site": a, "recovery_site": b,
                               "source_network": "prod-net" if a == "primary" else "dr-net",
                               "recovery_network": "dr-net" if a == "primary" else "prod-net",
                               "test_network": test, "ip_rule": rule})
    groups = [{"name": "first", "vms": names[:1],
               "pre": [{"script": "echo \"$DRSITE_PLAN: $DRSITE_PLAN_ACTION of $DRSITE_GROUP\"",
                        "timeout_s": 30}]}]
    if len(names) > 1:
        groups.append({"name": "rest", "vms": names[1:]})
    diff = c.apply_plans([{"name": "demo-plan", "description": "the demo's VMs, in two groups",
                           "groups": groups}])
    con.print(f"[green]✓[/] network mappings prod-net → dr-net (test: dr-test, 10.0.0.0/24 → "
              f"10.1.0.0/24) and back; recovery plan [bold]demo-plan[/] "
              f"{diff['changes'][0]['change']}d with {len(groups)} group(s)")

    con.rule("[bold]test failover of the plan (copy-on-write VMs in the test network)")
    _follow_job(c, c.plan_action("demo-plan", "test-failover"), con, "test failover")
    tests = [v for v in sec.list_vms() if v.name.endswith("-test")]
    con.print(f"[green]✓[/] {len(tests)} test VM(s) running on the secondary in network "
              f"{tests[0].nics[0].network if tests and tests[0].nics else '-'}; replication went on")
    _follow_job(c, c.plan_action("demo-plan", "cleanup-test-failover", notes="demo: all good"),
                con, "cleanup test failover")

    con.rule("[bold]planned failover of the plan: sources shut down, last changes shipped")
    _follow_job(c, c.plan_action("demo-plan", "planned-failover"), con, "planned failover")
    result = DemoResult(ok=True, seconds=0.0)
    proof = Table(title="planned failover: recovery VM vs stopped source (blake3 of each disk)")
    for col in ("VM", "disk", "source (stopped)", "recovery VM (secondary)", "equal"):
        proof.add_column(col)
    rec_vms: dict[str, str] = {}
    for vm in vms:
        rec = sec.find_vm(vm["name"])
        rec_vms[vm["name"]] = rec.vm_id
        src, dst = _disk_digests(hv, vm["vm_id"]), _disk_digests(sec, rec.vm_id)
        entry: dict[str, Any] = {"vm": vm["name"], "item_id": items[vm["name"]]["id"], "disks": []}
        for d in sorted(src):
            same = src[d] == dst.get(d)
            result.ok = result.ok and same
            proof.add_row(vm["name"], d, src[d][:16], str(dst.get(d, "-"))[:16],
                          "[green]yes[/]" if same else "[red]NO[/]")
            entry["disks"].append({"disk": d, "source": src[d], "recovery": dst.get(d), "equal": same})
        result.vms.append(entry)
    con.print(proof)

    for n, vm_id in rec_vms.items():  # the failed-over VMs run and write
        sec.set_workload(vm_id, WorkloadSpec(pattern="random", io_size=4096, rate=256 * 1024,
                                             seed=len(n) + 100))
    time.sleep(2)
    con.rule("[bold]commit: the recovery VMs replicate back to the primary (re-protect)")
    _follow_job(c, c.plan_action("demo-plan", "commit"), con, "commit + re-protect")
    t = Table(title="re-protect: resync against the old primary's disks")
    for col in ("VM", "disk bytes", "bytes sent", "share"):
        t.add_column(col)
    for n in names:
        fo = c.failovers(items[n]["id"])[0]
        rp = (fo.get("result") or {}).get("reprotect") or {}
        disk, sent = int(rp.get("disk_bytes") or 0), int(rp.get("bytes_sent") or 0)
        t.add_row(n, f"{disk:,}", f"{sent:,}", f"{100 * sent / max(disk, 1):.2f} %")
    con.print(t)

    con.rule("[bold]failback: planned failover of the plan back to the original VMs")
    time.sleep(2)
    _follow_job(c, c.plan_action("demo-plan", "failback"), con, "failback")
    back = Table(title="failback: original VM vs the stopped recovery VM (blake3 of each disk)")
    for col in ("VM", "disk", "recovery VM (stopped)", "original VM (primary)", "equal"):
        back.add_column(col)
    for vm in vms:
        orig = hv.find_vm(vm["name"])
        src, dst = _disk_digests(sec, rec_vms[vm["name"]]), _disk_digests(hv, orig.vm_id)
        for d in sorted(src):
            same = src[d] == dst.get(d)
            result.ok = result.ok and same
            back.add_row(vm["name"], d, src[d][:16], str(dst.get(d, "-"))[:16],
                         "[green]yes[/]" if same else "[red]NO[/]")
    con.print(back)
    _follow_job(c, c.plan_action("demo-plan", "commit"), con, "commit failback + re-protect")
    _show_items(c, names, con)
    return result


def _protect(c: VaultClient, vms: list[dict[str, Any]], con: Console) -> list[str]:
    """The group's policy protects its VMs (PolicyAssociation → EnableProtection jobs); follow
    them with progress bars."""
    con.rule("[bold]enable protection: EnableProtection jobs (initial replication)")
    names = {v["name"] for v in vms}

    def enable_jobs() -> list[dict[str, Any]] | None:
        jobs = [j for j in c.jobs(kind="EnableProtection", limit=200)
                if any(n in json.dumps(j.get("target", "")) for n in names)]
        return jobs if len(jobs) >= len(names) else None

    try:
        jobs = _until("EnableProtection jobs for the group's VMs", enable_jobs, 20)
    except TransientError:
        jobs = [c.job(c.protect(v["vm_id"], "demo-group")["job_id"]) for v in vms]
    ids = [j["id"] for j in jobs]
    with Progress(TextColumn("{task.description:40}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  console=con) as progress:
        bars = {jid: progress.add_task(jid, total=100) for jid in ids}
        while True:
            states = []
            for jid in ids:
                job = c.job(jid)
                running = [t for t in job.get("tasks", []) if t.get("state") == TaskState.RUNNING]
                label = f"{job.get('target', '')}: {running[0]['name'] if running else job['state']}"
                progress.update(bars[jid], description=label[:40],
                                completed=float(job.get("progress") or 0))
                states.append(job["state"])
            if all(s in TERMINAL_JOB_STATES for s in states):
                break
            time.sleep(0.5)
    failed = [jid for jid, s in zip(ids, states, strict=True) if s != JobState.SUCCEEDED]
    if failed:
        job = c.job(failed[0])
        raise DrsiteError(f"EnableProtection job {failed[0]} ended {job['state']}: "
                          f"{job.get('error')}", hint=f"drsite jobs show {failed[0]}")
    return ids


def _show_jobs(c: VaultClient, job_ids: list[str], con: Console) -> None:
    job = c.job(job_ids[0])
    t = Table(title=f"job {job['id']} ({job['kind']}, {job['state']}): its tasks")
    for col in ("task", "state", "seconds"):
        t.add_column(col)
    for task in job.get("tasks", []):
        secs = (task.get("ended_at") or 0) - (task.get("started_at") or 0)
        t.add_row(task.get("title") or task["name"], task["state"], f"{max(secs, 0):.1f}")
    con.print(t)


def _show_items(c: VaultClient, names: list[str], con: Console) -> None:
    t = Table(title="protected items (from the vault)")
    for col in ("VM", "site", "protection", "health", "RPO", "points", "last point"):
        t.add_column(col)
    for it in c.items():
        if it.get("vm_name") not in names:
            continue
        pts = c.points(it["id"])
        t.add_row(it["vm_name"], str(it.get("site")), str(it.get("protection")),
                  str(it.get("health")),
                  f"{it.get('rpo_s') or 0:.1f} s", str(len(pts)),
                  pts[-1]["point_id"] if pts else "-")
    con.print(t)
