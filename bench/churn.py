"""Churn capacity: the highest guest write rate a protected VM sustains within its RPO.

For each I/O pattern (4 KiB random, 64 KiB random, 1 MiB sequential writes) and each policy
frequency (10 s, 30 s), a file VM (one disk of ``--disk-gib``, prefilled with incompressible
data so every block is allocated, as the disk of a VM in use; ``--sparse`` starts empty) runs
the seeded workload as its own guest process at a fixed rate while the engine protects it, as a
user runs it: its own process, one ``ItemReplicator`` looping ``run_cycle`` at the policy
frequency (a short retention keeps the store small), to a local recovery store with a hydrated
replica (``--target local``), or to a secondary agent's store server over mTLS (``--target
site``: a store server process with its CA and agent certificates, hydrating its replica after
every commit).

Per pattern, on one VM:

* **unprotected reference** (before any tracking): the workload unlimited (the guest's own
  limit), then at each rate, achieved write rate over ``--unprotected-window``;
* **protected**, per frequency F: a new engine (new epoch, initial copy of the disk), then the
  workload steps through the rates, ascending; per rate ``--warmup-cycles`` cycles to reach
  steady state, then the window (``--window`` s): every 0.25 s the measured RPO = now −
  creation time of the newest committed point (the design's definition), the engine's RSS;
  the guest's achieved write rate and both processes' CPU over the window; the engine's exact
  peak RSS per cycle phase (``phase_peak_mib``: its VmHWM, read and reset at each phase).

A rate *passes* when the RPO stayed ≤ 2 F for the whole window; the ramp stops at the first
failure (``--all-rates`` goes on). The highest passing rate is the capacity, reported with the
protected / unprotected write-rate ratio at that rate (goal ≥ 0.9). Goals: 4 KiB random
≥ 100 MiB/s, 64 KiB random ≥ 300 MiB/s, or the unprotected guest's own limit if lower. The
RPO-vs-churn curve is drawn with matplotlib (``--plot``). Mind the seed's rule: a cycle whose
change log covers more than half of a disk becomes a resync, so rate × F must stay well below
half the disk.

    .venv/bin/python bench/churn.py [--quick] [--window 60] [--target local|site]
        [--patterns 4k,64k,1m] [--frequencies 10,30] [--disk-gib 8] [--plot bench/churn.png]

Internal modes (run by the benchmark itself): ``churn.py engine ...``, ``churn.py site-server``,
``churn.py qemu-writer``; ``churn.py plot OUT.png RUN.json...`` draws several runs in one figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    GiB,
    KiB,
    MiB,
    machine_info,
    process_cpu_seconds,
    workdir,
    write_json,
)

from drsite.core.errors import ObjectNotFound
from drsite.core.model import DiskSpec, VmSpec
from drsite.core.retention import RetentionRule
from drsite.hypervisors.contract import HypervisorDriver
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.hypervisors.file.workload import Workload, WorkloadSpec
from drsite.hypervisors.qemu.driver import QemuHypervisor
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.nbd import NbdClient
from drsite.memtune import tune_malloc
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.report import CYCLE_PHASES
from drsite.replication.target import LocalTarget, RecoveryTarget
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

RPO_FACTOR = 2.0
RATIO_GOAL = 0.9
GOALS = {"4k": 100 * MiB, "64k": 300 * MiB}


@dataclass(frozen=True)
class Pattern:
    name: str
    io: int
    pattern: str  # "random" | "sequential"
    rates_mib: tuple[int, ...]  # offered rates tried, ascending


PATTERNS = {
    "4k": Pattern("4k", 4 * KiB, "random", (25, 50, 100, 150, 200)),
    "64k": Pattern("64k", 64 * KiB, "random", (100, 200, 300, 400)),
    "1m": Pattern("1m", MiB, "sequential", (100, 200, 300, 400, 600)),
}
QUICK_RATES = {"4k": (25, 100), "64k": (100, 300), "1m": (100, 300)}
ITEM = "churn"


# -- processes ---------------------------------------------------------------------------------

def peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def load1() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


def make_driver(kind: str, root: Path) -> HypervisorDriver:
    if kind == "qemu":
        return QemuHypervisor(root)
    return FileHypervisor(root)


class _NbdWriter:
    """The workload's block layer for a QEMU VM: its writes go through a writable NBD export
    of the disk's top node (QEMU's block layer and dirty bitmaps see them as guest writes),
    each batch pipelined like a guest's request queue."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client

    def write_many(self, writes: Any, *, tag: int | None = None) -> None:
        self.client.write_many([(off, data) for _, off, data in writes], inflight=32)


