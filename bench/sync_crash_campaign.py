"""Synchronous mode, no acknowledged write lost (issue 18 part 2), by hand: N trials (default
30) of SIGKILL of the whole primary (the guest — a file VM's guest process, or QEMU with
``--qemu`` — and the primary agent) at a random moment while writers outside the VM record
every acknowledged write, then an unplanned failover to "latest" through the vault and a
check that every acknowledged write is on the recovery VM's disk (``tests/sync_campaign.py``,
``tests/sync_campaign_qemu.py``).

    .venv/bin/python bench/sync_crash_campaign.py [--qemu] [TRIALS] [SEED] [KILL_WINDOW_S]

The kill comes 0.3 s to KILL_WINDOW_S (default 12: past two 5 s policy cycles, so the
failover's point is often a later cycle's, the journal having been trimmed — or older
overlays deleted — behind it).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.*

from tests.sync_campaign import SyncCampaign
from tests.sync_campaign_qemu import QemuSyncCampaign


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return 0
    args = [a for a in sys.argv[1:] if a != "--qemu"]
    qemu = len(args) != len(sys.argv) - 1
    trials = int(args[0]) if len(args) > 0 else 30
    seed = int(args[1]) if len(args) > 1 else 1
    window = float(args[2]) if len(args) > 2 else 12.0
    with tempfile.TemporaryDirectory(prefix="drsite-sync-campaign-") as tmp:
        t0 = time.monotonic()
        camp = (QemuSyncCampaign if qemu else SyncCampaign)(Path(tmp) / "c", seed=seed)
        try:
            for _ in range(trials):
                t = camp.trial(kill_window_s=window)
                print(f"trial {t.n:3d}: kill after {t.kill_after_s:.2f} s, "
                      f"{t.acked_writes} acked writes, {t.slots_checked} slots checked, "
                      f"failover {t.failover_s} s, {'ok' if t.ok else t.problems}; {t.replayed}",
                      flush=True)
        finally:
            camp.close()
        out = camp.summary()
        out["elapsed_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(out, indent=2))
        return 0 if out["ok"] == out["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
