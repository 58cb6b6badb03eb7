"""The replication engine's durable record of one protected item (on the protected host).

Facts that decide what to resume live in the recovery store (staged cycles, committed points)
and in the driver (sealed cycles); this record holds what only the engine knows: the tracking
epoch it trusts, the cycle it was working on, the retry schedule and the last report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsite.core.retry import RetryState
from drsite.fsutil import atomic_write_json, read_json
from drsite.replication.report import ItemReport, ItemState


@dataclass
class ItemRecord:
    item_id: str
    vm_id: str
    vm_name: str
    phase: ItemState = ItemState.NEW
    epoch: str | None = None
    cycle_id: str | None = None
    cycle_kind: str | None = None          # "initial" | "delta" | "resync"
    # digest of the adopted cycle's changed extents: a resumed delta cycle whose changed list
    # differs starts its staging again (its staged re-homed base bytes may cover a change)
    cycle_changed: str | None = None
    last_cycle_started: float | None = None
    resync_by_hand: bool = False
    resync_from_store: bool = False        # the store was damaged: compare against it, not the replica
    resync_reason: str = ""
    retry: RetryState = field(default_factory=RetryState)
    report: ItemReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id, "vm_id": self.vm_id, "vm_name": self.vm_name,
            "phase": self.phase.value, "epoch": self.epoch, "cycle_id": self.cycle_id,
            "cycle_kind": self.cycle_kind, "cycle_changed": self.cycle_changed,
            "last_cycle_started": self.last_cycle_started,
            "resync_by_hand": self.resync_by_hand, "resync_from_store": self.resync_from_store,
            "resync_reason": self.resync_reason, "retry": self.retry.to_dict(),
            "report": self.report.to_dict() if self.report else None,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ItemRecord:
        return ItemRecord(
            item_id=d["item_id"], vm_id=d["vm_id"], vm_name=d["vm_name"],
            phase=ItemState(d["phase"]), epoch=d.get("epoch"), cycle_id=d.get("cycle_id"),
            cycle_kind=d.get("cycle_kind"), cycle_changed=d.get("cycle_changed"),
            last_cycle_started=d.get("last_cycle_started"),
            resync_by_hand=bool(d.get("resync_by_hand")),
            resync_from_store=bool(d.get("resync_from_store")),
            resync_reason=d.get("resync_reason", ""),
            retry=RetryState.from_dict(d.get("retry") or {}),
            report=ItemReport.from_dict(d["report"]) if d.get("report") else None,
        )


class RecordFile:
    """One JSON file per item, replaced atomically (fsync file, rename, fsync dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> ItemRecord | None:
        if not self.path.exists():
            return None
        return ItemRecord.from_dict(read_json(self.path))

    def save(self, rec: ItemRecord) -> None:
        atomic_write_json(self.path, rec.to_dict())

    def save_dict(self, d: dict[str, Any]) -> None:
        """Save a record already turned into a dict (:meth:`ItemRecord.to_dict`): a snapshot
        another thread may write while the record changes on."""
        atomic_write_json(self.path, d)
