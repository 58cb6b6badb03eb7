"""The host agent daemon: heartbeat, command execution, replication of this host's items.

One loop (the caller's thread, :meth:`Agent.run`) sends a heartbeat every ``heartbeat_interval``
seconds over mTLS — inventory, one report per item, the item's new and removed recovery points —
and hands the commands of the reply to a small pool of workers: one command at a time per item,
up to ``max_parallel_items`` items at once. Each command's result (and ``running`` progress
while it runs) is posted to ``/commands/{id}/result``.

What the agent decides on its own (see ``design.md``): nothing but (1) resuming its own
interrupted work after a restart — an initial copy, a sealed cycle or a resync that a crash cut
short — and (2) while the vault has been unreachable for ``offline_after_s``, keeping the items
it was told to protect replicating by their own settings (frequency, retry schedule, resync
window), so that an outage of the control plane does not stop data protection.

:class:`Agent` wires the parts, each in a module of its own behind a Protocol of what it needs
of the agent: the command intake, journal and per-item lanes (:mod:`~drsite.agent.lanes`),
the heartbeat (:mod:`~drsite.agent.heartbeat`), item engines (:mod:`~drsite.agent.items`), the
command handlers (:mod:`~drsite.agent.protection`, ``failover``, ``barrier``, ``scrub``,
``drill``, ``vms``). It keeps the item table (``items.json`` and the open engines, under its
lock, which the lanes and the heartbeat share), fencing, and the loop with its offline mode.

Idempotency: a command id runs at most once (:mod:`~drsite.agent.lanes`); a ``cycle`` or
``resync`` that completed just before a crash is recognised from the point sequence recorded
when it started, so it is not run twice (:mod:`~drsite.agent.protection`).

Responsible for: the loop, wiring, restart behaviour, the item table and its file.
Not responsible for: replication mechanics (:class:`~drsite.replication.driver.ItemReplicator`),
the store protocol (``sitestore``), scheduling (the vault's scheduler).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from drsite.agent import barrier as barriers
from drsite.agent import storerekey
from drsite.agent.drill import DrillCommands
from drsite.agent.failover import FailoverCommands
from drsite.agent.heartbeat import Heartbeats, inventory
from drsite.agent.items import Item, ItemEngines, TargetFactory
from drsite.agent.lanes import CommandLanes, Interrupted, Task
from drsite.agent.link import Command, HeartbeatReply, VaultLink
from drsite.agent.peers import Catalogue, CatalogueRefresher
from drsite.agent.protection import KINDS as PROTECTION_KINDS
from drsite.agent.protection import ProtectionCommands
from drsite.agent.recoverybook import BOOK_FILE, RecoveryBook
from drsite.agent.registration import AgentIdentity
from drsite.agent.scrub import ScrubCommands
from drsite.agent.state import (
    CommandJournal,
    ItemEntry,
    ItemPhase,
    ItemsFile,
)
from drsite.agent.storeservice import StoreService
from drsite.agent.vms import VmCommands
from drsite.core.errors import (
    AuthError,
    DrsiteError,
    Fenced,
    InvalidInput,
    NotFound,
    VmNotFound,
)
from drsite.core.model import PowerState
from drsite.hypervisors.contract import HypervisorDriver
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemReport
from drsite.sitestore.syncoverlay import ROTATE_BYTES
from drsite.store.format import PointInfo

log = logging.getLogger(__name__)

# heartbeats asked for early (beat_soon) stay at least this far apart (or a quarter of the
# interval, if shorter): a burst of wake-ups is one heartbeat, never a storm
SOON_GAP_S = 0.5


class Agent:
    """The daemon of one host. See the module docstring for what it does and decides.

    ``hypervisor``: the host's driver. ``store_dir`` + ``store_listen``: this host serves a
    recovery store (a secondary site). ``import_dir``: where ``vm_import`` may read disk images
    (none: imports are refused). ``transport`` replaces the network to the vault (tests);
    ``target_factory`` replaces how an item's recovery target is built from its ``store_url``.
    """

    def __init__(self, data_dir: Path, *, hypervisor: HypervisorDriver,
                 heartbeat_interval: float = 2.0, store_dir: Path | None = None,
                 import_dir: Path | None = None,
                 store_listen: str | None = None, offline_after_s: float = 30.0,
                 max_backoff_s: float = 30.0, max_parallel_items: int = 2,
                 transport: httpx.BaseTransport | None = None,
                 target_factory: TargetFactory | None = None,
                 command_channel: bool = True, store_url: str | None = None,
                 vault_urls: list[str] | None = None,
                 overlay_rotate_bytes: int = ROTATE_BYTES) -> None:
        if (store_dir is None) != (store_listen is None):
            raise InvalidInput("a store server needs both store_dir and store_listen")
        if store_url is not None and not store_url.startswith("https://"):
            raise InvalidInput(f"store URL {store_url!r} is not an https:// URL")
        if heartbeat_interval <= 0:
            raise InvalidInput(f"heartbeat interval must be positive, not {heartbeat_interval}")
        self.data_dir = Path(data_dir)
        self.hypervisor = hypervisor
        self.heartbeat_interval = heartbeat_interval
        self.soon_gap_s = min(SOON_GAP_S, heartbeat_interval / 4)
        self.offline_after_s = offline_after_s
        self.max_backoff_s = max(max_backoff_s, heartbeat_interval)
        self.identity = AgentIdentity.load(self.data_dir)
        self._ctx: ssl.SSLContext = self.identity.client_context()
        # a vault pair: the link follows whichever vault is active (agent/link.py)
        self.link = VaultLink(vault_urls or self.identity.vault_urls, self._ctx,
                              transport=transport)
        self.engines = ItemEngines(self.data_dir, hypervisor, self._ctx,
                                   on_progress=self._on_progress, target_factory=target_factory)
        self._items_file = ItemsFile(self.data_dir / "items.json")
        self._journal = CommandJournal(self.data_dir / "commands.json")
        self._entries = self._items_file.load()
        self._items: dict[str, Item] = {}
        # the items' recovery points, listed off the control loop (one thread per peer)
        self._catalogues = CatalogueRefresher(heartbeat_interval)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        # set to heartbeat at once (the vault is back: end the backoff; or stop)
        self._wake = threading.Event()
        self._store: StoreService | None = None
        if store_dir is not None and store_listen is not None:
            self._store = StoreService(self.identity, store_dir, self.data_dir / "replicas",
                                       store_listen, overlay_rotate_bytes=overlay_rotate_bytes)
        # break-glass: what this store host would need of the vault to fail its items over
        self._book = RecoveryBook(self.data_dir / BOOK_FILE) if self._store is not None else None
        if self._store is not None:
            self._store.book = self._book   # the sync journals to keep
        self._store_url: str | None = None
        self.beats = Heartbeats(self, self._lock, store=self._store, book=self._book)
        self._store_advertised = store_url.rstrip("/") if store_url else None
        self.failover = FailoverCommands(self)
        self.scrubs = ScrubCommands(self)
        self.drills = DrillCommands(self)
        self.barriers = barriers.BarrierCommands(self)
        self.vms = VmCommands(hypervisor, self.data_dir, import_dir)
        self.protection = ProtectionCommands(self)
        self.lanes = CommandLanes(self, self._journal, self._lock, self._stop, max_parallel_items)
        self.command_channel = command_channel
        self._channel: threading.Thread | None = None
        self._started = False
        self._last_ok = time.monotonic()
        self._failures = 0
        self._offline = False

    # ----------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the store server (if any) and the workers, rebuild the persisted items and
        resume their interrupted work. Idempotent; :meth:`run` calls it."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._stop.clear()
            self.beats.started()  # what the vault delivered before this start is lost unless held
            self.lanes.open()
            if self._catalogues.stopped:  # started again after a shutdown
                self._catalogues = CatalogueRefresher(self.heartbeat_interval)
        if self._store is not None:
            self._store_url = self._store.start()
            if self._store_advertised is not None:
                self._store_url = self._store_advertised
        log.info("agent %s (%s, site %s) starting; vault %s; %d item(s)", self.identity.host_id,
                 self.identity.host_name, self.identity.site, " or ".join(self.link.vault_urls),
                 len(self._entries))
        for entry in sorted(self._entries.values(), key=lambda e: e.item_id):
            item = self._open_item(entry)
            with self._lock:
                self._items[entry.item_id] = item
            if item.needs_resume():
                log.info("item %s: resuming interrupted work after a restart", entry.item_id)
                self.lanes.enqueue(entry.item_id, Task("resume"))
        self.lanes.resume_accepted()
        if self.command_channel and (self._channel is None or not self._channel.is_alive()):
            self._channel = threading.Thread(target=self.lanes.channel_loop, daemon=True,
                                             name="agent-commands")
            self._channel.start()

    def run(self) -> None:
        """Run until :meth:`stop`: heartbeats, commands, results. Blocking."""
        self.start()
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                delay = self.tick()
                if self._wake.wait(delay):
                    # woken early (beat_soon, vault_back): beats stay SOON_GAP_S apart, so a
                    # burst of wake-ups is one heartbeat
                    self._stop.wait(max(0.0, began + self.soon_gap_s - time.monotonic()))
                self._wake.clear()
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler or another thread)."""
        self._stop.set()
        self._wake.set()

    def vault_back(self) -> None:
        """The command channel reached the vault again: while heartbeats are failing, send
        the next one now instead of at the end of its backoff (which grows to
        ``max_backoff_s``), so results held meanwhile are posted and a job waiting on them goes
        on within a second of the vault's return."""
        if self._failures:
            self._wake.set()

    def beat_soon(self) -> None:
        """Heartbeat now rather than at the end of the interval (at most one every
        ``soon_gap_s``): the vault asked for one on the command channel (a job waits for a
        store access list to be confirmed or a point to reach its catalogue). Ignored while
        heartbeats fail (their backoff stands; :meth:`vault_back` ends it)."""
        if not self._failures:
            self._wake.set()

    def shutdown(self) -> None:
        """Interrupt running work (it resumes after the restart), stop the workers, the store
        server and the vault connection. Commands interrupted here are not reported failed:
        the vault re-sends them and the restarted agent resumes them."""
        self._stop.set()
        self.lanes.close()
        self._catalogues.stop()
        if self._store is not None:
            self._store.stop()
        with self._lock:
            for item in self._items.values():
                self._close_item(item)
            self._started = False
        self.link.close()
        self.engines.close_stores()
        log.info("agent %s stopped", self.identity.host_id)

    def wait_idle(self, timeout: float) -> bool:
        """True once no task is queued or running (tests, orderly shutdown)."""
        return self.lanes.wait_idle(timeout)

    def tick(self) -> float:
        """One iteration of :meth:`run`: a heartbeat (errors logged, backed off) and, when the
        vault has been unreachable for long, the items' own schedule. Returns the delay until
        the next tick."""
        try:
            self.heartbeat_once()
        except DrsiteError as e:
            self._failures += 1
            delay = min(self.max_backoff_s,
                        self.heartbeat_interval * 2.0 ** min(self._failures - 1, 8))
            what = "refused by" if isinstance(e, AuthError) else "cannot reach"
            if self._failures == 1:
                log.warning("heartbeat failed: %s the vault at %s (%s): %s; retrying in %.1f s",
                            what, self.link.vault_url, e.error_class.value, e, delay)
            else:
                log.info("heartbeat failed %d times in a row (%s); retrying in %.1f s",
                         self._failures, e, delay)
            if isinstance(e, AuthError):
                log.error("the vault refuses this host's certificate: is host %s still "
                          "registered? (%s)", self.identity.host_id, e.hint)
            self._offline_step()
            return delay
        if self._failures:
            log.info("vault at %s reachable again after %d failed heartbeat(s)",
                     self.link.vault_url, self._failures)
        if self._offline:
            log.info("leaving offline mode: the vault's scheduler drives replication again")
        self._failures = 0
        self._offline = False
        self._last_ok = time.monotonic()
        return self.heartbeat_interval

    def _offline_step(self) -> None:
        """The vault has been away for ``offline_after_s``: run each idle item's own next step
        when due (frequency, retry schedule, resync window from its last settings)."""
        if time.monotonic() - self._last_ok < self.offline_after_s:
            return
        if not self._offline:
            log.warning("vault unreachable for %.0f s: replicating the %d protected item(s) "
                        "on their own schedule until it is back",
                        time.monotonic() - self._last_ok, len(self._items))
            self._offline = True
        with self._lock:
            items = [it for it in self._items.values()
                     if it.replicator is not None and it.entry.phase == ItemPhase.PROTECTED]
            for it in items:
                if not self.lanes.idle(it.entry.item_id):
                    continue
                assert it.replicator is not None
                if it.replicator.next_due() <= time.time():  # next_due first: it reads the clock
                    self.lanes.enqueue(it.entry.item_id, Task("auto"))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------- item table
    # ``_entries``: items.json; ``_items``: their open engines; both under ``_lock``

    def live_item(self, cmd: Command) -> tuple[Item, ItemReplicator]:
        """The item a command names, with its engine (``NotFound`` if not protected here)."""
        with self._lock:
            item = self._items.get(cmd.item_id)
        if item is None:
            raise NotFound(f"item {cmd.item_id} is not protected on host "
                           f"{self.identity.host_id}",
                           hint="Enable protection again (the agent has no record of it).")
        if item.replicator is None:
            item = self.reopen(cmd.item_id) or item
            if item.replicator is None:
                assert item.error is not None
                raise item.error
        return item, item.replicator

    def lookup(self, item_id: str) -> tuple[Item | None, ItemEntry | None]:
        with self._lock:
            return self._items.get(item_id), self._entries.get(item_id)

    def open_items(self) -> list[Item]:
        with self._lock:
            return list(self._items.values())

    def has_item(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self._items

    def record_entry(self, entry: ItemEntry) -> None:
        with self._lock:
            self._entries[entry.item_id] = entry
        self.save_entries()

    def save_entries(self) -> None:
        with self._lock:
            entries = dict(self._entries)
        self._items_file.save(entries)

    def rebuild_item(self, entry: ItemEntry, old: Item | None) -> Item:
        if old is not None:
            self._close_item(old)
        item = self._open_item(entry)
        with self._lock:
            self._items[entry.item_id] = item
        return item

    def reopen(self, item_id: str) -> Item | None:
        """Rebuild an item's engine from its files (after its work was interrupted)."""
        with self._lock:
            old = self._items.get(item_id)
            entry = self._entries.get(item_id)
        if entry is None:
            return None
        if old is not None:
            self._close_item(old)
        item = self._open_item(entry)
        with self._lock:
            self._items[item_id] = item
        return item

    def forget_item(self, item: Item) -> None:
        item_id = item.entry.item_id
        with self._lock:
            self._entries.pop(item_id, None)
            self._items.pop(item_id, None)
            acks = self.beats.drop_acks(item_id)
        self.save_entries()
        if acks is not None:
            self.beats.save_acks(acks)
        self._close_item(item)
        with contextlib.suppress(FileNotFoundError):
            (self.engines.state_dir / f"{item_id}.json").unlink()

    def mark_protected(self, item: Item) -> None:
        if item.entry.phase != ItemPhase.PROTECTED:
            item.entry.phase = ItemPhase.PROTECTED
            self.save_entries()

    def set_generation(self, item_id: str, generation: int) -> None:
        """Persist the item's generation (the split-brain guard its engine checks)."""
        with self._lock:
            entry = self._entries.get(item_id)
            if entry is not None:
                entry.generation = generation
        self.save_entries()

    def set_failed_over(self, item_id: str, failed_over: bool) -> None:
        """Mark an item failed over (a planned failover shut its VM down): offline mode and
        resume-after-restart leave it alone; ``False`` makes it protected again."""
        with self._lock:
            entry = self._entries.get(item_id)
            if entry is None:
                return
            entry.phase = ItemPhase.FAILED_OVER if failed_over else ItemPhase.PROTECTED
        self.save_entries()

    def _open_item(self, entry: ItemEntry) -> Item:
        return self.engines.open(entry, self._catalogues)

    def _close_item(self, item: Item) -> None:
        self.engines.close(item, self._catalogues)

    def _on_progress(self, item_id: str, report: ItemReport) -> None:
        if self._stop.is_set() or self.lanes.cancelled(item_id):
            raise Interrupted(f"work on {item_id} interrupted")

    def engine_progress(self, item_id: str) -> float | None:
        item = self._items.get(item_id)
        if item is None or item.replicator is None:
            return None
        return float(item.replicator.report.progress)

    def latest_seq(self, item_id: str) -> int | None:
        item = self._items.get(item_id)
        if item is None or item.replicator is None:
            return None
        try:
            latest = item.replicator.target.repo.latest()
        except DrsiteError:
            return None
        return latest.seq if latest is not None else 0

    # ----------------------------------------------------------------------------- fencing

    def fence_item(self, item_id: str, reason: str) -> dict[str, Any]:
        """This host is no longer the item's primary (a failover promoted the recovery site):
        power its VM off so that the old primary never writes beside the recovery VM, stop
        replicating it (phase ``failed_over``: offline mode and resume leave it alone), and
        remember whether it was running (a cancel powers it on again). Idempotent."""
        with self._lock:
            entry = self._entries.get(item_id)
        if entry is None:
            return {"fenced": False, "note": "the item is not protected on this host"}
        was_running = False
        power = "absent"
        try:
            vm = self.hypervisor.get_vm(entry.vm_id)
            if vm.power is not PowerState.STOPPED:
                was_running = True
                log.warning("item %s: %s; powering VM %s off (fencing the old primary)",
                            item_id, reason, vm.name)
                self.hypervisor.power_off(entry.vm_id, force=True, timeout=10.0)
            power = self.hypervisor.get_vm(entry.vm_id).power.value
        except VmNotFound:
            pass
        with self._lock:
            first = not entry.fenced
            entry.fenced = True
            entry.fenced_running = entry.fenced_running or was_running
            entry.phase = ItemPhase.FAILED_OVER
        if first or was_running:
            self.save_entries()
        return {"fenced": True, "vm_power": power, "was_running": was_running,
                "reason": reason}

    def unfence_item(self, item_id: str) -> bool:
        """A cancelled failover hands the item back: clear the fence; True when the VM was
        running when this host fenced it (the caller powers it on again)."""
        with self._lock:
            entry = self._entries.get(item_id)
            if entry is None or not entry.fenced:
                return False
            was_running = entry.fenced_running
            entry.fenced = entry.fenced_running = False
        self.save_entries()
        return was_running

    def fence_on_own(self, item_id: str, e: Fenced) -> None:
        """The store's generation record says another site was promoted: fence at once, without
        waiting for the vault (which may be unreachable) — the second way an old primary learns
        it was failed over (the first is the vault's ``failover_fence``)."""
        try:
            self.fence_item(item_id, f"the recovery store names a newer primary ({e.message})")
        except DrsiteError as err:
            log.error("item %s: fencing the old primary failed: %s", item_id, err)

    # ----------------------------------------------------------------------------- host surface
    # what the lanes, the heartbeat and the command handlers ask of the agent (their Protocols)

    @property
    def store_service(self) -> StoreService | None:
        """This host's recovery store service (secondary sites), if any."""
        return self._store

    @property
    def store_url(self) -> str | None:
        """The URL of this host's recovery store (secondary agents, once started)."""
        return self._store_url

    @property
    def max_parallel_items(self) -> int:
        return self.lanes.max_parallel_items

    def lane_idle(self, item_id: str) -> bool:
        """No task queued or running in the item's lane."""
        return self.lanes.idle(item_id)

    def lane_waiting(self, item_id: str) -> bool:
        """True while a task waits in the item's lane (a long scrub yields to it)."""
        return self.lanes.waiting(item_id)

    def held_commands(self) -> list[str]:
        """Ids of the commands this agent holds (:meth:`CommandLanes.held_commands`)."""
        return self.lanes.held_commands()

    def note_started(self, cmd: Command, **facts: Any) -> None:
        self._journal.start(cmd.command_id, kind=cmd.kind, item_id=cmd.item_id, **facts)

    def started_facts(self, command_id: str) -> dict[str, Any] | None:
        return self._journal.started(command_id)

    def already_done(self, cmd: Command, rep: ItemReplicator) -> PointInfo | None:
        """The point the command's cycle committed before a restart cut off its result."""
        return self.protection.already_done(cmd, rep, None)

    def run_own(self, item_id: str, kind: str) -> None:
        """The agent's own work on an item (:meth:`ProtectionCommands.run_own`)."""
        self.protection.run_own(item_id, kind)

    def catalogue(self, item_id: str) -> Catalogue:
        return self._catalogues.get(item_id)

    def refresh_catalogue(self, item_id: str) -> None:
        self._catalogues.refresh(item_id)  # new points reach the next heartbeat

    def reports(self) -> dict[str, dict[str, Any]]:
        """The report of every item this host protects (what the heartbeat carries)."""
        return self.beats.reports()

    def _inventory(self) -> list[dict[str, Any]]:
        """The VMs the heartbeat reports (:func:`drsite.agent.heartbeat.inventory`)."""
        return inventory(self.hypervisor, self.data_dir, self._book)

    def heartbeat_once(self) -> HeartbeatReply:
        """One heartbeat (:meth:`Heartbeats.once`): send, apply the ack, accept the commands,
        post pending results and progress. Raises ``NetworkError`` (vault unreachable),
        ``AuthError`` and the like."""
        return self.beats.once()

    # ----------------------------------------------------------------------------- commands

    def handle_command(self, cmd: Command) -> dict[str, Any]:
        """Run one command to its result, called from its lane (:mod:`drsite.agent.lanes`)."""
        handler = {**dict.fromkeys(PROTECTION_KINDS, self.protection.handle),
                   "store_rekey": self._store_rekey, "scrub": self.scrubs.handle,
                   "verify": self.scrubs.handle, "drill_probe": self.drills.handle,
                   "group_prepare": self.barriers.prepare,
                   "group_seal": self.barriers.ship,
                   **dict.fromkeys(("vm_create", "vm_import", "vm_start", "vm_stop",
                                    "vm_delete"), self.vms.handle)}.get(cmd.kind)
        if handler is None:
            return self.failover.handle(cmd)  # failover_* commands (agent/failover.py)
        return handler(cmd)

    def _store_rekey(self, cmd: Command) -> dict[str, Any]:
        result = storerekey.run_rekey(self.link, cmd, self._stop)
        if self._stop.is_set():
            raise Interrupted("store rekey interrupted by shutdown")  # resumes when re-sent
        return result
