"""Synchronous mode on the primary agent: configure the guest's mirror from the policy, and
say in the item's report whether the item is at RPO 0.

The policy's settings carry ``mode`` ("async" | "sync") and ``sync_budget_ms``. For a sync
item on an agent-to-agent store, :func:`configure` asks the recovery site's store server for
its sync-journal port and hands the driver (``contract.SyncMirrorHost``) the item id, that
endpoint, the budget and this agent's own certificate (the guest runs on this host; the
recovery site's access list authorizes the item's writer). The mirror begins its journal at
the VM's next seal.

The item is *in sync* when the guest's mirror acknowledges every write (``in_sync``) **and**
the newest committed point was sealed inside the current journal run (same stream, at or
after its base): only then does the point + the journal hold every acknowledged write.
Otherwise :func:`issues` says why, beginning with ``sync mode suspended:`` (the vault raises
the ``sync`` alert from it, and clears it when the line goes).

Responsible for: those two decisions. Not responsible for: the mirror (the driver), the
journal (the recovery site), the alert (the vault).
"""

from __future__ import annotations

import logging
from typing import Any

from drsite.agent.registration import AgentIdentity
from drsite.core.errors import DrsiteError, InvalidInput
from drsite.hypervisors.contract import HypervisorDriver, SyncMirrorHost, SyncOverlayHost
from drsite.replication.target import RecoveryTarget
from drsite.sitestore import SiteTarget
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)

SUSPENDED = "sync mode suspended: "
DEFAULT_BUDGET_MS = 50


def sync_mode(settings: dict[str, Any]) -> tuple[bool, int]:
    """(synchronous?, latency budget in ms) of an item's settings."""
    mode = str(settings.get("mode") or "async")
    if mode not in ("async", "sync"):
        raise InvalidInput(f"replication mode must be 'async' or 'sync', not {mode!r}")
    budget = int(settings.get("sync_budget_ms") or DEFAULT_BUDGET_MS)
    if not 1 <= budget <= 60_000:
        raise InvalidInput(f"sync_budget_ms must be 1-60000, not {budget}")
    return mode == "sync", budget


def configure(hv: HypervisorDriver, identity: AgentIdentity, item_id: str, vm_id: str,
              target: RecoveryTarget, settings: dict[str, Any]) -> str | None:
    """Put the VM in the mode its settings ask for. Returns why synchronous mode cannot run
    (an issue for the report), or None. Never raises for a sync-mode problem: the item
    replicates asynchronously as before."""
    sync, budget = sync_mode(settings)
    if not isinstance(hv, SyncMirrorHost):
        return (f"{SUSPENDED}the {type(hv).__name__} hypervisor has no synchronous mode; "
                "the item replicates asynchronously") if sync else None
    try:
        if not sync:
            hv.set_sync(vm_id, None)
            return None
        if not isinstance(target, SiteTarget):
            hv.set_sync(vm_id, None)
            return (f"{SUSPENDED}synchronous mode needs a recovery site's agent store, not a "
                    "cloud store; the item replicates asynchronously")
        host = target.store.base_url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        run: dict[str, Any] = {}
        if isinstance(hv, SyncOverlayHost):   # QEMU: a fresh overlay on the recovery site
            run = target.store.sync_overlay(item_id, hv.sync_disks(vm_id))
            port = int(run.pop("port"))
        else:
            port = target.store.sync_port(item_id)
        hv.set_sync(vm_id, {"item_id": item_id, "host": host, "port": port,
                            "budget_ms": budget, "ca_file": str(identity.ca_file),
                            "cert_file": str(identity.cert_file),
                            "key_file": str(identity.key_file), **run})
        log.info("item %s: synchronous mode to %s:%d, budget %d ms", item_id, host, port,
                 budget)
        return None
    except DrsiteError as e:
        log.warning("item %s: synchronous mode not configured: %s", item_id, e)
        return f"{SUSPENDED}cannot configure it: {e.message}"


def issues(hv: HypervisorDriver, vm_id: str, settings: dict[str, Any],
           points: list[PointInfo] | None, configure_issue: str | None) -> list[str]:
    """The report's lines about synchronous mode (none when async, or in sync)."""
    try:
        sync, _ = sync_mode(settings)
    except InvalidInput as e:
        return [f"{SUSPENDED}{e.message}"]
    if not sync:
        return []
    if configure_issue:
        return [configure_issue]
    if not isinstance(hv, SyncMirrorHost):
        return [f"{SUSPENDED}the hypervisor has no synchronous mode"]
    try:
        st = hv.sync_status(vm_id)
    except DrsiteError as e:
        return [f"{SUSPENDED}the guest's mirror does not answer: {e.message}"]
    if st is None:
        return [f"{SUSPENDED}the VM is not running in synchronous mode"]
    state = str(st.get("state"))
    if state == "suspended":
        return [f"{SUSPENDED}{st.get('reason')}; writes replicate asynchronously until the "
                "next recovery point"]
    if state != "in_sync":
        return [f"{SUSPENDED}{st.get('reason') or state}"]
    latest = points[-1] if points else None
    mark = (latest.meta.get("sync") if latest is not None else None) or {}
    if mark.get("stream") != st.get("stream") or int(mark.get("seq", -1)) < int(st.get("base") or 0):
        return [f"{SUSPENDED}catching up: the journal restarted at seal {st.get('base')}; "
                "waiting for that cycle's recovery point"]
    return []
