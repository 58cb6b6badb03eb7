"""Synchronous mode of file VMs (issue 18): write latency added per 4 KiB write at queue depth
1 (p50/p99), sync vs async, with a local durable write (``O_DSYNC`` pwrite, and pwrite +
``fdatasync``) measured in the same run as the reference; and throughput at queue depth 16.

The recovery side is a real sync-journal server (``sitestore.syncserver``, mTLS with a
throw-away CA) in its own process, as a recovery agent is; the guest is a :class:`FileVm`
with change tracking in this process (the bench's writer threads are the guest's queue). The
journal and the VM share this machine's disk, so a sync write pays one ``fdatasync`` on the
journal where the reference pays one on its file.

    .venv/bin/python bench/sync_latency.py [--n 2000] [--qd16-seconds 5] [--budget-ms 500]
                                           [--recovery-dir /dev/shm/x]

``--recovery-dir`` puts the recovery side's journal there: on a tmpfs its ``fdatasync``
costs nothing, which leaves what synchronous mode adds beyond the remote flush (network,
TLS, threads) — less at the mercy of a shared box's disk than the full figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchlib import machine_info, process_cpu_seconds, workdir

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file import FileHypervisor
from drsite.sitestore.syncserver import SyncServer
from drsite.sitestore.testing import OpenAcl, TestCerts, make_test_certs
from drsite.tlsutil import server_context

MiB = 1 << 20
DISK = 256 * MiB
IO = 4096


def serve(directory: Path) -> None:
    """The recovery side (run as ``--serve DIR`` in a child process): prints its port."""
    certs = make_test_certs(directory / "pki")
    ctx = server_context(certs.server_cert, certs.server_key, certs.ca_file,
                         client_cert="required")
    srv = SyncServer(directory / "journals", directory / "replicas", ctx, OpenAcl())
    srv.start()
    print(srv.port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    srv.stop()


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] * 1e6  # microseconds


def stats(xs: list[float]) -> dict[str, float]:
    return {"p50_us": round(pct(xs, 50), 1), "p99_us": round(pct(xs, 99), 1),
            "mean_us": round(sum(xs) / len(xs) * 1e6, 1)}


def local_reference(path: Path, n: int, rng: random.Random) -> dict[str, dict[str, float]]:
    """4 KiB random writes made durable locally into a 64 MiB file written in full first:
    O_DSYNC, and pwrite + fdatasync."""
    out = {}
    size = 64 * MiB
    with open(path, "wb") as f:  # written in full first: a disk image, no block allocation
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    for name, flags in (("o_dsync", os.O_DSYNC), ("fdatasync", 0)):
        fd = os.open(path, os.O_RDWR | flags)
        buf = os.urandom(IO)
        lat = []
        for _ in range(n):
            off = rng.randrange(size // IO) * IO
            t0 = time.perf_counter()
            os.pwrite(fd, buf, off)
            if not flags:
                os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
        os.close(fd)
        out[name] = stats(lat)
    return out


def qd1(vm: object, n: int, rng: random.Random) -> list[float]:
    lat = []
    buf = os.urandom(IO)
    for i in range(n):
        off = rng.randrange(DISK // IO) * IO
        t0 = time.perf_counter()
        vm.write("d0", off, buf, tag=i)  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - t0)
    return lat


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process, or by ``pid``."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    return process_cpu_seconds(pid)


def qd1_with_cpu(vm: object, n: int, rng: random.Random, server_pid: int) -> dict[str, float]:
    """:func:`qd1`'s latency figures plus the CPU each side used per write (the guest: this
    process, which runs it; the recovery side: the journal server's process)."""
    g0, s0, t0 = cpu_s(), cpu_s(server_pid), time.perf_counter()
    lat = qd1(vm, n, rng)
    g1, s1, el = cpu_s(), cpu_s(server_pid), time.perf_counter() - t0
    return {**stats(lat), "guest_cpu_us_per_write": round((g1 - g0) / n * 1e6, 1),
            "recovery_cpu_us_per_write": round((s1 - s0) / n * 1e6, 1),
            "wall_us_per_write": round(el / n * 1e6, 1)}


