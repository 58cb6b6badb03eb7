"""The items this host protects, as the agent daemon holds them in memory, and how an item's
engine is built from its entry.

An :class:`Item` is an entry of ``items.json`` (:mod:`drsite.agent.state`) with its open
engine (an ``ItemReplicator`` over the item's recovery target) and a second ``Repository``
over the same store that only the heartbeat's catalogue lists (the engine's caches are not
shared across threads). :class:`ItemEngines` builds and closes them, and holds the store
clients they share: one per peer store URL, and one more per URL with short timeouts for
the catalogue (a hung peer must be noticed in seconds).

Responsible for: building and closing engines. Not responsible for: the item table or its
file (the daemon), running anything on an engine (the item's lane).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drsite.agent import cloudstores, pointkeys
from drsite.agent.peers import CatalogueRefresher
from drsite.agent.state import ItemEntry, ItemPhase, settings_from_args
from drsite.core.errors import DrsiteError, classify_os_error
from drsite.hypervisors.contract import HypervisorDriver
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemReport, ItemState
from drsite.replication.target import RecoveryTarget
from drsite.sitestore import SITE_TARGET_OPTIONS, SiteObjectStore, SiteTarget
from drsite.store.contract import ObjectStore
from drsite.store.repository import Repository

log = logging.getLogger(__name__)

TargetFactory = Callable[[str, str], RecoveryTarget]
"""``(store_url, item_id) → RecoveryTarget``; the default builds a ``SiteTarget``."""

CATALOGUE_TIMEOUT_S = 5.0  # listing an item's points at a peer store


@dataclass
class Item:
    """One protected item: its entry, its engine (None when it cannot be opened: then
    ``error`` says why) and the heartbeat's own view of its points."""

    entry: ItemEntry
    replicator: ItemReplicator | None
    catalog: Repository | None     # the heartbeat thread's own view of the item's points
    error: DrsiteError | None = None
    sync_issue: str | None = None  # why synchronous mode could not be configured (syncmode)

    def needs_resume(self) -> bool:
        """Its work was cut short by a restart: an unconfirmed initial copy, a sealed cycle in
        flight, or a resync running (the agent resumes it on its own)."""
        rep = self.replicator
        if rep is None:
            return False
        if self.entry.phase == ItemPhase.INITIAL:
            return True
        rec = rep.rec
        return rec.cycle_id is not None or rec.phase in (ItemState.INITIAL_REPLICATION,
                                                         ItemState.RESYNCING)


class ItemEngines:
    """Builds the engines of one agent's items (``DATA/items/`` holds their records).

    ``on_progress(item_id, report)`` is each engine's progress callback (it may raise to
    interrupt the work); ``target_factory`` replaces how a recovery target is built from a
    ``store_url`` (tests)."""

    def __init__(self, data_dir: Path, hypervisor: HypervisorDriver, ctx: ssl.SSLContext, *,
                 on_progress: Callable[[str, ItemReport], None],
                 target_factory: TargetFactory | None = None) -> None:
        self.data_dir = data_dir
        self.hypervisor = hypervisor
        self.state_dir = data_dir / "items"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise classify_os_error(e, f"agent data directory {data_dir}") from e
        self._ctx = ctx
        self._on_progress = on_progress
        self._target_factory = target_factory or self._site_target
        self._lock = threading.Lock()
        self._site_stores: dict[str, SiteObjectStore] = {}
        self._catalogue_stores: dict[str, SiteObjectStore] = {}

    def _site_target(self, store_url: str, item_id: str) -> RecoveryTarget:
        with self._lock:
            store = self._site_stores.get(store_url)
            if store is None:
                store = self._site_stores[store_url] = SiteObjectStore(store_url, self._ctx)
        # the store agent hydrates while the next cycle ships (its loop follows points too)
        target: RecoveryTarget = SiteTarget(store, item_id, **SITE_TARGET_OPTIONS)
        return target

    def _catalogue_store(self, store_url: str, target: RecoveryTarget) -> ObjectStore:
        """The store the heartbeat's catalogue lists: for a site store, a client of its own
        with short timeouts (listing is small; a hung peer must be noticed in seconds)."""
        if self._target_factory != self._site_target or not store_url.startswith("https://"):
            return target.repo.store
        with self._lock:
            store = self._catalogue_stores.get(store_url)
            if store is None:
                store = self._catalogue_stores[store_url] = SiteObjectStore(
                    store_url, self._ctx, timeout=CATALOGUE_TIMEOUT_S)
        return store

    def open(self, entry: ItemEntry, catalogues: CatalogueRefresher) -> Item:
        """Build the engine of one item from its entry (errors are kept in the item) and have
        ``catalogues`` list its points."""
        try:
            if cloudstores.is_cloud(entry.store_url):  # spec from its 0600 file
                target = cloudstores.cloud_target(
                    cloudstores.load_spec(self.data_dir, entry.item_id), entry.item_id)
            else:
                target = self._target_factory(entry.store_url, entry.item_id)
            target.repo.auth = pointkeys.load_auth(self.data_dir, entry.item_id)
            replicator = ItemReplicator(
                item_id=entry.item_id, vm_id=entry.vm_id, driver=self.hypervisor, target=target,
                state_dir=self.state_dir, settings=settings_from_args(entry.settings),
                on_progress=functools.partial(self._on_progress, entry.item_id),
                generation=entry.generation)
            catalog = Repository(self._catalogue_store(entry.store_url, target), entry.item_id,
                                 auth=target.repo.auth)
            catalogues.track(entry.item_id, entry.store_url, catalog.points)
            return Item(entry, replicator, catalog)
        except DrsiteError as e:
            log.error("item %s cannot be opened (%s): %s", entry.item_id, e.error_class.value, e)
            return Item(entry, None, None, e)

    def close(self, item: Item, catalogues: CatalogueRefresher) -> None:
        catalogues.untrack(item.entry.item_id)
        if item.catalog is not None:
            item.catalog.close()
        if item.replicator is not None:
            item.replicator.target.repo.close()

    def close_stores(self) -> None:
        """Close the store clients (at shutdown, after every item was closed)."""
        for st in [*self._site_stores.values(), *self._catalogue_stores.values()]:
            with contextlib.suppress(Exception):
                st.close()