def qemu_writer_main(argv: list[str]) -> int:
    """Run the seeded workload against a QEMU VM's guest export until SIGTERM; every 0.2 s
    ``{"bytes_written", "pid"}`` goes to ``--stats``."""
    ap = argparse.ArgumentParser(prog="churn.py qemu-writer")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--spec", required=True, help="WorkloadSpec as JSON")
    ap.add_argument("--stats", type=Path, required=True)
    a = ap.parse_args(argv)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    spec = WorkloadSpec.from_dict(json.loads(a.spec))
    client = NbdClient.connect_unix(a.socket, a.export, timeout=120.0)
    wl = Workload(_NbdWriter(client), [DiskSpec("disk0", client.size)], spec)
    wl.start()
    try:
        while not stop and wl.running:
            tmp = a.stats.with_suffix(".tmp")
            tmp.write_text(json.dumps({"bytes_written": wl.bytes_written, "pid": os.getpid(),
                                       "error": wl.error}))
            tmp.replace(a.stats)
            time.sleep(0.2)
    finally:
        wl.stop()
        client.close()
    return 0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the engine process ------------------------------------------------------------------------

class PhasePeaks:
    """The engine's exact peak RSS per cycle phase: whenever the replicator marks a phase done
    (``ItemReplicator._marks``, what ``ItemReport.last_cycle`` is made of) the kernel's
    high-water mark (VmHWM) is read — the peak since the previous mark — and reset
    (``clear_refs`` 5). Polls every 5 ms: phases marked within one poll share their peak (named
    "a+b"). ``idle`` is the time between cycles. No sampling misses a spike, unlike a poll of
    VmRSS."""

    def __init__(self, item: ItemReplicator) -> None:
        self._item = item
        self._lock = threading.Lock()
        self._seen: tuple[float, frozenset[str]] = (0.0, frozenset())
        self.cycle: dict[str, int] = {}   # phase → peak bytes, of the cycle under way
        _reset_hwm()
        threading.Thread(target=self._run, daemon=True, name="phase-peaks").start()

    def _run(self) -> None:
        while True:
            self.poll()
            time.sleep(0.005)

    def poll(self) -> None:
        with self._lock:
            marks = dict(self._item._marks)
            start = marks.get("start", 0.0)
            done = frozenset(marks) - {"start"}
            seen_start, seen = self._seen
            if start != seen_start:   # a new cycle: the time since the last mark was idle
                self._note("idle")
                seen = frozenset()
            new = [ph for ph in CYCLE_PHASES if ph in done - seen]
            if new:
                self._note("+".join(new))
            self._seen = (start, done)

    def _note(self, phase: str) -> None:
        self.cycle[phase] = max(self.cycle.get(phase, 0), peak_rss(os.getpid()))
        _reset_hwm()

    def take(self) -> dict[str, int]:
        """The peaks (MiB) noted since the last take (call after a cycle: its phases)."""
        self.poll()
        with self._lock:
            out, self.cycle = self.cycle, {}
        return {k: v >> 20 for k, v in out.items()}


def _reset_hwm() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # where not allowed, a phase's peak is the process's so far


def engine_main(argv: list[str]) -> int:
    """Protect one file VM until SIGTERM: initial point, then a cycle every ``--frequency``
    seconds (the loop of ``drsite replicate --until forever``), with a short retention so the
    store does not grow with the churn. One JSON line per committed point to ``--events``."""
    ap = argparse.ArgumentParser(prog="churn.py engine")
    ap.add_argument("--vms", type=Path, required=True)
    ap.add_argument("--vm", required=True)
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--frequency", type=float, required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--store", type=Path, help="local recovery store directory")
    ap.add_argument("--replicas", type=Path, help="hydrated replicas (local target)")
    ap.add_argument("--site", type=Path, help="JSON file describing a site store server")
    ap.add_argument("--driver", choices=("file", "qemu"), default="file")
    a = ap.parse_args(argv)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    tune_malloc()   # as 'drsite agent run' and 'drsite replicate' do
    hv = make_driver(a.driver, a.vms)
    vm = hv.find_vm(a.vm)
    target: RecoveryTarget
    if a.site is not None:
        from drsite.sitestore import SITE_TARGET_OPTIONS, SiteObjectStore, SiteTarget
        from drsite.tlsutil import client_context

        info = json.loads(a.site.read_text())
        ctx = client_context(Path(info["ca"]), Path(info["cert"]), Path(info["key"]))
        # as an agent builds it
        target = SiteTarget(SiteObjectStore(info["url"], ctx), ITEM, **SITE_TARGET_OPTIONS)
    else:
        repo = Repository(LocalObjectStore(a.store), ITEM)
        target = LocalTarget(repo, ReplicaHydrator(repo, a.replicas / ITEM) if a.replicas
                             else None)
    keep = RetentionRule(retention_s=3 * a.frequency, keep_all_s=0.0,
                         thin_interval_s=3600.0, app_interval_s=3600.0)
    rehome = os.environ.get("CHURN_REHOME_SHARE")   # set by --rehome-share
    settings = ReplicationSettings(frequency_s=a.frequency, app_consistent_every_s=None,
                                   resync_window=ALWAYS, retention=keep,
                                   **({"rehome_share": float(rehome)} if rehome else {}))
    item = ItemReplicator(item_id=ITEM, vm_id=vm.vm_id, driver=hv, target=target,
                          state_dir=a.state, settings=settings)
    peaks = PhasePeaks(item)
    with a.events.open("a") as ev:
        def record(kind: str, t0: float, point: Any) -> None:
            rep = item.report
            ev.write(json.dumps({"kind": kind, "point": point.point_id,
                                 "created_at": point.created_at, "committed_at": time.time(),
                                 "started_at": t0, "bytes_sent": rep.bytes_sent,
                                 "bytes_stored": rep.bytes_stored,
                                 "rehomed": int(point.meta.get("rehomed") or 0),
                                 "phases": rep.last_cycle, "peak_mib": peaks.take()}) + "\n")
            ev.flush()

        t0 = time.time()
        record("initial", t0, item.run_initial())
        while not stop:
            wait = item.next_due() - time.time()
            while wait > 0 and not stop:
                time.sleep(min(wait, 0.1))
                wait = item.next_due() - time.time()
            if stop:
                break
            t0 = time.time()
            record("delta", t0, item.run_cycle())
    return 0


