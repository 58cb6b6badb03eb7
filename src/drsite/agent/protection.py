"""Protection commands on an agent: ``protect``, ``cycle``, ``resync``, ``retention``,
``update_settings``, ``unprotect``, and the agent's own work on its items (``resume`` after a
restart, ``auto`` while the vault is away).

Each runs in its item's lane (:mod:`drsite.agent.lanes`), so the item's engine is used by one
thread at a time. Idempotency: ``protect``, ``retention``, ``unprotect`` and
``update_settings`` are idempotent by nature (``run_initial`` returns the existing first
point); a ``cycle`` or ``resync`` that completed just before a crash is recognised from the
point seq the journal recorded when it started (:meth:`ProtectionCommands.already_done`), so
it is not run twice.

Responsible for: turning a command into calls on the item's engine and records. Not
responsible for: replication mechanics (:class:`~drsite.replication.driver.ItemReplicator`),
the item table and its files (the daemon), deciding when anything runs (the vault).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from drsite.agent import cloudstores, pointkeys, storeacl, syncmode
from drsite.agent.host import AgentHost
from drsite.agent.items import Item
from drsite.agent.lanes import Interrupted
from drsite.agent.link import Command
from drsite.agent.state import ItemEntry, ItemPhase, settings_from_args
from drsite.core.errors import Conflict, DrsiteError, Fenced, InvalidInput, NotFound, VmNotFound
from drsite.hypervisors.contract import SyncMirrorHost
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemState
from drsite.store.factory import StoreSpec
from drsite.store.format import PointInfo
from drsite.tracking.changelog import cap_for_interval

log = logging.getLogger(__name__)

KINDS = ("protect", "cycle", "resync", "retention", "update_settings", "unprotect")


class ProtectionHost(AgentHost, Protocol):
    """What these commands need of the agent daemon (:class:`drsite.agent.daemon.Agent`
    implements it; declared here so that this module does not import the daemon)."""

    @property
    def stopping(self) -> bool:
        """The agent is shutting down."""
        ...

    def live_item(self, cmd: Command) -> tuple[Item, ItemReplicator]: ...

    def lookup(self, item_id: str) -> tuple[Item | None, ItemEntry | None]:
        """The item's open engine and its entry (``items.json``), each if any."""
        ...

    def record_entry(self, entry: ItemEntry) -> None:
        """Put the entry in the item table and save ``items.json``."""
        ...

    def save_entries(self) -> None: ...

    def rebuild_item(self, entry: ItemEntry, old: Item | None) -> Item:
        """Close ``old`` (if any) and open the item's engine again from ``entry``."""
        ...

    def reopen(self, item_id: str) -> Item | None: ...

    def mark_protected(self, item: Item) -> None: ...

    def forget_item(self, item: Item) -> None:
        """Drop the item from the table, ``items.json``, ``catalog.json`` and its engine
        record; close its engine."""
        ...

    def started_facts(self, command_id: str) -> dict[str, Any] | None: ...

    def fence_on_own(self, item_id: str, e: Fenced) -> None: ...


def save_point_key(data_dir: Path, cmd: Command) -> bool:
    """Keep the item's point key from ``protect`` (0600 file); whether it changed."""
    raw = cmd.args.get("point_key")
    if not isinstance(raw, str) or not raw or raw == "redacted":
        return False
    return pointkeys.save_key(data_dir, cmd.item_id or "", raw)


