"""Synchronous mode of QEMU VMs, no acknowledged write lost (issue 18 part 2): a short
campaign on a real deployment (vault + two QEMU agents, skips without QEMU unless
DRSITE_TEST_QEMU=1): SIGKILL QEMU and the primary agent at a random moment, unplanned
failover to latest, every acknowledged write on the recovery disk. The long campaign (30+
trials) is ``bench/sync_crash_campaign_qemu.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.test_qemu_driver import require_qemu
from tests.sync_campaign_qemu import QemuSyncCampaign

pytestmark = pytest.mark.slow


def test_no_acknowledged_write_lost_after_sigkill_of_qemu_and_agent(tmp_path: Path) -> None:
    require_qemu()
    camp = QemuSyncCampaign(tmp_path / "c", seed=18)
    try:
        for _ in range(3):
            t = camp.trial(kill_window_s=2.0)
            print(t)
            assert t.ok, t.problems
            assert t.acked_writes > 0 and t.slots_checked > 0
            assert "sync overlay applied" in t.replayed, t.replayed
    finally:
        camp.close()
