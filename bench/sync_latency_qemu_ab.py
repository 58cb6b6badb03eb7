"""Synchronous mode of QEMU VMs (issue 18), A/B in the same minutes: VMs written in turn, one
write each per round (random order), so the box's load falls on every variant alike.

Variants (each its own 256 MiB VM in ``prelaunch``, written with HMP ``qemu-io`` on the
device's BlockBackend, as ``sync_latency_qemu.py``):

- ``async``  — no mirror;
- ``before`` — the mirror into an overlay daemon as provisioned before the change: its NBD
  listener without ``TCP_NODELAY`` (as QEMU 7.2's own ``addr.type=inet`` listener), the
  overlay node's L2 cache in cluster-sized (16 KiB) entries, no runway of written zeros;
- ``no_runway`` — as ``after`` without the runway (``syncoverlay._runway``);
- ``after``  — the mirror into an overlay daemon as ``sitestore.syncoverlay`` provisions it now.

Per write: the HMP round trip, and the same minus the median round trip of a no-I/O
``qemu-io length`` (the write's time inside QEMU). Then queue depth 16 (16 ``aio_write`` +
``aio_flush``), variants in turn, one second each, ``--qd16-rounds`` times. Then, with
``strace -c -f`` on each variant's VM QEMU and overlay daemon, ``--strace-n`` more writes per
variant: syscalls per write on both ends. The local durable write (``O_DSYNC``) of the same run
is the reference.

    .venv/bin/python bench/sync_latency_qemu_ab.py [--n 400] [--qd16-rounds 5] [--strace-n 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchlib import machine_info, workdir
from sync_latency import local_reference, stats
from sync_latency_qemu import DISK, IO, Hmp

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.qemu.driver import QemuHypervisor
from drsite.sitestore import syncoverlay
from drsite.sitestore.syncoverlay import OverlayServer, writer_dn
from drsite.sitestore.testing import TestCerts, make_test_certs


def _listener_without_nodelay(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(16)
    return s


@contextmanager
def provisioned_as(variant: str) -> Iterator[None]:
    """Provision with the settings of ``variant`` (``before`` restores the old ones)."""
    saved = syncoverlay._listener, dict(syncoverlay.NODE_OPTIONS), syncoverlay.RUNWAY
    if variant == "before":
        syncoverlay._listener = _listener_without_nodelay
        syncoverlay.NODE_OPTIONS.clear()
    if variant in ("before", "no_runway"):
        syncoverlay.RUNWAY = 0
    try:
        yield
    finally:
        syncoverlay._listener = saved[0]
        syncoverlay.NODE_OPTIONS.clear()
        syncoverlay.NODE_OPTIONS.update(saved[1])
        syncoverlay.RUNWAY = saved[2]


class Variant:
    def __init__(self, name: str, wd: Path, certs: TestCerts, ov: OverlayServer) -> None:
        self.name = name
        self.hv = QemuHypervisor(wd / f"vms-{name}")
        self.vm_id = self.hv.create_blank(VmSpec(name, disks=(DiskSpec("d0", DISK),)),
                                          guest_agent=False).vm_id
        self.hv.start_tracking(self.vm_id)
        self.hv.power_on(self.vm_id)
        self.hv.release(self.hv.seal(self.vm_id))
        self.item = f"bench-{name}"
        self.qsd_pid: int | None = None
        if name != "async":
            der = ssl.PEM_cert_to_DER_cert(certs.client_cert.read_text())
            with provisioned_as(name):
                prov = ov.provision(self.item, self.hv.sync_disks(self.vm_id), writer_dn(der))
            self.hv.set_sync(self.vm_id, {
                "item_id": self.item, "host": "127.0.0.1", "port": prov["port"],
                "budget_ms": 5000, "ca_file": str(certs.ca_file),
                "cert_file": str(certs.client_cert), "key_file": str(certs.client_key),
                "stream": prov["stream"], "exports": prov["exports"]})
            self.hv.release(self.hv.seal(self.vm_id))   # the run begins at this seal
            st = self.hv.sync_status(self.vm_id) or {}
            if st.get("state") != "in_sync":
                raise SystemExit(f"{name}: mirror not in sync: {st}")
            self.qsd_pid = int(json.loads((ov.item_dir(self.item) / "daemon.json")
                                          .read_text())["pid"])
        self.vm_pid = int(json.loads((Path(self.hv.vm_dir(self.vm_id)) / "runner.json")
                                     .read_text())["pid"])
        self.h: Hmp | None = Hmp(self.hv, self.vm_id)
        self.state: str | None = None
        self.lat: list[float] = []
        self.null: list[float] = []
        self.qd16: list[float] = []

    @property
    def _h(self) -> Hmp:
        assert self.h is not None
        return self.h

    def write(self, off: int, pattern: int) -> None:
        t0 = time.perf_counter()
        self._h.io(f"write -P {pattern} {off} {IO}")
        self.lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        self._h.io("length")
        self.null.append(time.perf_counter() - t0)

    def qd16_round(self, seconds: float, rng: random.Random) -> None:
        t0 = time.perf_counter()
        total = 0
        while time.perf_counter() - t0 < seconds:
            for _ in range(16):
                self._h.io(f"aio_write -P 7 {rng.randrange(DISK // IO) * IO} {IO}")
            self._h.io("aio_flush")
            total += 16
        self.qd16.append(total / (time.perf_counter() - t0))

    def result(self) -> dict[str, Any]:
        floor = sorted(self.null)[len(self.null) // 2]
        out: dict[str, Any] = {
            "qd1_hmp": stats(self.lat),
            "qd1_in_qemu": stats([max(x - floor, 0.0) for x in self.lat]),
            "qd16_writes_per_s": [round(x) for x in self.qd16]}
        if self.name != "async":
            out["mirror_at_end"] = self.state
        return out

    def release(self) -> None:
        """Hand the monitor back (QEMU serves one QMP client at a time); note the mirror."""
        if self.h is not None:
            self.h.close()
            self.h = None
            self.state = (self.hv.sync_status(self.vm_id) or {}).get("state")

    def close(self) -> None:
        self.release()
        self.hv.delete_vm(self.vm_id)


def strace_counts(variants: list[Variant], n: int, rng: random.Random,
                  wd: Path) -> dict[str, Any]:
    """``strace -c -f`` on each VM QEMU and overlay daemon over ``n`` writes per variant."""
    procs: list[tuple[str, str, subprocess.Popen[bytes], Path]] = []
    for v in variants:
        for end, pid in (("vm", v.vm_pid), ("overlay", v.qsd_pid)):
            if pid is None:
                continue
            out = wd / f"strace-{v.name}-{end}.txt"
            procs.append((v.name, end, subprocess.Popen(
                ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                stderr=subprocess.DEVNULL), out))
    time.sleep(2.0)
    for i in range(n):
        off = rng.randrange(DISK // IO) * IO
        for v in variants:
            v._h.io(f"write -P {i % 250 + 1} {off} {IO}")
    for _, _, p, _ in procs:
        p.send_signal(signal.SIGINT)
        p.wait()
    res: dict[str, Any] = {}
    for name, end, _, out in procs:
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and f[3].isdigit():
                calls[f[-1]] = int(f[3])
        total = sum(calls.values())
        keep = ("fdatasync", "pwrite64", "pwritev", "fallocate", "futex", "write", "sendmsg",
                "recvmsg", "ppoll", "poll", "io_uring_enter", "io_submit", "read")
        res.setdefault(name, {})[end] = {
            "per_write": {k: round(calls[k] / n, 2) for k in keep if k in calls},
            "total_per_write": round(total / n, 1)}
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--qd16-rounds", type=int, default=5)
    ap.add_argument("--qd16-seconds", type=float, default=1.0)
    ap.add_argument("--strace-n", type=int, default=200)
    ap.add_argument("--variants", default="async,before,after")
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    with workdir(a.dir) as wd:
        rng = random.Random(18)
        res: dict[str, Any] = {"machine": machine_info(wd), "load_avg_before": os.getloadavg()}
        res["local_durable"] = local_reference(wd / "ref.img", a.n, rng)
        certs = make_test_certs(wd / "pki")
        ov = OverlayServer(wd / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
        variants: list[Variant] = []
        try:
            for name in a.variants.split(","):
                variants.append(Variant(name, wd, certs, ov))
            order = list(variants)
            for i in range(a.n):
                off = rng.randrange(DISK // IO) * IO
                rng.shuffle(order)
                for v in order:
                    v.write(off, i % 250 + 1)
            res["load_avg_qd1"] = os.getloadavg()
            for _ in range(a.qd16_rounds):
                rng.shuffle(order)
                for v in order:
                    v.qd16_round(a.qd16_seconds, rng)
            res["load_avg_qd16"] = os.getloadavg()
            if a.strace_n:
                res["strace_per_write"] = strace_counts(variants, a.strace_n, rng, wd)
            for v in variants:
                v.release()
            res["variants"] = {v.name: v.result() for v in variants}
        finally:
            for v in variants:
                v.close()
            ov.stop()
        res["load_avg_after"] = os.getloadavg()
        ref = res["local_durable"]["o_dsync"]
        out = res["variants"]
        for name, r in out.items():
            q = r["qd1_in_qemu"]
            r["in_qemu_p50_over_local_o_dsync_p50"] = round(q["p50_us"] / ref["p50_us"], 2)
            if "async" in out and name != "async":
                a_p50 = out["async"]["qd1_in_qemu"]["p50_us"]
                # under heavy load the no-I/O floor can exceed the async write's round trip
                r["in_qemu_p50_over_async_p50"] = round(q["p50_us"] / a_p50, 2) if a_p50 else None
                r["added_in_qemu_p50_us"] = round(
                    q["p50_us"] - out["async"]["qd1_in_qemu"]["p50_us"], 1)
                r["added_in_qemu_p99_us"] = round(
                    q["p99_us"] - out["async"]["qd1_in_qemu"]["p99_us"], 1)
        print(json.dumps(res, indent=2, default=str))
        return 0


if __name__ == "__main__":
    sys.exit(main())