def enter_sync(hv: FileHypervisor, vm_id: str, item_id: str, port: int, certs: TestCerts,
               budget_ms: int) -> None:
    """Put the (tracked, running) VM in synchronous mode towards the recovery server at
    ``port`` and wait until its mirror is in sync (the journal begins at the seal after)."""
    hv.set_sync(vm_id, {"item_id": item_id, "host": "127.0.0.1", "port": port,
                        "budget_ms": budget_ms, "ca_file": str(certs.ca_file),
                        "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)})
    hv.release(hv.seal(vm_id))
    deadline = time.monotonic() + 10
    while (hv.sync_status(vm_id) or {}).get("state") != "in_sync":
        if time.monotonic() > deadline:
            raise SystemExit(f"mirror not in sync: {hv.sync_status(vm_id)}")
        time.sleep(0.02)


def qd16(vm: object, seconds: float) -> dict[str, float]:
    stop = threading.Event()
    counts = [0] * 16

    def run(k: int) -> None:
        rng = random.Random(k)
        buf = os.urandom(IO)
        while not stop.is_set():
            vm.write("d0", rng.randrange(DISK // IO) * IO, buf)  # type: ignore[attr-defined]
            counts[k] += 1

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(16)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(30)
    el = time.perf_counter() - t0
    total = sum(counts)
    return {"writes_per_s": round(total / el, 1), "MB_per_s": round(total * IO / el / 1e6, 2)}


@contextlib.contextmanager
def journal_server(wd: Path, recovery_dir: Path | None,
                   res: dict[str, Any]) -> Iterator[tuple[int, TestCerts, int]]:
    """The recovery side's journal server in its own process (this script's ``--serve``):
    yields its port, the test PKI and its pid; stopped at exit. Under ``wd/recovery``, or a fresh
    directory in ``recovery_dir`` (named in ``res``, removed at exit)."""
    recovery = wd / "recovery"
    if recovery_dir is not None:
        recovery = Path(tempfile.mkdtemp(prefix="sync-recovery-", dir=recovery_dir))
        res["recovery_dir"] = str(recovery)
    srv = subprocess.Popen([sys.executable, __file__, "--serve", str(recovery)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        yield port, make_test_certs(recovery / "pki"), srv.pid  # the same CA (load_or_create)
    finally:
        assert srv.stdin is not None
        srv.stdin.close()
        srv.wait(30)
        if recovery_dir is not None:
            shutil.rmtree(recovery, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", type=Path)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--qd16-seconds", type=float, default=5.0)
    ap.add_argument("--budget-ms", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--recovery-dir", type=Path, default=None)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return 0
    with workdir(a.dir) as wd:
        rng = random.Random(18)
        res: dict[str, object] = {"machine": machine_info(wd),
                                  "load_avg_before": os.getloadavg()}
        res["local_durable"] = local_reference(wd / "ref.img", a.n, rng)
        with journal_server(wd, a.recovery_dir, res) as (port, certs, server_pid):
            hv = FileHypervisor(wd / "vms")
            vm_id = hv.create_blank(VmSpec("bench", disks=(DiskSpec("d0", DISK),))).vm_id
            hv.start_tracking(vm_id)
            rt = hv.guest(vm_id)
            try:
                hv.release(hv.seal(vm_id))
                res["async_qd1"] = stats(qd1(rt.vm, a.n, rng))
                res["async_qd16"] = qd16(rt.vm, a.qd16_seconds)
                enter_sync(hv, vm_id, "bench", port, certs, a.budget_ms)
                res["sync_qd1"] = qd1_with_cpu(rt.vm, a.n, rng, server_pid)
                res["sync_qd16"] = qd16(rt.vm, a.qd16_seconds)
                res["mirror"] = hv.sync_status(vm_id)
            finally:
                rt.stop()
        res["load_avg_after"] = os.getloadavg()
        s, asy = res["sync_qd1"], res["async_qd1"]
        ref = res["local_durable"]["o_dsync"]  # type: ignore[index]
        assert isinstance(s, dict) and isinstance(asy, dict) and isinstance(ref, dict)
        res["added_p50_us"] = round(s["p50_us"] - asy["p50_us"], 1)
        res["added_p99_us"] = round(s["p99_us"] - asy["p99_us"], 1)
        res["sync_p50_over_local_dsync_p50"] = round(s["p50_us"] / ref["p50_us"], 2)
        fds = res["local_durable"]["fdatasync"]  # type: ignore[index]
        assert isinstance(fds, dict)
        res["sync_p50_over_local_fdatasync_p50"] = round(s["p50_us"] / fds["p50_us"], 2)
        print(json.dumps(res, indent=2, default=str))
        return 0


if __name__ == "__main__":
    sys.exit(main())
