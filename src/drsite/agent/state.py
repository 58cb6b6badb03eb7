"""What the agent keeps on its own disk so that a restart (even after SIGKILL) resumes.

Files in the agent's data directory, each replaced atomically (temp file, fsync, rename, fsync
of the directory)::

    items.json      the items this host protects: vm, target store, settings, phase
    catalog.json    per item: the vault's last ack and the point ids the vault knows of
                    (so points removed by retention are reported even across a restart)
    commands.json   journal: commands accepted (id, kind, item, arguments without secrets),
                    started (with the item's latest point seq at start) and finished (their
                    final result, and whether the vault has it)
    items/          the replication engine's per-item records (``ItemReplicator``'s state_dir)

Responsible for: these files and turning command arguments into engine settings. Not
responsible for: deciding anything (see :mod:`drsite.agent.daemon`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from drsite.core.compression import compression_mode
from drsite.core.errors import InvalidInput, classify_os_error
from drsite.core.retention import rule_for_hours
from drsite.core.states import CommandStatus
from drsite.fsutil import atomic_write_json, read_json
from drsite.replication.driver import ReplicationSettings
from drsite.replication.planner import ALWAYS, ResyncWindow, parse_hhmm


class ItemPhase(StrEnum):
    """Where this agent's own record of an item is (``items.json``; values never change)."""

    INITIAL = "initial"          # protect received; no first point confirmed yet
    PROTECTED = "protected"      # the first point is committed
    FAILED_OVER = "failed_over"  # planned failover: source off, final cycle shipped


JOURNAL_KEEP = 1000


def settings_from_args(d: dict[str, Any] | None) -> ReplicationSettings:
    """The ``settings`` object of ``protect`` / ``update_settings`` → engine settings.

    Keys (all optional): ``frequency_s``, ``app_consistent_every_s`` (null = never),
    ``rpo_threshold_s``, ``retention_hours``, ``resync_window`` ("HH:MM-HH:MM", "always", or
    null for the default 18:00-08:00), ``compression_mode`` ("auto" | "zstd" | "off"; else the
    boolean ``compression`` an older vault sends). ``InvalidInput`` on a bad value.
    """
    d = d or {}
    base = ReplicationSettings()
    try:
        freq = float(d["frequency_s"]) if d.get("frequency_s") is not None else base.frequency_s
        app_raw = d.get("app_consistent_every_s", base.app_consistent_every_s)
        app = float(app_raw) if app_raw else None
        rpo = float(d["rpo_threshold_s"]) if d.get("rpo_threshold_s") is not None \
            else base.rpo_threshold_s
        retention = base.retention
        if d.get("retention_hours") is not None:
            hours = float(d["retention_hours"])
            if hours <= 0:
                raise ValueError(f"retention_hours must be positive, not {hours}")
            retention = rule_for_hours(hours)
        window = parse_window(d.get("resync_window"))
        bw = d.get("bandwidth_limit_bps")
        return ReplicationSettings(frequency_s=freq, app_consistent_every_s=app,
                                   rpo_threshold_s=rpo, retention=retention,
                                   compression=compression_mode(
                                       d.get("compression_mode", d.get("compression", True))),
                                   bandwidth_limit_bps=int(bw) if bw else None,
                                   resync_window=window)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"invalid replication settings {d!r}: {e}") from e


def parse_window(value: Any) -> ResyncWindow:
    """``"18:00-08:00"`` → window; ``"always"`` → always open; None → the default window."""
    if value is None or value == "":
        return ResyncWindow()
    text = str(value).strip().lower()
    if text == "always":
        return ALWAYS
    start, sep, end = text.partition("-")
    if not sep:
        raise ValueError(f"resync window {value!r} is not HH:MM-HH:MM")
    parse_hhmm(start.strip())
    parse_hhmm(end.strip())
    return ResyncWindow(start.strip(), end.strip())


def _save(path: Path, obj: Any) -> None:
    try:
        atomic_write_json(path, obj)
    except OSError as e:
        raise classify_os_error(e, f"agent state {path}") from e


def _load(path: Path, default: Any) -> Any:
    try:
        return read_json(path)
    except FileNotFoundError:
        return default
    except OSError as e:
        raise classify_os_error(e, f"agent state {path}") from e
    except ValueError as e:
        raise InvalidInput(f"agent state {path} is damaged: {e}",
                           hint="Restore it from a backup or remove it; the vault re-sends "
                                "protect commands for the items it expects.") from e


