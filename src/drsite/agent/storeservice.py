"""The recovery store a secondary-site agent serves to primary agents, and its hydration loop.

The store server is :func:`drsite.sitestore.make_store_app` over a
:class:`~drsite.store.local.backend.LocalObjectStore`, served over HTTPS with a client
certificate *required* (any certificate signed by the vault's CA: primary agents), presenting
this agent's own certificate (it carries serverAuth). The hydration loop keeps every item's
replica (``replicas/<item_id>/``) at the latest committed point even when no primary asks for a
catch-up (a primary that died after committing, a commit whose catch-up call failed). The
loop asks its own server for each catch-up (over HTTPS, with this agent's certificate), so it
takes the server's per-item lock and never races a primary's catch-up or digest request.

Every request is decided by the store's access list (:class:`~drsite.sitestore.acl.StoreAcl`,
``DATA/store-acl.json``, 0600), which the vault sends in heartbeat replies
(``agent/storeacl.py``); before the first list arrives the server refuses everything (the
hydration loop included: its own host is allowed only by the list). Deletes and overwrites go
to :attr:`StoreService.audit`, which the heartbeat drains.

Responsible for: starting/stopping the server and the loop, and the loop's error handling.
Not responsible for: the store protocol (``sitestore``) or the replica format
(:class:`~drsite.store.replica.ReplicaHydrator`).
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path

from drsite import tlsutil
from drsite.agent.recoverybook import RecoveryBook
from drsite.agent.registration import AgentIdentity
from drsite.core.errors import DrsiteError, InvalidInput, InvalidReplicaState, classify_os_error
from drsite.fsutil import atomic_write_json, named_subdirs, read_json
from drsite.sitestore import SiteObjectStore, make_store_app
from drsite.sitestore.acl import ACL_FILE, StoreAcl
from drsite.sitestore.audit import StoreAuditLog
from drsite.sitestore.server import replica_held, replica_lock
from drsite.sitestore.syncoverlay import ROTATE_BYTES, OverlayServer
from drsite.sitestore.syncserver import SyncServer, journals_dir
from drsite.store.catalog import MapCache
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator, VerifyProgress, proven_current
from drsite.store.repository import Repository
from drsite.tracking.syncjournal import journal_state, outlived

log = logging.getLogger(__name__)

HYDRATE_EVERY_S = 2.0
# seconds a hydration pass spends verifying replicas at most (the rest waits for the next)
VERIFY_BUDGET_S = 2.0
# a replica proven current is compared in full again after this long (damage to its images
# in ranges no cycle rewrote is found before a failover needs it)
FULL_REPROOF_S = 24 * 3600.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8444"`` / ``"localhost:0"`` / ``"[::1]:8444"`` → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise InvalidInput(f"store listen address {listen!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise InvalidInput(f"store listen port {port!r} is not a number") from None
    if not 0 <= p < 65536:
        raise InvalidInput(f"store listen port {p} is out of range")
    return host, p


class StoreService:
    """A secondary agent's store server plus its replica hydration loop."""

    def __init__(self, identity: AgentIdentity, store_dir: Path, replicas_dir: Path,
                 listen: str, *, hydrate_every_s: float = HYDRATE_EVERY_S,
                 acl_file: Path | None = None, overlay_rotate_bytes: int = ROTATE_BYTES) -> None:
        self.identity = identity
        self.store_dir = Path(store_dir)
        self.replicas_dir = Path(replicas_dir)
        self.host, self.port = parse_listen(listen)
        self.hydrate_every_s = hydrate_every_s
        self._store = LocalObjectStore(self.store_dir)
        # segment maps stored here or verified by a catch-up serve a failover's verification
        # warm (a failover of a 100 GiB disk with scattered data loaded 1,265–1,543 maps
        # cold; a replica written from the shipping stream is read by no catch-up); scrub
        # reads the store itself
        self.map_cache = MapCache()
        # the vault's access list, persisted beside the replicas (the agent's data directory)
        self.acl = StoreAcl(acl_file or self.replicas_dir.parent / ACL_FILE)
        self.audit = StoreAuditLog()
        self._server: tlsutil.ServerHandle | None = None
        # synchronous mode's journals (DATA/sync-journals/<item>/), served beside the store
        self.sync: SyncServer | None = None
        # synchronous QEMU VMs' overlays (DATA/sync-overlays/<item>/<run>/), NBD beside the store
        self.overlays = OverlayServer(self.replicas_dir.parent / "sync-overlays",
                                      identity.ca_file, identity.cert_file, identity.key_file,
                                      host=self.host or "127.0.0.1",
                                      rotate_bytes=overlay_rotate_bytes)
        # the recovery book (the daemon's): which items' sync journals to keep
        self.book: RecoveryBook | None = None
        self._self_client: SiteObjectStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, str] = {}   # item → last hydration error logged (no log floods)
        # item → its replica's background verification under way (ReplicaHydrator.verify_step)
        self._verifying: dict[str, VerifyProgress] = {}
        self._verify_next = 0   # where the next verification pass starts (round robin)

    @property
    def local_store(self) -> LocalObjectStore:
        """The store this service serves (failover on this host reads it directly)."""
        return self._store

    @property
    def url(self) -> str:
        """The store's URL as primary agents reach it (valid once started)."""
        if self._server is None:
            raise InvalidInput("the store server is not running")
        return self._server.url

    def start(self) -> str:
        """Start serving and hydrating; returns the store URL."""
        try:
            self.replicas_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise classify_os_error(e, f"replica directory {self.replicas_dir}") from e
        self.sync = self._start_sync()
        self.overlays.sweep()   # removals a crash interrupted
        app = make_store_app(self._store, self.replicas_dir, acl=self.acl, audit=self.audit,
                             sync_port=self.sync.port, overlays=self.overlays,
                             map_cache=self.map_cache)
        self._server = tlsutil.start_in_thread(
            app, host=self.host, port=self.port, certfile=self.identity.cert_file,
            keyfile=self.identity.key_file, cafile=self.identity.ca_file, client_cert="required")
        log.info("recovery store %s served at %s", self.store_dir, self._server.url)
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        self._self_client = SiteObjectStore(f"https://{host}:{self._server.port}",
                                            self.identity.client_context())
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="agent-hydrate", daemon=True)
        self._thread.start()
        return self._server.url

    def _start_sync(self) -> SyncServer:
        """The sync-journal server, on the port it had before a restart when that is free
        (``sync-journals/port.json``): the guests of primary hosts keep its address."""
        ident = self.identity
        journals = journals_dir(self.replicas_dir.parent)
        ctx = tlsutil.server_context(ident.cert_file, ident.key_file, ident.ca_file,
                                     client_cert="required")
        host = self.host or "127.0.0.1"
        try:
            old = int((read_json(journals / "port.json") or {}).get("port") or 0)
        except (OSError, ValueError, AttributeError):
            old = 0
        try:
            srv = SyncServer(journals, self.replicas_dir, ctx, self.acl, host=host, port=old,
                             latest_point=self._latest_point_id)
        except OSError:
            log.warning("sync-journal port %d is taken; primaries will be told a new one", old)
            srv = SyncServer(journals, self.replicas_dir, ctx, self.acl, host=host,
                             latest_point=self._latest_point_id)
        srv.start()
        srv.sweep()
        if srv.port != old:
            atomic_write_json(journals / "port.json", {"port": srv.port})
        return srv

    def stop(self) -> None:
        """Stop the loop (after the catch-up in progress) and the server. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60.0)
            self._thread = None
        if self._self_client is not None:
            self._self_client.close()
            self._self_client = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        self.overlays.stop()

    def item_ids(self) -> list[str]:
        """Items that have a repository in the store."""
        return named_subdirs(self.store_dir / "items", "item",
                             f"recovery store {self.store_dir}")

    def hydrate_once(self) -> dict[str, list[str]]:
        """One pass: catch every item's replica up; returns the points applied per item."""
        client = self._self_client
        if client is None:
            raise InvalidInput("the store server is not running")
        applied: dict[str, list[str]] = {}
        try:
            self.drop_journals()
        except DrsiteError as e:
            log.warning("deleting sync journals failed: %s", e)
        try:
            self.drop_overlays()
        except DrsiteError as e:
            log.warning("deleting sync overlays failed: %s", e)
        for item_id in self.overlays.items():
            try:   # a long run's overlay past the threshold gets a new layer
                self.overlays.rotate(item_id, self._latest_point_id)
            except DrsiteError as e:
                log.warning("rotating the sync overlay of %s failed: %s", item_id, e)
        for item_id in self.item_ids():
            if self._stop.is_set():
                break
            try:
                self._trim_journal(item_id)
                if replica_held(self.replicas_dir, item_id) or self._up_to_date(item_id):
                    continue
                done = client.catch_up(item_id)
                if done:
                    log.info("replica of %s hydrated to %s", item_id, done[-1])
                    applied[item_id] = done
                if self._errors.pop(item_id, None) is not None:
                    log.info("replica of %s hydrates again", item_id)
            except DrsiteError as e:
                if self._errors.get(item_id) != str(e):
                    log.warning("hydrating the replica of %s failed (%s): %s", item_id,
                                e.error_class.value, e)
                    self._errors[item_id] = str(e)
        self.verify_replicas()
        return applied

    def verify_replicas(self, budget_s: float = VERIFY_BUDGET_S) -> None:
        """Advance the replicas' background verification (``ReplicaHydrator.verify_step``)
        for at most ``budget_s`` seconds in all, item after item (round robin across passes:
        a long one does not starve the others), so that a failover finds the point it boots
        already proven equal to its store copy and compares nothing; every ``FULL_REPROOF_S``
        a replica is compared in full again. A replica found to differ is forgotten (the
        next pass rebuilds it) and logged; other failures are logged once per new error."""
        items = self.item_ids()
        if not items:
            return
        start = self._verify_next % len(items)
        deadline = time.monotonic() + budget_s
        for k, item_id in enumerate(items[start:] + items[:start]):
            left = deadline - time.monotonic()
            if self._stop.is_set() or left <= 0:
                self._verify_next = start + k
                break
            replica_dir = self.replicas_dir / item_id
            if replica_held(self.replicas_dir, item_id) or not replica_dir.is_dir():
                self._verifying.pop(item_id, None)
                continue
            if item_id not in self._verifying and proven_current(replica_dir, FULL_REPROOF_S):
                continue
            repo = Repository(self._store, item_id, auth=self.acl.point_auth(item_id),
                              map_cache=self.map_cache)
            try:
                h = ReplicaHydrator(repo, replica_dir)
                progress = h.verify_step(partial(replica_lock, replica_dir),
                                         self._verifying.get(item_id), budget_s=left,
                                         full_every_s=FULL_REPROOF_S)
                if progress is None:
                    self._verifying.pop(item_id, None)
                else:
                    self._verifying[item_id] = progress
            except InvalidReplicaState as e:
                self._verifying.pop(item_id, None)
                log.error("replica of %s: %s", item_id, e)
            except DrsiteError as e:
                self._verifying.pop(item_id, None)
                if self._errors.get(f"verify:{item_id}") != str(e):   # once per new error
                    log.warning("verifying the replica of %s failed (%s): %s", item_id,
                                e.error_class.value, e)
                    self._errors[f"verify:{item_id}"] = str(e)
            else:
                self._errors.pop(f"verify:{item_id}", None)
            finally:
                repo.close()

    def _latest_point_id(self, item_id: str) -> str | None:
        """The item's newest point in the store, by its listing (not authenticated: what a
        journal run records as begun after, so a forged newer id only keeps it longer)."""
        keys = list(self._store.list(f"items/{item_id}/points/"))
        return keys[-1].rsplit("/", 1)[-1] if keys else None   # p%012d: sorted = seq order

    def drop_journals(self) -> list[str]:
        """Delete the sync journals no failover can need any more; the items whose journal
        went. A journal goes when the recovery book lists the journals to keep
        (``sync_journals``: the items of this store that are protected, being taken apart, or
        in a failover not committed) and its item is not among them — unprotected, failed
        over and committed, re-protected (a reverse item has an id, and a journal, of its
        own). Without such a book (none yet, or an older vault) nothing goes here; the
        asynchronous case is :meth:`_trim_journal`'s. Also finishes interrupted removals."""
        sync, book = self.sync, self.book
        if sync is None:
            return []
        sync.sweep()
        keep = (book.doc or {}).get("sync_journals") if book is not None else None
        if not isinstance(keep, list):
            return []
        kept = set(keep)
        gone = [i for i in sync.journal_items() if i not in kept]
        for item_id in gone:
            sync.drop(item_id)
            log.info("sync journal of %s deleted: the vault no longer protects the item to "
                     "this site", item_id)
        return gone

    def drop_overlays(self) -> list[str]:
        """Delete the sync overlays (daemon, files) of the items whose sync state ended on
        this site, by the journals' rule (:meth:`drop_journals`: not in the recovery book's
        ``sync_journals``; none without such a book). A failover not committed keeps its
        item in the list; the held marker a real failover leaves on the replica does not
        count (it stays after the commit). Each deletion is audited. Also finishes
        interrupted removals. The items whose overlays went."""
        book = self.book
        self.overlays.sweep()
        keep = (book.doc or {}).get("sync_journals") if book is not None else None
        if not isinstance(keep, list):
            return []
        kept = set(keep)
        gone = []
        for item_id in self.overlays.items():
            if item_id in kept:
                continue
            if self.overlays.drop(item_id):
                gone.append(item_id)
                self.audit.record("delete", f"sync-overlays/{item_id}", item_id,
                                  self.identity.host_id, "ok")
                log.info("sync overlays of %s deleted (daemon stopped, files removed): the "
                         "vault no longer protects the item to this site", item_id)
        return gone

    def _trim_journal(self, item_id: str) -> None:
        """Drop the sync journal's segments, and the sync overlays of runs older than its run,
        that the item's latest (authentic) point covers; the whole journal once that point was
        sealed after the journal's mirror ended (``syncjournal.outlived``: the item went
        asynchronous), and likewise a sync overlay run it outlived (``drop_outlived``); and the
        layers of a rotated overlay that the latest point was sealed after (``retire``: the
        point before it committed after their successor's switch)."""
        sync = self.sync
        if sync is None or replica_held(self.replicas_dir, item_id) or \
                not (sync.has_journal(item_id) or self.overlays.item_dir(item_id).is_dir()):
            return
        repo = Repository(self._store, item_id)
        auth = self.acl.point_auth(item_id)
        if auth is None:
            return  # no point key: nothing proves the point is the writer's
        repo.auth = auth
        latest = repo.latest()
        mark = (latest.meta.get("sync") if latest is not None else None) or {}
        if mark and self.overlays.trim(item_id, str(mark.get("stream"))):
            log.info("sync overlays of %s older than point %s's run dropped", item_id,
                     latest.point_id if latest else "?")
        if latest is not None and self.overlays.item_dir(item_id).is_dir():
            if mark.get("stream"):
                self.overlays.note_marked(item_id, str(mark["stream"]), latest.point_id)
            if self.overlays.drop_outlived(item_id, latest.point_id, mark.get("stream")):
                log.info("sync overlays of %s deleted: point %s was sealed after their mirror "
                         "ended", item_id, latest.point_id)
            ids = repo.point_ids()
            prev = ids[-2] if len(ids) > 1 and ids[-1] == latest.point_id else None
            if prev is not None:
                try:
                    repo.point(prev)   # authentic too
                except DrsiteError as e:
                    log.debug("sync overlay layers of %s kept: point %s: %s", item_id, prev, e)
                    prev = None
            self.overlays.retire(item_id, latest.point_id, prev)
        if not sync.has_journal(item_id):
            return
        if latest is not None and outlived(journal_state(sync.journals / item_id),
                                           latest.point_id, mark):
            sync.drop(item_id)
            log.info("sync journal of %s deleted: point %s was sealed after its mirror "
                     "ended (asynchronous mode)", item_id, latest.point_id)
            return
        if mark:
            n = sync.journal(item_id).trim(str(mark.get("stream")), int(mark.get("seq", -1)))
            if n:
                log.info("sync journal of %s: %d segment(s) covered by point %s dropped",
                         item_id, n, latest.point_id if latest else "?")

    def _up_to_date(self, item_id: str) -> bool:
        """The replica holds the latest point (read from local files: no request, no lock)."""
        keys = list(self._store.list(f"items/{item_id}/points/"))
        if not keys:
            return True
        latest = keys[-1].rsplit("/", 1)[-1]   # p%012d: sorted order is sequence order
        held, applying = ReplicaHydrator(Repository(self._store, item_id),
                                         self.replicas_dir / item_id).state()
        return applying is None and held == latest

    def _loop(self) -> None:
        while not self._stop.wait(self.hydrate_every_s):
            try:
                self.hydrate_once()
            except DrsiteError as e:
                log.warning("hydration pass failed: %s", e)
            except Exception:
                log.exception("hydration pass failed unexpectedly")
