"""The one serialisable report per protected item. CLI, API and web read only this."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ItemState(StrEnum):
    NEW = "new"
    INITIAL_REPLICATION = "initial_replication"
    PROTECTED = "protected"
    RESYNC_REQUIRED = "resync_required"
    RESYNCING = "resyncing"
    CRITICAL = "critical"


class Health(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


# where the last fresh delta cycle's time went, in order (seconds each; "total": seal to done):
# freezing the disks, settling the previous cycle's replica (deferred when that cycle overran
# its frequency), shipping the changes, storing what was still in flight before re-homing,
# re-homing, the commit (the rest stored, maps, manifest), releasing the frozen view, saving
# the engine's record, the replica's catch-up, retention (and a GC sweep when one is due)
CYCLE_PHASES = ("seal", "settle", "ship", "flush", "rehome", "commit", "release", "record",
                "replica", "retention", "total")


def cycle_phases(raw: Any) -> dict[str, float] | None:
    """``raw`` as a phase dict: known phases with finite non-negative numbers only (a report
    comes from an agent: nothing else is kept)."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, float] = {}
    for k in CYCLE_PHASES:
        v = raw.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e9:
            out[k] = round(float(v), 3)
    return out or None


@dataclass
class ItemReport:
    item_id: str
    vm_id: str
    vm_name: str
    state: ItemState = ItemState.NEW
    health: Health = Health.NORMAL
    health_reasons: list[str] = field(default_factory=list)
    # progress of the running step (initial copy, cycle, resync), 0..100
    step: str = ""
    progress: float = 0.0
    bytes_total: int = 0
    bytes_done: int = 0
    # lifetime counters
    bytes_sent: int = 0          # raw bytes shipped (before compression), excluding skipped zeros
    bytes_stored: int = 0        # bytes that reached the store (after compression)
    bytes_compared: int = 0      # bytes checksummed by resyncs
    cycles: int = 0
    resyncs: int = 0
    initial_resumed_from: int = 0  # bytes already in the store when a crashed initial copy resumed
    last_point_id: str | None = None
    last_point_time: float | None = None
    last_app_point_time: float | None = None
    rpo_s: float | None = None   # age of the newest committed point when the report was made
    resync_reason: str = ""
    last_error: dict[str, str] | None = None
    next_attempt_at: float | None = None
    updated_at: float = 0.0
    last_cycle: dict[str, float] | None = None   # CYCLE_PHASES of the last fresh delta cycle

    def to_dict(self) -> dict[str, Any]:
        # a shallow copy by hand (``dataclasses.asdict`` deep-copies every value: it was half
        # of the vault's time applying a heartbeat); the two containers are copied too
        d = {name: getattr(self, name) for name in _REPORT_FIELDS}
        d["state"] = self.state.value
        d["health"] = self.health.value
        d["health_reasons"] = list(self.health_reasons)
        d["last_error"] = dict(self.last_error) if self.last_error is not None else None
        d["last_cycle"] = dict(self.last_cycle) if self.last_cycle is not None else None
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ItemReport:
        d = dict(d)
        d["state"] = ItemState(d["state"])
        d["health"] = Health(d["health"])
        d["last_cycle"] = cycle_phases(d.get("last_cycle"))
        known = set(ItemReport.__dataclass_fields__)
        return ItemReport(**{k: v for k, v in d.items() if k in known})


_REPORT_FIELDS = tuple(ItemReport.__dataclass_fields__)