@dataclass
class ItemEntry:
    """One protected item as the agent was told to protect it."""

    item_id: str
    vm_id: str
    target_site: str
    store_url: str
    settings: dict[str, Any] = field(default_factory=dict)
    phase: ItemPhase = ItemPhase.INITIAL
    created_at: float = 0.0
    # split-brain guard: the engine is fenced once the store records a newer generation
    generation: int = 1
    # re-protect: the store holds the old primary's disks as a base point; the first point is
    # a resync against it (persisted: a restart must not take the base as this VM's point)
    resync_from_base: bool = False
    # fenced: a failover promoted the other site; this host powered the VM off (it was running
    # then: ``fenced_running``, so that a cancel powers it on again)
    fenced: bool = False
    fenced_running: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "vm_id": self.vm_id, "target_site": self.target_site,
                "store_url": self.store_url, "settings": dict(self.settings),
                "phase": self.phase.value, "created_at": self.created_at,
                "generation": self.generation, "resync_from_base": self.resync_from_base,
                "fenced": self.fenced, "fenced_running": self.fenced_running}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ItemEntry:
        return ItemEntry(item_id=str(d["item_id"]), vm_id=str(d["vm_id"]),
                         target_site=str(d.get("target_site") or ""),
                         store_url=str(d["store_url"]), settings=dict(d.get("settings") or {}),
                         phase=ItemPhase(d.get("phase") or ItemPhase.INITIAL),
                         created_at=float(d.get("created_at") or 0.0),
                         generation=int(d.get("generation") or 1),
                         resync_from_base=bool(d.get("resync_from_base")),
                         fenced=bool(d.get("fenced")),
                         fenced_running=bool(d.get("fenced_running")))


class ItemsFile:
    """``items.json``: the items this host protects. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, ItemEntry]:
        raw = _load(self.path, {"items": []})
        try:
            return {e.item_id: e for e in (ItemEntry.from_dict(x) for x in raw.get("items", []))}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidInput(f"agent state {self.path} is damaged: {e}") from e

    def save(self, entries: dict[str, ItemEntry]) -> None:
        with self._lock:
            _save(self.path, {"items": [entries[k].to_dict() for k in sorted(entries)]})


@dataclass
class CatalogEntry:
    """What the vault knows of one item's points: its last ack and the ids it stored."""

    ack: int = 0
    reported: set[str] = field(default_factory=set)


class CatalogFile:
    """``catalog.json``. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, CatalogEntry]:
        raw = _load(self.path, {})
        out: dict[str, CatalogEntry] = {}
        if isinstance(raw, dict):
            for item_id, v in raw.items():
                if isinstance(v, dict):
                    out[str(item_id)] = CatalogEntry(int(v.get("ack") or 0),
                                                     {str(p) for p in v.get("reported") or []})
        return out

    def save(self, entries: dict[str, CatalogEntry]) -> None:
        with self._lock:
            _save(self.path, {k: {"ack": v.ack, "reported": sorted(v.reported)}
                              for k, v in sorted(entries.items())})


@dataclass
class Finished:
    """The final outcome of a command, kept so that a re-sent command is answered, not rerun."""

    command_id: str
    kind: str
    item_id: str
    status: CommandStatus            # SUCCEEDED | FAILED
    result: dict[str, Any]
    error: dict[str, Any] | None
    finished_at: float
    posted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "kind": self.kind, "item_id": self.item_id,
                "status": self.status.value, "result": self.result, "error": self.error,
                "finished_at": self.finished_at, "posted": self.posted}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Finished:
        return Finished(str(d["command_id"]), str(d["kind"]), str(d["item_id"]),
                        CommandStatus(d["status"]), dict(d.get("result") or {}), d.get("error"),
                        float(d["finished_at"]), bool(d.get("posted")))


SECRET_FIELDS = ("secret", "keys")


def redact_args(args: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A command's arguments without cloud-store credentials and keys (``store.secret``,
    ``store.keys``), and whether anything was removed (point keys never reach the journal: the
    daemon keeps them in their own 0600 files first). The journal never holds secrets: a
    ``protect`` finds them again in the item's 0600 spec file; other commands that carried
    them cannot be resumed from the journal and are reported interrupted instead."""
    spec = args.get("store")
    if not isinstance(spec, dict) or not any(spec.get(k) for k in SECRET_FIELDS):
        return dict(args), False
    kept = {k: v for k, v in spec.items() if k not in SECRET_FIELDS}
    return {**args, "store": kept}, True


