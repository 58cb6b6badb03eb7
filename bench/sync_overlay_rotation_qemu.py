"""What rotating a synchronous QEMU VM's overlay costs the guest (issue 18, overlay life cycle):
a VM mirrors into a real overlay daemon (NBD+TLS, ``tests.integration.test_qemu_sync.sync_vm``);
12 rounds of: 5 guest 4 KiB writes (HMP ``qemu-io`` on the virtio-blk device) with no rotation,
then guest writes back to back while ``OverlayServer.rotate(force=True)`` runs in another
thread (new layer files, ``run.json``, one ``transaction`` of ``blockdev-snapshot``). Prints
the medians and maxima of both and of ``rotate()`` itself, the load average, and that the
mirror stayed in sync. Run: ``DRSITE_TEST_QEMU=1 .venv/bin/python bench/sync_overlay_rotation_qemu.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.test_qemu_sync import ITEM, guest_write, sync_vm

from drsite.sitestore.testing import make_test_certs


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="drsite-rot-"))
    certs = make_test_certs(tmp / "pki")
    hv, vm_id, ov, conf = sync_vm(tmp, certs, budget_ms=2000)
    try:
        c = hv.seal(vm_id)
        hv.release(c)
        plain: list[float] = []
        during: list[float] = []
        rot: list[float] = []
        for k in range(12):
            for j in range(5):
                plain.append(guest_write(hv, vm_id, (k * 64 + j) * 4096, 4096, 1 + k))
            done = threading.Event()

            def rotate(done: threading.Event = done) -> None:
                t0 = time.monotonic()
                ov.rotate(ITEM, lambda _i: None, force=True)
                rot.append(time.monotonic() - t0)
                done.set()

            th = threading.Thread(target=rotate)
            th.start()
            while not done.is_set():
                during.append(guest_write(hv, vm_id, (k * 64 + 32) * 4096, 4096, 100 + k))
            th.join()
        layers = json.loads((ov.run_dir(ITEM, conf["stream"]) / "run.json").read_text())["layers"]

        def q(xs: list[float]) -> str:
            return (f"n={len(xs)} median={statistics.median(xs) * 1000:.1f} ms "
                    f"max={max(xs) * 1000:.1f} ms")

        print(f"state {(hv.sync_status(vm_id) or {}).get('state')}, {len(layers)} layers")
        print("rotate():", q(rot))
        print("guest 4 KiB write, no rotation:", q(plain))
        print("guest 4 KiB write during a rotation:", q(during))
        print("load", os.getloadavg())
    finally:
        hv.delete_vm(vm_id)
        ov.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
