"""Synchronous mode of QEMU VMs, no acknowledged write lost (issue 18 part 2): a short
campaign on a real deployment (vault + two QEMU agents, skips without QEMU unless
DRSITE_TEST_QEMU=1): SIGKILL QEMU and the primary agent at a random moment, unplanned
failover to latest, every acknowledged write on the recovery disk. The long campaign (30+
trials) is ``bench/sync_crash_campaign.py --qemu``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.test_qemu_driver import require_qemu
from tests.procs import run_sync_trials
from tests.sync_campaign_qemu import QemuSyncCampaign

pytestmark = pytest.mark.slow


def test_no_acknowledged_write_lost_after_sigkill_of_qemu_and_agent(tmp_path: Path) -> None:
    require_qemu()
    run_sync_trials(QemuSyncCampaign(tmp_path / "c", seed=18), 3, "sync overlay applied",
                    kill_window_s=2.0)


def test_hung_recovery_storage_fallback_alert_and_return(tmp_path: Path) -> None:
    """The recovery site's overlay daemon stopped with SIGSTOP (a hung peer, no RST): the
    guest's write waits about the budget, no longer; the alert appears; the daemon back, a
    new overlay and the next cycle's point bring the item back in sync and clear the alert."""
    require_qemu()
    camp = QemuSyncCampaign(tmp_path / "c", seed=5, budget_ms=300)
    try:
        got = camp.fallback(300)
        print(got)
        # the watchdog: a probe every budget/4, a budget without an answer, then the yank;
        # plus the HMP round trip and a loaded box's scheduling
        assert got["max_write_s"] < 0.3 * 1.25 + 0.7, got
        assert got["writes"] > 10, got   # asynchronous after the fallback: writes flow
        assert "sync mode suspended" in got["alert"]
        assert "latency budget of 300 ms" in got["alert"]
    finally:
        camp.close()