def site_server_main(argv: list[str]) -> int:
    """A secondary site's store server (mTLS, replicas hydrated after each commit) until
    SIGTERM; writes ``{"url", "ca", "cert", "key", "store"}`` (the client's view) to ``--info``."""
    from drsite.sitestore.testing import RunningSiteStore

    ap = argparse.ArgumentParser(prog="churn.py site-server")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--info", type=Path, required=True)
    a = ap.parse_args(argv)
    stopped = False

    def on_term(*_: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, on_term)
    srv = RunningSiteStore(a.dir)
    tmp = a.info.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": srv.url, "ca": str(srv.certs.ca_file),
                               "cert": str(srv.certs.client_cert),
                               "key": str(srv.certs.client_key),
                               "store": str(a.dir / "store"), "replicas": str(srv.replicas)}))
    tmp.replace(a.info)
    while not stopped:
        time.sleep(0.2)
    srv.stop()
    return 0


# -- trials ------------------------------------------------------------------------------------

def per_s(a: float | None, b: float | None, seconds: float) -> float:
    """(b - a) / seconds; NaN when either reading is missing (the guest did not answer)."""
    return float("nan") if a is None or b is None else (b - a) / seconds


def rss_parts(pid: int) -> tuple[int, int, int]:
    """(RssAnon, RssFile, RssShmem) of ``pid`` in bytes; zeros if it is gone."""
    out = {"RssAnon:": 0, "RssFile:": 0, "RssShmem:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k = line.split(maxsplit=1)[0] if line else ""
            if k in out:
                out[k] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out["RssAnon:"], out["RssFile:"], out["RssShmem:"]


def vm_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Bench:
    """One VM per pattern (prefilled: an in-use disk, every block allocated), measured first
    unprotected (no tracking), then protected by one engine per frequency whose workload steps
    through the rates."""

    def __init__(self, root: Path, disk_size: int, target: str, prefill: bool,
                 driver: str = "file") -> None:
        self.root = root
        self.disk_size = disk_size
        self.target = target
        self.prefill = prefill
        self.driver = driver
        self.hv: Any = make_driver(driver, root / "vms")
        self.n = 0
        self.site: dict[str, str] | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._writer: subprocess.Popen[bytes] | None = None
        if target == "site":
            self._start_site()

    def _start_site(self) -> None:
        info = self.root / "site.json"
        self._server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "site-server",
             "--dir", str(self.root / "site"), "--info", str(info)], cwd=BENCH_DIR.parent)
        deadline = time.monotonic() + 60
        while not info.exists():
            if self._server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the site store server did not start")
            time.sleep(0.1)
        self.site = json.loads(info.read_text())

    def close(self) -> None:
        if self._server is not None:
            stop_process(self._server)

    def _replica_current(self) -> bool:
        """The site server's replica holds a point and applies none (local target: True)."""
        if not self.site:
            return True
        try:
            st = json.loads((Path(self.site["replicas"]) / ITEM / "state.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(st.get("point_id")) and not st.get("applying")

    def store_dir(self) -> Path:
        return Path(self.site["store"]) if self.site else self.root / "store"

    def new_vm(self) -> tuple[str, str]:
        """A stopped VM with one disk; prefilled with incompressible data unless sparse."""
        self.n += 1
        name = f"churn{self.n}"
        img = self.root / f"{name}.raw"
        with open(img, "wb") as f:
            f.truncate(self.disk_size)
            if self.prefill:
                chunk = os.urandom(64 * MiB)
                for off in range(0, self.disk_size, len(chunk)):
                    os.pwrite(f.fileno(), chunk[:min(len(chunk), self.disk_size - off)], off)
                os.fsync(f.fileno())
                # not cached: a disk in use is not one big run of freshly written large folios
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        vm = self.hv.create_vm(VmSpec(name=name, vcpus=1, memory_mib=512,
                                      disks=(DiskSpec("disk0", self.disk_size),)),
                               {"disk0": str(img)})
        return vm.vm_id, name

    def drop_vm(self, vm_id: str) -> None:
        self.stop_workload(vm_id)
        with contextlib.suppress(Exception):
            self.hv.power_off(vm_id, force=True)
        self.hv.delete_vm(vm_id)

    # -- the guest's workload: the file guest's own, or a writer process on QEMU's export ----

    def start_workload(self, vm_id: str, spec: WorkloadSpec) -> None:
        if self.driver == "file":
            self.hv.set_workload(vm_id, spec)
            return
        self.stop_workload(vm_id)
        # the guest export of the disk's top node (made by the driver's own write path)
        self.hv.write(vm_id, "disk0", 0, bytes(4096))
        stats = self.root / "writer.json"
        stats.unlink(missing_ok=True)
        self._writer = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "qemu-writer",
             "--socket", str(VmDir(self.hv.vm_dir(vm_id)).nbd_socket), "--export",
             "guest-drv0", "--spec", json.dumps(spec.to_dict()), "--stats", str(stats)],
            cwd=BENCH_DIR.parent)
        deadline = time.monotonic() + 30
        while not stats.exists():
            if self._writer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the QEMU workload writer did not start")
            time.sleep(0.05)

    def stop_workload(self, vm_id: str) -> None:
        if self.driver == "file":
            with contextlib.suppress(Exception):
                self.hv.set_workload(vm_id, None)
            return
        if self._writer is not None:
            stop_process(self._writer, timeout=30)
            self._writer = None

    def _file_status(self, vm_id: str) -> dict[str, Any] | None:
        """The file guest's status; None when it did not answer (its call times out after
        10 s) twice in a row: the caller marks the measurement invalid instead of reading 0."""
        for _ in range(2):
            st = self.hv.guest_status(vm_id)
            if st is not None:
                return st  # type: ignore[no-any-return]
        return None

    def guest_bytes(self, vm_id: str) -> int | None:
        """Bytes the workload wrote so far; None when the guest did not answer."""
        if self.driver == "file":
            st = self._file_status(vm_id)
            if st is None:
                return None
            return int(st["workload"]["bytes_written"]) if st.get("workload") else 0
        try:
            return int(json.loads((self.root / "writer.json").read_text())["bytes_written"])
        except (OSError, ValueError, KeyError):
            return 0

    def guest_cpu(self, vm_id: str) -> float | None:
        """CPU seconds of what makes the guest's writes: the file guest process, or the
        workload writer plus QEMU; None when the file guest did not answer."""
        if self.driver == "file":
            st = self._file_status(vm_id)
            return process_cpu_seconds(int(st["pid"])) if st else None
        r = self.hv.runner(vm_id)
        w = self._writer.pid if self._writer is not None else -1
        return process_cpu_seconds(w) + (process_cpu_seconds(r.pid) if r is not None else 0.0)

    def drop_item(self) -> None:
        import shutil

        shutil.rmtree(self.store_dir() / "items" / ITEM, ignore_errors=True)
        shutil.rmtree(self.root / "replicas", ignore_errors=True)
        if self.site:
            shutil.rmtree(Path(self.site["replicas"]) / ITEM, ignore_errors=True)
        shutil.rmtree(self.root / "state", ignore_errors=True)

    def unprotected(self, vm_id: str, p: Pattern, rate: int, window: float,
                    warmup: float) -> dict[str, Any]:
        """The workload on the untracked, running VM: achieved bytes/s over ``window``."""
        self.start_workload(vm_id, WorkloadSpec(pattern=p.pattern, io_size=p.io, rate=rate,
                                                seed=self.n))  # type: ignore[arg-type]
        try:
            time.sleep(warmup)
            b0, c0, t0 = self.guest_bytes(vm_id), self.guest_cpu(vm_id), time.monotonic()
            time.sleep(window)
            b1, c1, t1 = self.guest_bytes(vm_id), self.guest_cpu(vm_id), time.monotonic()
        finally:
            self.stop_workload(vm_id)
        return {"rate": rate, "achieved": per_s(b0, b1, t1 - t0),
                "guest_cpu": per_s(c0, c1, t1 - t0), "window": t1 - t0,
                "guest_unanswered": b0 is None or b1 is None}

    def protected(self, vm_id: str, name: str, p: Pattern, rates: list[int], freq: float,
                  window: float, warmup_cycles: float, unprotected: dict[str, Any],
                  all_rates: bool, log: Any) -> list[dict[str, Any]]:
        """One engine protecting the VM at ``freq``; the workload steps through ``rates``
        (ascending) until one fails its RPO (all of them with ``all_rates``)."""
        self.drop_item()
        events = self.root / f"events-{self.n}-{freq:g}.jsonl"
        cmd = [sys.executable, str(Path(__file__).resolve()), "engine",
               "--vms", str(self.root / "vms"), "--vm", name,
               "--state", str(self.root / "state"), "--frequency", str(freq),
               "--events", str(events), "--driver", self.driver]
        if self.site:
            cmd += ["--site", str(self.root / "site.json")]
        else:
            cmd += ["--store", str(self.store_dir()), "--replicas", str(self.root / "replicas")]
        repo = Repository(LocalObjectStore(self.store_dir()), ITEM)
        trials: list[dict[str, Any]] = []
        engine = subprocess.Popen(cmd, cwd=BENCH_DIR.parent)
        try:
            t_init = time.monotonic()
            # the engine's initial copy is done when it records it (after the commit and the
            # target's after_commit) and, on a site store (whose catch-up runs in the
            # background), when the server's replica holds it: the trials measure steady
            # state, not the initial hydration
            while not (events.exists() and '"initial"' in events.read_text()
                       and self._replica_current()):
                if engine.poll() is not None or time.monotonic() - t_init > 900:
                    raise RuntimeError(f"engine did not commit the initial point "
                                       f"(exit {engine.poll()})")
                time.sleep(0.1)
            initial_s = time.monotonic() - t_init
            for rate in rates:
                self.start_workload(vm_id, WorkloadSpec(
                    pattern=p.pattern, io_size=p.io, rate=rate,  # type: ignore[arg-type]
                    seed=self.n, start_seq=10**9 * (len(trials) + 1)))
                t = self._window(vm_id, engine, repo, freq, window, warmup_cycles, events)
                t.update({"rate": rate, "frequency": freq, "initial_seconds": initial_s})
                un = unprotected[str(rate)]
                t["ratio"] = t["achieved"] / un["achieved"] if un["achieved"] else 0.0
                trials.append(t)
                print(f"[{p.name} @ {rate / MiB:.0f} MiB/s, {freq:g} s] RPO max "
                      f"{t['rpo_max']:.1f} s (p99 {t['rpo_p99']:.1f}, mean {t['rpo_mean']:.1f}) "
                      f"{'PASS' if t['passed'] else 'FAIL'}; guest {t['achieved'] / MiB:.0f} MiB/s"
                      f" protected vs {un['achieved'] / MiB:.0f} unprotected (ratio "
                      f"{t['ratio']:.2f}); engine RSS max {t['engine_rss_max'] / MiB:.0f} MiB, "
                      f"CPU {t['engine_cpu']:.2f}, guest CPU {t['guest_cpu']:.2f}; cycles "
                      f"{t['cycles']} (longest {t['cycle_seconds_max']:.1f} s); load "
                      f"{t['load1'][0]:.1f}-{t['load1'][1]:.1f}; peak RSS per phase (MiB) "
                      f"{t['phase_peak_mib']}", file=log, flush=True)
                if not t["passed"] and not all_rates:
                    break
        finally:
            self.stop_workload(vm_id)
            stop_process(engine, timeout=max(60.0, 4 * freq))
            repo.close()
            events.unlink(missing_ok=True)
            self.drop_item()
        return trials

    def _window(self, vm_id: str, engine: subprocess.Popen[bytes], repo: Repository,
                freq: float, window: float, warmup_cycles: float, events: Path
                ) -> dict[str, Any]:
        end_warm = time.monotonic() + warmup_cycles * freq
        while time.monotonic() < end_warm:
            if engine.poll() is not None:
                raise RuntimeError(f"engine exited with {engine.returncode}")
            time.sleep(0.25)
        b0, t0, w0 = self.guest_bytes(vm_id), time.monotonic(), time.time()
        gc0, ec0 = self.guest_cpu(vm_id), process_cpu_seconds(engine.pid)
        rpo: list[float] = []
        rss = 0
        # (s into the window, engine RSS, its anonymous, file-backed and shared parts) every ~5 s
        rss_log: list[tuple[float, int, int, int, int]] = []
        load = [load1()]
        while time.monotonic() - t0 < window:
            if engine.poll() is not None:
                raise RuntimeError(f"engine exited with {engine.returncode}")
            latest = repo.latest()
            assert latest is not None
            rpo.append(time.time() - latest.created_at)
            now_rss = vm_rss(engine.pid)
            rss = max(rss, now_rss)
            if not rss_log or time.monotonic() - t0 - rss_log[-1][0] >= 5.0:
                rss_log.append((round(time.monotonic() - t0, 1), now_rss,
                                *rss_parts(engine.pid)))
            time.sleep(0.25)
        b1, t1, w1 = self.guest_bytes(vm_id), time.monotonic(), time.time()
        gc1, ec1 = self.guest_cpu(vm_id), process_cpu_seconds(engine.pid)
        load.append(load1())
        try:   # the item's objects in the store (a site store's: not measured here)
            store_bytes: int | None = None if self.site else repo.storage_bytes()
        except (OSError, ObjectNotFound):
            store_bytes = None   # an object deleted while listed (GC)
        cycles = [json.loads(x) for x in events.read_text().splitlines()] \
            if events.exists() else []
        mine = [c for c in cycles if c["kind"] == "delta" and w0 <= c["committed_at"] <= w1]
        durations = [c["committed_at"] - c["started_at"] for c in mine]
        return {
            "achieved": per_s(b0, b1, t1 - t0), "window": t1 - t0,
            "rpo_max": max(rpo), "rpo_mean": sum(rpo) / len(rpo),
            "rpo_p99": sorted(rpo)[int(0.99 * (len(rpo) - 1))], "rpo_samples": len(rpo),
            # a window whose guest did not answer has no write rate: it cannot pass
            "passed": max(rpo) <= RPO_FACTOR * freq and b0 is not None and b1 is not None,
            "guest_unanswered": b0 is None or b1 is None,
            # the engine resets its VmHWM at each phase (PhasePeaks): its peak over the
            # window's cycles is the highest phase peak
            "engine_rss_max": rss,
            "engine_peak_rss": max(peak_rss(engine.pid),
                                   max(phase_peak(mine).values(), default=0) << 20),
            "engine_rss_log": rss_log,
            "engine_cpu": (ec1 - ec0) / (t1 - t0), "guest_cpu": per_s(gc0, gc1, t1 - t0),
            "load1": load, "cycles": len(mine),
            "cycle_seconds_max": max(durations, default=0.0),
            "cycle_seconds_mean": sum(durations) / len(durations) if durations else 0.0,
            "store_bytes": store_bytes,
            # per cycle: committed (s into the window), took (s), sealed-to-commit (s: the RPO
            # it left), bytes re-homed, where its time went (ItemReport.last_cycle)
            "cycle_log": [[round(c["committed_at"] - w0, 2),
                           round(c["committed_at"] - c["started_at"], 2),
                           round(c["committed_at"] - c["created_at"], 2),
                           int(c.get("rehomed") or 0), c.get("phases")] for c in mine],
            # the engine's exact peak RSS (MiB) per phase over the window's cycles (VmHWM)
            "phase_peak_mib": phase_peak(mine),
        }


