"""Synchronous mode of QEMU VMs (issue 18): write latency added per 4 KiB guest write at queue
depth 1 (p50/p99), the same VM with and without the active mirror, and throughput at queue
depth 16; a local durable write (``O_DSYNC`` pwrite, pwrite + ``fdatasync``) measured in the
same run as the reference. Also: how long a guest write waits when the recovery site stops
answering (SIGSTOP of its storage daemon) — the fallback's bound.

The recovery side is a real overlay daemon (``sitestore.syncoverlay``: qemu-storage-daemon,
NBD over TLS, ``writethrough``) on loopback; the guest is a QEMU VM in ``prelaunch`` whose
virtio-blk device is written with HMP ``qemu-io -d vd0/virtio-backend`` (the device's own
BlockBackend: the path a guest's write takes through the block layer). Each QD1 sample is one
HMP round trip (``write``); its fixed cost (QMP, the HMP parser) is in both modes, so the
*added* latency is sync − async (HMP's ``qemu-io`` bypasses the device's accounting, so
QEMU's ``query-blockstats`` cannot give the device-only time). QD16: 16 ``aio_write`` then
``aio_flush``, repeated (16 HMP round trips per batch: a floor on the time per batch).

    .venv/bin/python bench/sync_latency_qemu.py [--n 1000] [--qd16-seconds 5] [--budget-ms 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchlib import machine_info, workdir
from sync_latency import local_reference, stats

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.qemu.driver import QemuHypervisor, _vm_lock
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.sitestore.syncoverlay import OverlayServer, writer_dn
from drsite.sitestore.testing import make_test_certs

MiB = 1 << 20
DISK = 256 * MiB
IO = 4096


class Hmp:
    """One QMP connection to the VM (under its lock) for HMP ``qemu-io`` on the device."""

    def __init__(self, hv: QemuHypervisor, vm_id: str) -> None:
        self.paths = VmDir(hv.vm_dir(vm_id))
        self._lock = _vm_lock(self.paths)
        self._lock.__enter__()
        self.q = QmpClient.connect(str(self.paths.qmp_socket), timeout=30)

    def io(self, cmd: str) -> str:
        out = str(self.q.execute("human-monitor-command",
                                 {"command-line": f'qemu-io -d vd0/virtio-backend "{cmd}"'},
                                 timeout=60))
        if "error" in out.lower() or "failed" in out.lower():
            raise RuntimeError(out)
        return out

    def close(self) -> None:
        self.q.close()
        self._lock.__exit__(None, None, None)


def qd1(h: Hmp, n: int, rng: random.Random) -> tuple[dict[str, float], dict[str, float]]:
    """(the HMP round trip of a 4 KiB random write at queue depth 1, the same minus the
    median round trip of a command that does no I/O): the second estimates the write's own
    time through the block layer (HMP's qemu-io prints no timing into QMP's reply)."""
    lat, null = [], []
    for i in range(n):
        off = rng.randrange(DISK // IO) * IO
        t0 = time.perf_counter()
        h.io(f"write -P {i % 250 + 1} {off} {IO}")
        lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        h.io("length")   # the same QMP/HMP path and device lookup, no I/O
        null.append(time.perf_counter() - t0)
    floor = sorted(null)[len(null) // 2]
    return stats(lat), stats([max(x - floor, 0.0) for x in lat])


def qd16(h: Hmp, seconds: float, rng: random.Random) -> dict[str, float]:
    t0 = time.perf_counter()
    total = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):
            h.io(f"aio_write -P 7 {rng.randrange(DISK // IO) * IO} {IO}")
        h.io("aio_flush")
        total += 16
    el = time.perf_counter() - t0
    return {"writes_per_s": round(total / el, 1), "MB_per_s": round(total * IO / el / 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--qd16-seconds", type=float, default=5.0)
    ap.add_argument("--budget-ms", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    with workdir(a.dir) as wd:
        rng = random.Random(18)
        res: dict[str, Any] = {"machine": machine_info(wd), "load_avg_before": os.getloadavg()}
        res["local_durable"] = local_reference(wd / "ref.img", a.n, rng)
        certs = make_test_certs(wd / "pki")
        ov = OverlayServer(wd / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
        hv = QemuHypervisor(wd / "vms")
        vm_id = hv.create_blank(VmSpec("bench", disks=(DiskSpec("d0", DISK),)),
                                guest_agent=False).vm_id
        try:
            hv.start_tracking(vm_id)
            hv.power_on(vm_id)
            hv.release(hv.seal(vm_id))
            h = Hmp(hv, vm_id)
            try:
                res["async_qd1"], res["async_qd1_in_qemu"] = qd1(h, a.n, rng)
                res["async_qd16"] = qd16(h, a.qd16_seconds, rng)
            finally:
                h.close()
            der = ssl.PEM_cert_to_DER_cert(certs.client_cert.read_text())
            prov = ov.provision("bench", hv.sync_disks(vm_id), writer_dn(der))
            conf = {"item_id": "bench", "host": "127.0.0.1", "port": prov["port"],
                    "budget_ms": a.budget_ms, "ca_file": str(certs.ca_file),
                    "cert_file": str(certs.client_cert), "key_file": str(certs.client_key),
                    "stream": prov["stream"], "exports": prov["exports"]}
            hv.set_sync(vm_id, conf)
            t0 = time.perf_counter()
            hv.release(hv.seal(vm_id))   # the run begins at this seal
            res["begin_seal_s"] = round(time.perf_counter() - t0, 3)
            if (hv.sync_status(vm_id) or {}).get("state") != "in_sync":
                raise SystemExit(f"mirror not in sync: {hv.sync_status(vm_id)}")
            h = Hmp(hv, vm_id)
            try:
                res["sync_qd1"], res["sync_qd1_in_qemu"] = qd1(h, a.n, rng)
                res["sync_qd16"] = qd16(h, a.qd16_seconds, rng)
            finally:
                h.close()
            res["mirror"] = hv.sync_status(vm_id)
            # the fallback: the recovery site stops answering in the middle of the writes
            daemon = json.loads((ov.item_dir("bench") / "daemon.json").read_text())
            os.kill(int(daemon["pid"]), signal.SIGSTOP)
            try:
                h = Hmp(hv, vm_id)
                try:
                    t0 = time.perf_counter()
                    h.io(f"write -P 9 0 {IO}")
                    res["stalled_write_s"] = round(time.perf_counter() - t0, 3)
                finally:
                    h.close()
            finally:
                os.kill(int(daemon["pid"]), signal.SIGCONT)
            res["after_stall"] = hv.sync_status(vm_id)
        finally:
            hv.delete_vm(vm_id)
            ov.stop()
        res["load_avg_after"] = os.getloadavg()
        s, asy = res["sync_qd1"], res["async_qd1"]
        ref = res["local_durable"]
        res["added_p50_us"] = round(s["p50_us"] - asy["p50_us"], 1)
        res["added_p99_us"] = round(s["p99_us"] - asy["p99_us"], 1)
        res["sync_p50_over_local_dsync_p50"] = round(s["p50_us"] / ref["o_dsync"]["p50_us"], 2)
        res["async_p50_over_local_dsync_p50"] = round(
            asy["p50_us"] / ref["o_dsync"]["p50_us"], 2)
        si, ai = res["sync_qd1_in_qemu"], res["async_qd1_in_qemu"]
        res["in_qemu_added_p50_us"] = round(si["p50_us"] - ai["p50_us"], 1)
        res["in_qemu_added_p99_us"] = round(si["p99_us"] - ai["p99_us"], 1)
        res["in_qemu_sync_p50_over_local_dsync_p50"] = round(
            si["p50_us"] / ref["o_dsync"]["p50_us"], 2)
        res["in_qemu_sync_p99_over_local_dsync_p99"] = round(
            si["p99_us"] / ref["o_dsync"]["p99_us"], 2)
        print(json.dumps(res, indent=2, default=str))
        return 0


if __name__ == "__main__":
    sys.exit(main())