@dataclass
class Accepted:
    """A command the agent took from the vault and has not finished (``commands.json``)."""

    command_id: str
    kind: str
    item_id: str
    args: dict[str, Any]
    accepted_at: float
    redacted: bool = False  # secrets were left out of ``args``

    def to_dict(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "kind": self.kind, "item_id": self.item_id,
                "args": self.args, "accepted_at": self.accepted_at, "redacted": self.redacted}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Accepted:
        return Accepted(str(d["command_id"]), str(d["kind"]), str(d["item_id"]),
                        dict(d.get("args") or {}), float(d.get("accepted_at") or 0.0),
                        bool(d.get("redacted")))


class CommandJournal:
    """``commands.json``: accepted, started and finished commands (the last ``JOURNAL_KEEP``
    finished).

    Invariant: a command id is in ``accepted`` from the moment the agent takes it until its
    final result is recorded (``finish``), so a restarted agent knows every command it owes
    the vault an answer for (:meth:`unfinished`).

    Responsible for: exactly-once bookkeeping across restarts. Thread-safe.
    """

    def __init__(self, path: Path, *, keep: int = JOURNAL_KEEP) -> None:
        self.path = path
        self.keep = keep
        self._lock = threading.Lock()
        raw = _load(path, {})
        try:
            self._started: dict[str, dict[str, Any]] = dict(raw.get("started") or {})
            self._accepted: dict[str, Accepted] = {
                k: Accepted.from_dict(v) for k, v in (raw.get("accepted") or {}).items()}
            self._finished: dict[str, Finished] = {
                k: Finished.from_dict(v) for k, v in (raw.get("finished") or {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidInput(f"agent state {path} is damaged: {e}") from e

    def _flush(self) -> None:
        if len(self._finished) > self.keep:
            newest = sorted(self._finished.values(), key=lambda f: f.finished_at)[-self.keep:]
            self._finished = {f.command_id: f for f in newest}
        _save(self.path, {"accepted": {k: v.to_dict() for k, v in self._accepted.items()},
                          "started": self._started,
                          "finished": {k: v.to_dict() for k, v in self._finished.items()}})

    def accept(self, command_id: str, *, kind: str, item_id: str, args: dict[str, Any]) -> None:
        """Record (durably, before the command is queued) that the agent took the command;
        its secrets are left out (:func:`redact_args`). Kept as is if already there."""
        with self._lock:
            if command_id in self._accepted or command_id in self._finished:
                return
            kept, redacted = redact_args(args)
            self._accepted[command_id] = Accepted(command_id, kind, item_id, kept, time.time(),
                                                  redacted)
            self._flush()

    def unfinished(self) -> list[Accepted]:
        """Commands accepted and not finished (what a restarted agent still owes), oldest
        first."""
        with self._lock:
            return sorted(self._accepted.values(), key=lambda a: (a.accepted_at, a.command_id))

    def started(self, command_id: str) -> dict[str, Any] | None:
        """What was recorded when the command started (before a crash), or None."""
        with self._lock:
            s = self._started.get(command_id)
            return dict(s) if s is not None else None

    def start(self, command_id: str, *, kind: str, item_id: str, **facts: Any) -> None:
        """Record that a command starts, with facts a rerun needs (kept if already there: the
        first start's facts are the ones that tell whether the work already happened)."""
        with self._lock:
            if command_id in self._started:
                return
            self._started[command_id] = {"kind": kind, "item_id": item_id,
                                         "started_at": time.time(), **facts}
            self._flush()

    def finished(self, command_id: str) -> Finished | None:
        with self._lock:
            return self._finished.get(command_id)

    def finish(self, fin: Finished) -> None:
        with self._lock:
            self._started.pop(fin.command_id, None)
            self._accepted.pop(fin.command_id, None)
            self._finished[fin.command_id] = fin
            self._flush()

    def mark_posted(self, command_id: str) -> None:
        with self._lock:
            f = self._finished.get(command_id)
            if f is not None and not f.posted:
                f.posted = True
                self._flush()

    def mark_unposted(self, command_id: str) -> None:
        """The vault asked again for a finished command: it does not have the result."""
        with self._lock:
            f = self._finished.get(command_id)
            if f is not None and f.posted:
                f.posted = False
                self._flush()

    def unposted(self) -> list[Finished]:
        with self._lock:
            return sorted((f for f in self._finished.values() if not f.posted),
                          key=lambda f: f.finished_at)

    def forget_started(self, command_id: str) -> None:
        with self._lock:
            if self._started.pop(command_id, None) is not None:
                self._flush()