def phase_peak(cycles: list[dict[str, Any]]) -> dict[str, int]:
    """The highest peak of each phase over ``cycles`` (their ``peak_mib``)."""
    out: dict[str, int] = {}
    for c in cycles:
        for k, v in (c.get("peak_mib") or {}).items():
            out[k] = max(out.get(k, 0), int(v))
    return out


# -- the benchmark -----------------------------------------------------------------------------

def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """One panel per run (driver, target) and frequency: max RPO against offered write rate,
    one line per I/O pattern, the 2x-frequency limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r["frequencies"]) for r in runs)
    rows = len(runs)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, r in enumerate(runs):
        for j, f in enumerate(r["frequencies"]):
            ax = axes[i][j]
            ax.set_visible(True)
            top = RPO_FACTOR * f
            for name, pr in r["patterns"].items():
                trials = sorted(pr["protected"].get(str(f), []), key=lambda t: t["rate"])
                if trials:
                    xs = [t["rate"] / MiB for t in trials]
                    ys = [t.get("rpo_max", float("nan")) for t in trials]
                    top = max(top, *ys)
                    disk = trials[0].get("disk_size", pr.get("disk_size", r["disk_size"])) / GiB
                    ax.plot(xs, ys, marker="o",
                            label=f"{name} {PATTERNS[name].pattern} ({disk:.0f} GiB disk)")
            ax.axhline(RPO_FACTOR * f, color="red", linestyle="--", linewidth=1,
                       label=f"{RPO_FACTOR:.0f}× frequency (limit)")
            ax.set_ylim(0, top * 1.1)
            ax.set_title(f"{r.get('driver', 'file')} VM → {r['target']} target, frequency "
                         f"{f:g} s", fontsize=10)
            ax.set_xlabel("guest write rate offered (MiB/s)")
            ax.set_ylabel("max RPO over the window (s)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    first = runs[0]
    fig.suptitle(f"drsite churn, {first['stamp']}: {first['machine']['nproc']} CPUs, "
                 f"disks{' prefilled' if first.get('prefilled') else ' sparse'}, window "
                 f"{first['window']:.0f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_main(argv: list[str]) -> int:
    """``churn.py plot OUT.png RUN.json...``: one figure of several runs' curves; runs of the
    same driver and target (e.g. one run per pattern) share a panel, one line per pattern."""
    ap = argparse.ArgumentParser(prog="churn.py plot")
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    a = ap.parse_args(argv)
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for path in a.runs:
        r = json.loads(path.read_text())
        for pr in r["patterns"].values():
            pr.setdefault("disk_size", r["disk_size"])
            for trials in pr["protected"].values():
                for t in trials:
                    t.setdefault("disk_size", r["disk_size"])
        key = (r.get("driver", "file"), r["target"])
        if key not in merged:
            merged[key] = r
            continue
        m = merged[key]
        for name, pr in r["patterns"].items():
            if name in m["patterns"]:  # the same pattern at other frequencies
                m["patterns"][name]["protected"].update(pr["protected"])
            else:
                m["patterns"][name] = pr
        m["frequencies"] = sorted(set(m["frequencies"]) | set(r["frequencies"]))
    plot(list(merged.values()), a.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["engine"]:
        return engine_main(args[1:])
    if args[:1] == ["site-server"]:
        return site_server_main(args[1:])
    if args[:1] == ["qemu-writer"]:
        return qemu_writer_main(args[1:])
    if args[:1] == ["plot"]:
        return plot_main(args[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 GiB disk, 15 s windows, two rates per pattern, 10 s only")
    ap.add_argument("--patterns", default="4k,64k,1m")
    ap.add_argument("--frequencies", default="10,30")
    ap.add_argument("--rates", default=None,
                    help="offered rates in MiB/s for every pattern (default: per pattern)")
    ap.add_argument("--window", type=float, default=None,
                    help="measured window per trial, seconds (default 60, quick 15; the issue "
                         "asks for 300)")
    ap.add_argument("--unprotected-window", type=float, default=None,
                    help="window of the unprotected reference (default 20, quick 8)")
    ap.add_argument("--warmup-cycles", type=float, default=None,
                    help="cycles under load before the window (default 1.5, quick 1)")
    ap.add_argument("--disk-gib", type=float, default=None, help="disk size (default 8, quick 4)")
    ap.add_argument("--target", choices=("local", "site"), default="local")
    ap.add_argument("--driver", choices=("file", "qemu"), default="file",
                    help="file VMs (guest process) or QEMU VMs (dirty bitmaps, frozen views "
                         "read over NBD; the workload writes through an NBD export)")
    ap.add_argument("--sparse", action="store_true",
                    help="start from an empty sparse disk (default: prefilled, every block "
                         "allocated, as the disk of a VM in use)")
    ap.add_argument("--ramp-from-previous", action="store_true",
                    help="after the first frequency, start each ramp at the capacity the "
                         "previous frequency reached (fewer trials; lower rates not re-run)")
    ap.add_argument("--all-rates", action="store_true",
                    help="try every rate even after one fails (a fuller curve)")
    ap.add_argument("--rehome-share", type=float, default=None,
                    help="the engine's re-homing share (0: off; default: the engine's)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of RPO vs churn")
    a = ap.parse_args(args)
    for field, full, quick in (("window", 60.0, 15.0), ("unprotected_window", 20.0, 8.0),
                               ("warmup_cycles", 1.5, 1.0), ("disk_gib", 8.0, 4.0)):
        if getattr(a, field) is None:
            setattr(a, field, quick if a.quick else full)
    if a.quick and a.frequencies == ap.get_default("frequencies"):
        a.frequencies = "10"
    names = [n for n in a.patterns.split(",") if n]
    freqs = [float(f) for f in a.frequencies.split(",") if f]
    disk = int(a.disk_gib * GiB)
    started = time.time()
    results: dict[str, Any] = {
        "benchmark": "churn", "stamp": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_info(a.workdir), "window": a.window, "disk_size": disk,
        "frequencies": freqs, "target": a.target, "driver": a.driver, "quick": a.quick,
        "unprotected_window": a.unprotected_window, "warmup_cycles": a.warmup_cycles,
        "rpo_factor": RPO_FACTOR, "ratio_goal": RATIO_GOAL, "patterns": {},
        "prefilled": not a.sparse,
        "load_start": load1(),
    }
    if a.rehome_share is not None:
        os.environ["CHURN_REHOME_SHARE"] = str(a.rehome_share)   # the engine processes read it
    results["rehome_share"] = a.rehome_share
    # SIGTERM (a user's kill, a timeout) unwinds like an error: the VMs, engines and servers
    # are stopped and the work directory goes (it was left behind, tens of GB, with the
    # guest processes still running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with workdir(a.workdir, a.keep) as wd:
        bench = Bench(wd, disk, a.target, prefill=not a.sparse, driver=a.driver)
        try:
            for name in names:
                p = PATTERNS[name]
                rates = [int(r) * MiB for r in a.rates.split(",")] if a.rates else \
                    [r * MiB for r in (QUICK_RATES[name] if a.quick else p.rates_mib)]
                pr: dict[str, Any] = {"io": p.io, "pattern": p.pattern, "unprotected": {},
                                      "protected": {}, "goal": GOALS.get(name)}
                results["patterns"][name] = pr
                t_vm = time.monotonic()
                vm_id, vm_name = bench.new_vm()
                pr["prefill_seconds"] = time.monotonic() - t_vm
                try:
                    bench.hv.power_on(vm_id)
                    lim = bench.unprotected(vm_id, p, 0, a.unprotected_window, 2.0)
                    pr["unprotected_limit"] = lim["achieved"]
                    print(f"[{name}] unprotected guest, unlimited: {lim['achieved'] / MiB:.0f} "
                          f"MiB/s (guest CPU {lim['guest_cpu']:.2f})", flush=True)
                    for rate in rates:
                        un = bench.unprotected(vm_id, p, rate, a.unprotected_window, 2.0)
                        pr["unprotected"][str(rate)] = un
                        print(f"[{name}] unprotected guest at {rate / MiB:.0f} MiB/s: "
                              f"{un['achieved'] / MiB:.0f} MiB/s", flush=True)
                    prev = 0
                    for f in freqs:
                        todo = [r for r in rates if r >= prev] if a.ramp_from_previous \
                            else rates
                        trials = bench.protected(vm_id, vm_name, p, todo, f, a.window,
                                                 a.warmup_cycles, pr["unprotected"],
                                                 a.all_rates, sys.stdout)
                        pr["protected"][str(f)] = trials
                        ok = [t for t in trials if t["passed"]]
                        best = max(ok, key=lambda t: t["rate"]) if ok else None
                        pr.setdefault("capacity", {})[str(f)] = {
                            "rate": best["rate"] if best else 0,
                            "ratio": best["ratio"] if best else 0.0,
                            "rpo_max": best["rpo_max"] if best else None,
                            "engine_rss_max": best["engine_rss_max"] if best else None,
                            "tried_up_to": max(t["rate"] for t in trials) if trials else 0,
                            "tried_from": min(t["rate"] for t in trials) if trials else 0,
                            "all_passed": len(ok) == len(trials)}
                        prev = best["rate"] if best else 0
                finally:
                    bench.drop_vm(vm_id)
        finally:
            bench.close()
    results["load_end"] = load1()
    results["seconds"] = time.time() - started
    if a.plot is not None:
        plot([results], a.plot)
        results["plot"] = str(a.plot)
        print(f"plot written to {a.plot}")
    write_json(a.json, results)
    print(summary(results))
    return 0


def summary(r: dict[str, Any]) -> str:
    lines = [f"churn ({r.get('driver', 'file')} VM, {r['target']} target, disk "
             f"{r['disk_size'] / GiB:.0f} GiB, window {r['window']:.0f} s, load "
             f"{r['load_start']:.1f} → {r['load_end']:.1f}):"]
    for name, pr in r["patterns"].items():
        lim = pr["unprotected_limit"]
        goal = pr["goal"]
        for f, cap in pr.get("capacity", {}).items():
            eff_goal = min(goal, lim) if goal else None
            met = "" if eff_goal is None else (
                " — goal met" if cap["rate"] >= eff_goal and cap["ratio"] >= RATIO_GOAL else
                " — goal NOT met")
            more = " (every rate tried passed)" if cap["all_passed"] else ""
            lines.append(f"  {name} @ {float(f):g} s: capacity {cap['rate'] / MiB:.0f} MiB/s{more}, "
                         f"ratio {cap['ratio']:.2f}, unprotected limit {lim / MiB:.0f} MiB/s"
                         + (f", goal {eff_goal / MiB:.0f} MiB/s" if eff_goal else "") + met)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