class ProtectionCommands:
    """Runs the protection commands of one agent (called from the item's lane)."""

    def __init__(self, host: ProtectionHost) -> None:
        self.host = host

    def handle(self, cmd: Command) -> dict[str, Any]:
        fn = {"protect": self._protect, "cycle": self._cycle, "resync": self._resync,
              "retention": self._retention, "unprotect": self._unprotect,
              "update_settings": self._update_settings}.get(cmd.kind)
        if fn is None:
            raise InvalidInput(f"unknown command kind {cmd.kind!r}",
                               hint="The agent is older than the vault; upgrade it.")
        return fn(cmd)

    def already_done(self, cmd: Command, rep: ItemReplicator, kind: str | None
                     ) -> PointInfo | None:
        """The point a ``cycle``/``resync`` made before a crash cut off its result, if any."""
        first = self.host.started_facts(cmd.command_id)
        if first is None or "before_seq" not in first or rep.rec.cycle_id is not None:
            return None
        if rep.rec.phase is not ItemState.PROTECTED:
            return None
        later = [p for p in rep.target.repo.points()
                 if p.seq > int(first["before_seq"]) and (kind is None or p.kind == kind)]
        return later[0] if later else None

    # ----------------------------------------------------------------------------- own work

    def run_own(self, item_id: str, kind: str) -> None:
        """The agent's own work: ``resume`` after a restart, ``auto`` while offline."""
        item, _ = self.host.lookup(item_id)
        if item is None or item.replicator is None:
            return
        rep = item.replicator
        try:
            if kind == "resume":
                if rep.target.repo.latest() is None:
                    point = rep.run_initial(wait_transient=False)
                    self.host.mark_protected(item)
                    log.info("item %s: interrupted initial replication finished (point %s)",
                             item_id, point.point_id)
                elif item.entry.resync_from_base:
                    return  # the base is the old primary's disks: the vault's protect resyncs
                elif item.entry.phase == ItemPhase.INITIAL:
                    self.host.mark_protected(item)
                if rep.rec.cycle_id is not None or rep.rec.phase is ItemState.RESYNCING:
                    decision = rep.step()  # finishes the sealed cycle / the resync
                    log.info("item %s: resumed interrupted work: %s", item_id,
                             decision.reason)
            else:
                decision = rep.step()
                log.info("item %s (offline mode): %s %s", item_id, decision.action.value,
                         decision.reason)
        except Interrupted:
            if not self.host.stopping:
                self.host.reopen(item_id)
        except DrsiteError as e:
            log.warning("item %s: %s failed (%s): %s; waiting for the vault", item_id, kind,
                        e.error_class.value, e)
            if isinstance(e, Fenced):
                self.host.fence_on_own(item_id, e)
        err = rep.report.last_error
        if err and err.get("code") == Fenced.code:
            self.host.fence_on_own(item_id, Fenced(str(err.get("message") or "fenced")))

    # ----------------------------------------------------------------------------- commands

    def _protect(self, cmd: Command) -> dict[str, Any]:
        host = self.host
        a = cmd.args
        try:
            vm_id, store_url = str(a["vm_id"]), str(a["store_url"])
        except KeyError as e:
            raise InvalidInput(f"protect {cmd.item_id}: missing argument {e.args[0]!r}") from None
        settings = dict(a.get("settings") or {})
        settings_from_args(settings)  # validate before anything is recorded
        cloud = a.get("store")  # a cloud store's full spec (credentials, keys)
        if cloud is not None:
            cloud = StoreSpec.from_dict(cloud).to_dict()  # validate before anything is recorded
            store_url = cloudstores.CLOUD_STORE_URL + str(cloud["name"] or "store")
        host.hypervisor.get_vm(vm_id)  # VmNotFound before anything is recorded
        key_changed = save_point_key(host.data_dir, cmd)
        item, entry = host.lookup(cmd.item_id)
        if entry is not None and entry.vm_id != vm_id:
            raise Conflict(f"item {cmd.item_id} protects VM {entry.vm_id} on this host, not "
                           f"{vm_id}")
        spec_changed = cloud is not None and cloudstores.save_spec(host.data_dir, cmd.item_id,
                                                                   cloud)
        rebuild = item is None or item.replicator is None or entry is None \
            or entry.store_url != store_url or spec_changed or key_changed
        if entry is None:
            entry = ItemEntry(cmd.item_id, vm_id, str(a.get("target_site") or ""), store_url,
                              settings, ItemPhase.INITIAL, time.time(),
                              generation=int(a.get("generation") or 1),
                              resync_from_base=bool(a.get("resync_from_base")))
        else:
            entry.store_url, entry.settings = store_url, settings
            entry.target_site = str(a.get("target_site") or entry.target_site)
        host.record_entry(entry)
        if rebuild:
            item = host.rebuild_item(entry, item)
        assert item is not None
        if item.replicator is None:
            assert item.error is not None
            raise item.error
        item.replicator.settings = settings_from_args(settings)
        self._apply_log_cap(entry.vm_id, item.replicator.settings.frequency_s)
        # before the first seal: a sync item's journal begins at its initial point
        self._apply_sync_mode(item)
        if entry.resync_from_base:
            # re-protect: the store holds the old primary's disks as a base point; only the
            # blocks that differ travel (never an initial full copy over a common base)
            rep = item.replicator
            latest = rep.target.repo.latest()
            if latest is None or latest.kind != "resync" or rep.rec.phase is not ItemState.PROTECTED:
                point = rep.run_resync("re-protect: resync against the old primary's disks",
                                       wait_transient=False)
            else:
                point = latest
            entry.resync_from_base = False
            host.mark_protected(item)  # saves the entries
            host.save_entries()
            return {"point": point.to_dict(), "report": rep.report.to_dict()}
        point = item.replicator.run_initial(wait_transient=False)
        host.mark_protected(item)
        return {"point": point.to_dict(), "report": item.replicator.report.to_dict()}

    def _cycle(self, cmd: Command) -> dict[str, Any]:
        _, rep = self.host.live_item(cmd)
        done = self.already_done(cmd, rep, None)
        if done is not None:
            log.info("command %s: its cycle was committed before a restart (point %s)",
                     cmd.command_id, done.point_id)
            return {"point": done.to_dict(), "report": rep.report.to_dict()}
        item, _ = self.host.lookup(cmd.item_id)
        if item is not None:
            self._refresh_sync_mode(item)
        app = cmd.args.get("app_consistent")
        point = rep.run_cycle(app_consistent=bool(app) if app is not None else None,
                              wait_transient=False)
        return {"point": point.to_dict(), "report": rep.report.to_dict()}

    def _resync(self, cmd: Command) -> dict[str, Any]:
        _, rep = self.host.live_item(cmd)
        done = self.already_done(cmd, rep, "resync")
        if done is not None:
            return {"point": done.to_dict(), "report": rep.report.to_dict()}
        reason = str(cmd.args.get("reason") or ("started by hand" if cmd.args.get("by_hand")
                                                else "started by the vault"))
        point = rep.run_resync(reason, wait_transient=False,
                               from_store=bool(cmd.args.get("from_store")))
        return {"point": point.to_dict(), "report": rep.report.to_dict()}

    def _retention(self, cmd: Command) -> dict[str, Any]:
        if cmd.args.get("store_side"):  # this host's store holds the item (agent/storeacl.py)
            store = self.host.store_service
            if store is None:
                raise InvalidInput(f"host {self.host.identity.host_name} serves no recovery "
                                   "store",
                                   hint="The vault sends store-side retention to the agent "
                                        "that serves the item's store.")
            return storeacl.store_retention(store, cmd)
        _, rep = self.host.live_item(cmd)
        if not rep.target.runs_retention:
            # committed points on a site store are removed by the store's own agent only
            return {"deleted_points": [], "store_side": False}
        # the vault's ``keep``: member points of group points within retention
        pinned = {p for p in (rep.target.replica_point(),) if p} | storeacl.retention_keep(cmd)
        deleted = rep.target.repo.apply_retention(rep.settings.retention, time.time(), pinned)
        if deleted:
            log.info("item %s: retention removed %d point(s)", cmd.item_id, len(deleted))
        return {"deleted_points": deleted}

    def _update_settings(self, cmd: Command) -> dict[str, Any]:
        settings = dict(cmd.args.get("settings") or {})
        new = settings_from_args(settings)
        item, rep = self.host.live_item(cmd)
        item.entry.settings = settings
        self.host.save_entries()
        rep.settings = new
        self._apply_log_cap(item.entry.vm_id, new.frequency_s)
        self._apply_sync_mode(item)
        return {"settings": settings}

    def _refresh_sync_mode(self, item: Item) -> None:
        """Before a cycle of a sync item whose mirror is suspended (or never configured):
        ask the recovery site for its sync endpoint again (its agent may have restarted on
        another port), so that this cycle's seal begins a journal run that can connect."""
        try:
            sync, _ = syncmode.sync_mode(item.entry.settings)
            hv = self.host.hypervisor
            if not sync or not isinstance(hv, SyncMirrorHost):
                return
            st = hv.sync_status(item.entry.vm_id)
        except DrsiteError:
            return
        if item.sync_issue or (st is not None and st.get("state") == "suspended"):
            self._apply_sync_mode(item)

    def _apply_sync_mode(self, item: Item) -> None:
        """Synchronous or asynchronous, as the policy says (``agent/syncmode.py``)."""
        syncmode.sync_mode(item.entry.settings)  # InvalidInput before anything changes
        assert item.replicator is not None
        item.sync_issue = syncmode.configure(self.host.hypervisor, self.host.identity,
                                             item.entry.item_id, item.entry.vm_id,
                                             item.replicator.target, item.entry.settings)

    def _apply_log_cap(self, vm_id: str, frequency_s: float) -> None:
        """The change log holds a few intervals of writes at the policy's frequency (issue 13
        part 5), not a fixed 64 MiB."""
        self.host.hypervisor.set_change_log_limit(vm_id, cap_for_interval(frequency_s))

    def _unprotect(self, cmd: Command) -> dict[str, Any]:
        host = self.host
        delete = bool(cmd.args.get("delete_points"))
        item, entry = host.lookup(cmd.item_id)
        if item is None or entry is None:
            return {"already_unprotected": True, "deleted_points": []}
        deleted: list[str] = []
        rep = item.replicator
        if rep is not None:
            with contextlib.suppress(VmNotFound):
                pending = host.hypervisor.pending_cycle(entry.vm_id)
                if pending is not None:
                    host.hypervisor.release(pending)
            repo = rep.target.repo
            for cycle_id in repo.staged_cycles():
                repo.abort(cycle_id)
            if delete and not rep.target.runs_retention:
                pass  # the store's own agent deletes them (the vault sends it 'retention')
            elif delete:
                for p in repo.points():
                    repo.delete_point(p.point_id)
                    deleted.append(p.point_id)
                repo.gc()
        elif delete:
            raise item.error or NotFound(f"item {cmd.item_id} cannot be opened")
        if isinstance(host.hypervisor, SyncMirrorHost):  # no mirror to an unprotected item
            with contextlib.suppress(DrsiteError):
                host.hypervisor.set_sync(entry.vm_id, None)
        host.forget_item(item)
        cloudstores.remove_spec(host.data_dir, cmd.item_id)
        pointkeys.remove_key(host.data_dir, cmd.item_id)
        log.info("item %s unprotected%s", cmd.item_id,
                 f", {len(deleted)} point(s) deleted" if delete else "")
        return {"deleted_points": deleted}
