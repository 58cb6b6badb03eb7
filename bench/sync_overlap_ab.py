"""Synchronous mode of file VMs (issue 18): what sending a batch before its local writes saves,
A/B write by write. Two sync file VMs in this process against one recovery side (a real
sync-journal server in its own process, ``sync_latency.py --serve``): ``serial`` with the
send from ``submit`` turned off (``SyncMirror.early_send_bytes = 0``: the batch goes after its
local writes, as before the change) and ``overlap`` (as shipped). QD1 writes alternate
between the two VMs, so the box's load falls on both alike; then QD16 (16 writer threads),
one second per VM in turn, ``--qd16-rounds`` times.

    .venv/bin/python bench/sync_overlap_ab.py [--n 4000] [--qd16-rounds 4]
                                              [--recovery-dir /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchlib import machine_info, workdir
from sync_latency import enter_sync, journal_server, local_reference, qd16, stats

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file import FileHypervisor

MiB = 1 << 20
DISK = 256 * MiB
IO = 4096


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--qd16-rounds", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--recovery-dir", type=Path, default=None)
    a = ap.parse_args()
    with workdir(a.dir) as wd:
        res: dict[str, Any] = {"machine": machine_info(wd), "load_avg_before": os.getloadavg()}
        rng = random.Random(18)
        res["local_durable"] = local_reference(wd / "ref.img", a.n // 2, rng)
        rts = []
        with journal_server(wd, a.recovery_dir, res) as (port, certs):
            try:
                hv = FileHypervisor(wd / "vms")
                vms: dict[str, Any] = {}
                for name in ("serial", "overlap"):
                    vm_id = hv.create_blank(VmSpec(name, disks=(DiskSpec("d0", DISK),))).vm_id
                    hv.start_tracking(vm_id)
                    rt = hv.guest(vm_id)
                    rts.append(rt)
                    hv.release(hv.seal(vm_id))
                    enter_sync(hv, vm_id, f"bench-{name}", port, certs, 5000)
                    assert rt.vm.mirror is not None
                    if name == "serial":
                        rt.vm.mirror.early_send_bytes = 0
                    vms[name] = (vm_id, rt.vm)
                lat: dict[str, list[float]] = {k: [] for k in vms}
                buf = os.urandom(IO)
                for i in range(a.n):
                    off = rng.randrange(DISK // IO) * IO
                    for name in (("serial", "overlap") if i % 2 else ("overlap", "serial")):
                        vm = vms[name][1]
                        t0 = time.perf_counter()
                        vm.write("d0", off, buf, tag=i)
                        lat[name].append(time.perf_counter() - t0)
                res["load_avg_after_qd1"] = os.getloadavg()
                tput: dict[str, list[float]] = {k: [] for k in vms}
                for r in range(a.qd16_rounds):
                    for name in (("serial", "overlap") if r % 2 else ("overlap", "serial")):
                        tput[name].append(round(qd16(vms[name][1], 1.0)["writes_per_s"]))
                for name, (vm_id, vm) in vms.items():
                    st = hv.sync_status(vm_id) or {}
                    res[name] = {"sync_qd1": stats(lat[name]), "qd16_writes_per_s": tput[name],
                                 "early_sends": vm.mirror.early_sends,
                                 "mirror_state": st.get("state"), "fallbacks": st.get("fallbacks")}
            finally:
                for rt in rts:
                    rt.stop()
        res["load_avg_after"] = os.getloadavg()
        s, o = res["serial"]["sync_qd1"], res["overlap"]["sync_qd1"]
        res["overlap_saves_p50_us"] = round(s["p50_us"] - o["p50_us"], 1)
        res["overlap_saves_mean_us"] = round(s["mean_us"] - o["mean_us"], 1)
        print(json.dumps(res, indent=2, default=str))
        return 0


if __name__ == "__main__":
    sys.exit(main())
