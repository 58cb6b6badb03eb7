"""Process and set-up helpers of the crash campaigns (``crash_campaign``, ``sync_campaign``,
``sync_campaign_qemu``)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def until(check: Any, timeout: float, poll: float = 0.1) -> Any:
    """``check()``'s first truthy answer within ``timeout`` s, else None. An exception counts as
    no answer (a process being restarted: ask again)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            res = check()
        except Exception:
            res = None
        if res:
            return res
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)


def kill9(pid: int | None) -> None:
    """SIGKILL ``pid`` and wait (10 s at most) until it is gone (reaped if it is our child)."""
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
            os.kill(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            return
        time.sleep(0.01)


def campaign_protection(cl: Any, policy: str, frequency_s: float,
                        networks: tuple[tuple[str, str, str, str], ...] = (
                            ("primary", "secondary", "prod", "dr"),),
                        **settings: Any) -> None:
    """The campaigns' deployment set-up through ``cl`` (a ``VaultClient``): policy ``policy``
    every ``frequency_s`` s (no app-consistent points, no resync window; ``settings`` add to or
    override it, e.g. ``mode="sync"``), group ``g`` from site primary to secondary with it, and
    the network mappings ``(source site, recovery site, network, recovery network)``."""
    cl.create_policy({"name": policy, "frequency_s": frequency_s, "retention_hours": 24,
                      "app_consistent_every_s": None, "rpo_threshold_s": 60,
                      "resync_window": "00:00-00:00", "compression": True,
                      "encryption": False, "bandwidth_limit_bps": None, **settings})
    cl.create_group({"name": "g", "site": "primary", "target_site": "secondary",
                     "policy": policy, "match": {"vm_names": [], "hosts": [], "labels": []}})
    for src, dst, a, b in networks:
        cl.set_network_mapping({"source_site": src, "recovery_site": dst,
                                "source_network": a, "recovery_network": b,
                                "test_network": b + "-test", "ip_rule": {"kind": "keep"}})


def run_sync_trials(camp: Any, n: int, replayed: str, **trial_kw: Any) -> None:
    """``n`` trials of a synchronous-mode campaign (``SyncCampaign``, ``QemuSyncCampaign``),
    then closes it: each must lose no acknowledged write, have checked some, and say
    ``replayed`` of its failover's tail (the journal replayed, the overlay applied)."""
    try:
        for _ in range(n):
            t = camp.trial(**trial_kw)
            print(t)
            assert t.ok, t.problems
            assert t.acked_writes > 0 and t.slots_checked > 0
            assert replayed in t.replayed, t.replayed
    finally:
        camp.close()


def item_in_sync(hv: Any, cl: Any, vm_id: str, item: str) -> bool:
    """A synchronous-mode item is in sync: its VM's mirror (``hv.sync_status``) says so and
    neither its agent's report nor its health names a sync-mode problem. Meant for ``until``
    (a driver or vault that does not answer counts as not in sync)."""
    st = hv.sync_status(vm_id)
    if st is None or st["state"] != "in_sync":
        return False
    it = cl.item(item)
    issues = (it.get("report") or {}).get("agent_issues") or []
    reasons = it.get("health_reasons") or []
    return not any("sync mode" in str(x) for x in [*issues, *reasons])
