"""The agent's heartbeat: what it tells the vault, and what it takes from the reply.

A heartbeat carries the host's VM inventory, one report per item, each item's new and removed
recovery points, the ids of the commands the agent holds, and (a store host) the access-list
digest, the store's audit entries and the recovery book's digest, plus break-glass reports the
vault has not acknowledged. It carries only what changed since the last one the vault answered
(report digests per item, "" = inventory); a full one every ``FULL_HEARTBEAT_EVERY``, after a
start and after a failure. The reply's ack per item moves the point catalogue
(``catalog.json``): ``new_points`` = points with seq > the vault's last ack; ``removed_points``
= ids the vault acked that are gone. Points come from the catalogue refresher
(:mod:`drsite.agent.peers`): never a call to another site on the heartbeat's thread.

Responsible for: building a heartbeat, applying its reply (ack, store access list, recovery
book, break-glass acks, commands handed to the lanes). Not responsible for: when heartbeats are
sent or what a failure means (the daemon's loop), running commands (:mod:`drsite.agent.lanes`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import drsite
from drsite.agent import breakglass, recoverybook, storeacl, syncmode
from drsite.agent.items import Item
from drsite.agent.lanes import CommandLanes
from drsite.agent.link import HeartbeatReply, VaultLink
from drsite.agent.peers import Catalogue
from drsite.agent.recoverybook import RecoveryBook
from drsite.agent.registration import AgentIdentity
from drsite.agent.state import CatalogEntry, CatalogFile
from drsite.agent.storeservice import StoreService
from drsite.core.errors import DrsiteError, NotFound
from drsite.hypervisors.contract import HypervisorDriver
from drsite.replication.report import Health, ItemReport, ItemState
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)

FULL_HEARTBEAT_EVERY = 30

Sent = dict[str, tuple[list[PointInfo], list[str]]]
"""Per item, the (new, removed) points a heartbeat reported (to apply the vault's ack)."""


class BeatHost(Protocol):
    """What the heartbeat needs of the agent daemon (:class:`drsite.agent.daemon.Agent`
    implements it; declared here so that this module does not import the daemon)."""

    data_dir: Path
    hypervisor: HypervisorDriver
    identity: AgentIdentity
    link: VaultLink
    lanes: CommandLanes

    @property
    def store_url(self) -> str | None: ...

    def open_items(self) -> list[Item]:
        """A snapshot of the items this host protects."""
        ...

    def has_item(self, item_id: str) -> bool: ...

    def catalogue(self, item_id: str) -> Catalogue:
        """The item's last point listing (and its failure, if any)."""
        ...

    def beat_soon(self) -> None:
        """Send the next heartbeat now rather than at the end of the interval."""
        ...


def inventory(hypervisor: HypervisorDriver, data_dir: Path,
              book: RecoveryBook | None) -> list[dict[str, Any]]:
    """The host's VMs as the heartbeat reports them: not those a break-glass failover is
    starting (their record is not saved yet; the vault would see a new VM of its site)."""
    try:
        vms = [vm.to_dict() for vm in hypervisor.list_vms()]
    except DrsiteError as e:
        log.warning("listing VMs failed: %s", e)
        return []
    if book is None:
        return vms
    # listed first, then checked: a run that ends in between is reported in this beat
    hidden = breakglass.vms_in_flight(data_dir, book.doc)
    return [v for v in vms if v.get("name") not in hidden]


class Heartbeats:
    """The heartbeats of one agent, one after the other (the caller's thread).

    ``lock`` is the agent's own (its item table and the catalogue are read together);
    ``store`` and ``book``: this host's recovery store service and recovery book, if any."""

    def __init__(self, host: BeatHost, lock: threading.RLock, *,
                 store: StoreService | None, book: RecoveryBook | None) -> None:
        self.host = host
        self.store = store
        self.book = book
        self._lock = lock
        self._catalog_file = CatalogFile(host.data_dir / "catalog.json")
        self._catalog = self._catalog_file.load()
        # what the vault was last told (report digests per item, "" = inventory): heartbeats
        # carry only what changed, and a full one every FULL_HEARTBEAT_EVERY or after a failure
        self._beat_digests: dict[str, str] = {}
        self._pending_digests: dict[str, str] = {}
        self._beats_since_full = 0
        # one beat at a time (the beat thread, a tick, a caller's heartbeat_once): a beat's
        # digests and acks are the ones it sent, and a beat that returns found every earlier
        # one answered (what it carried is at the vault)
        self._beat_lock = threading.Lock()
        # starts of the agent's work, and the last one a heartbeat was answered after: until
        # then beats say ``restarted`` (the vault re-sends at once every command it delivered
        # before that the beat's ``held`` does not list)
        self._starts = 1
        self._answered_start = 0

    # ----------------------------------------------------------------------------- reports

    def _issues(self, item: Item) -> list[str]:
        """Conditions outside the engine's report that degrade the item (its recovery store
        at the peer site does not answer)."""
        cat = self.host.catalogue(item.entry.item_id)
        out = syncmode.issues(self.host.hypervisor, item.entry.vm_id, item.entry.settings,
                              cat.points, item.sync_issue)
        if cat.error is not None:
            out.append(f"recovery store {item.entry.store_url} does not answer: "
                       f"{cat.error.message}")
        return out

    def item_report(self, item: Item) -> dict[str, Any]:
        if item.replicator is not None:
            report = item.replicator.report.to_dict()
            issues = self._issues(item)
            if issues:
                report["agent_issues"] = issues
            return report
        err = item.error or NotFound("item not opened")
        rep = ItemReport(item_id=item.entry.item_id, vm_id=item.entry.vm_id, vm_name="",
                         state=ItemState.CRITICAL, health=Health.CRITICAL,
                         health_reasons=[err.message], last_error=err.to_dict(),
                         updated_at=time.time())
        return rep.to_dict()

    def reports(self) -> dict[str, dict[str, Any]]:
        """The report of every item this host protects (what the heartbeat carries)."""
        return {it.entry.item_id: self.item_report(it) for it in self.host.open_items()}

    # ----------------------------------------------------------------------------- points

    def _points_delta(self, item: Item) -> tuple[list[PointInfo], list[str]]:
        """(points the vault has not acked, points it knows that are gone), from the last
        catalogue listing (:class:`~drsite.agent.peers.CatalogueRefresher`): never a call to
        another site on the heartbeat's thread."""
        if item.catalog is None:
            return [], []
        cat = self._catalog.get(item.entry.item_id) or CatalogEntry()
        points = self.host.catalogue(item.entry.item_id).points
        if points is None:
            return [], []
        new = [p for p in points if p.seq > cat.ack]
        ids = {p.point_id for p in points}
        removed = sorted(cat.reported - ids)
        return new, removed

    def drop_acks(self, item_id: str) -> dict[str, CatalogEntry] | None:
        """Forget an unprotected item's acks (call under the agent's lock): the catalogue to
        save (:meth:`save_acks`), or None when it held nothing of the item."""
        with self._lock:
            if self._catalog.pop(item_id, None) is None:
                return None
            return {k: CatalogEntry(v.ack, set(v.reported)) for k, v in self._catalog.items()}

    def save_acks(self, catalog: dict[str, CatalogEntry]) -> None:
        self._catalog_file.save(catalog)

    # ----------------------------------------------------------------------------- beats

    def build(self, *, full: bool = True) -> tuple[dict[str, Any], Sent]:
        """The heartbeat payload, and per item what it reports of points (to apply the ack).

        ``full=False``: only what changed since the last heartbeat the vault answered —
        ``vms`` is ``null`` when the inventory is unchanged, and an item is listed only when
        its report changed or it has new or removed points (``docs/control-plane.md``)."""
        items = self.host.open_items()
        sent: Sent = {}
        out_items: list[dict[str, Any]] = []
        digests: dict[str, str] = {}
        for it in items:
            new, removed = self._points_delta(it)
            report = self.item_report(it)
            digest = json.dumps(report, sort_keys=True, default=str)
            digests[it.entry.item_id] = digest
            if not full and not new and not removed \
                    and self._beat_digests.get(it.entry.item_id) == digest:
                continue
            sent[it.entry.item_id] = (new, removed)
            out_items.append({"item_id": it.entry.item_id, "report": report,
                              "new_points": [p.to_dict() for p in new],
                              "removed_points": removed})
        vms = inventory(self.host.hypervisor, self.host.data_dir, self.book)
        digests[""] = json.dumps(vms, sort_keys=True, default=str)
        payload = {"host_name": self.host.identity.host_name, "version": drsite.__version__,
                   "store_url": self.host.store_url,
                   "vms": vms if full or self._beat_digests.get("") != digests[""] else None,
                   "items": out_items, "held": self.host.lanes.held_commands()}
        self._pending_digests = digests
        return payload, sent

    def _apply_ack(self, reply: HeartbeatReply, sent: Sent) -> None:
        changed = False
        with self._lock:
            for item_id, (new, removed) in sent.items():
                if not self.host.has_item(item_id):
                    continue
                cat = self._catalog.setdefault(item_id, CatalogEntry())
                before = (cat.ack, set(cat.reported))
                cat.reported -= set(removed)
                ack = reply.ack.get(item_id)
                if ack is not None:
                    cat.ack = ack
                    cat.reported |= {p.point_id for p in new if p.seq <= ack}
                changed |= before != (cat.ack, cat.reported)
            catalog = {k: CatalogEntry(v.ack, set(v.reported)) for k, v in self._catalog.items()}
        if changed:
            self._catalog_file.save(catalog)

    def started(self) -> None:
        """The agent (re)started its work: the next answered heartbeat says ``restarted``."""
        self._starts += 1

    def once(self) -> HeartbeatReply:
        """One heartbeat: send, apply the ack, accept the commands, post pending results and
        progress. Raises ``NetworkError`` (vault unreachable), ``AuthError`` and the like."""
        with self._beat_lock:
            return self._once()

    def _once(self) -> HeartbeatReply:
        full = self._beats_since_full >= FULL_HEARTBEAT_EVERY or not self._beat_digests
        store_fields: dict[str, Any] = {}
        try:
            payload, sent = self.build(full=full)
            store_fields = storeacl.beat_fields(self.store)  # access-list digest, store audit
            payload.update(store_fields)
            if self.book is not None:
                payload["recovery_book_digest"] = self.book.digest
                payload["recovery_book_patches"] = True
            starts = self._starts
            if starts != self._answered_start:
                payload["restarted"] = True
            reports = breakglass.pending_reports(self.host.data_dir)
            if reports:
                payload["breakglass"] = reports  # until the vault acknowledges them
            reply = self.host.link.heartbeat(payload)
        except DrsiteError:
            self._beat_digests = {}  # the vault may have missed anything: the next one is full
            storeacl.beat_failed(self.store, store_fields)
            raise
        self._beat_digests = self._pending_digests
        self._beats_since_full = 0 if full else self._beats_since_full + 1
        self._answered_start = starts
        # the book first: it names the sync journals to keep, and the list may admit a new
        # item's writer (whose journal must not look like an unprotected item's)
        recoverybook.apply_reply(self.book, reply.recovery_book, reply.recovery_book_patch)
        # (a job waiting for this list to be confirmed asks for the next beat on the channel)
        storeacl.apply_reply(self.store, reply.store_acl)
        breakglass.mark_reported(self.host.data_dir, reply.breakglass_ack)
        self._apply_ack(reply, sent)
        lanes = self.host.lanes
        for cmd in reply.commands:
            lanes.accept(cmd)
        lanes.flush_results()
        lanes.post_progress()
        return reply
