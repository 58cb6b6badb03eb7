"""Break-glass failover: an unplanned failover run on the recovery site's store agent host when
no vault answers (``drsite agent failover``), from the store's own catalogue.

What it uses, all on this host: the recovery book (``recoverybook``: the item's VM
configuration, sites and network map, the recovery plans), the store's access list (the
item's point key: every point and generation record read must carry a valid MAC, as in a
vault-run failover), the local store, the hydrated replica and, for a synchronous item, its
sync journal (read-only: the agent may still run beside it). It runs the failover library's
``unplanned_failover`` under the replica's lock, so the promotion (generation + 1, written
with the MAC) is in the store *before* the recovery VM starts: the old primary's engine is
fenced from then on, whoever tells it.

A break-glass failover of an item has one id per failover (``bg-…``), kept in
``DATA/breakglass/<item>.json`` (0600) with the point asked for: running it again resumes or
returns the same failover (idempotent), a different point is refused (change it through the
vault once it is back). The record is reported in every heartbeat until the vault
acknowledges it (``breakglass`` / ``breakglass_ack``); the vault then records the failover
(item ``failed_over``, the point used), fences the old primary and schedules nothing for it.

While a vault answers (either of a pair), break-glass is refused (``Conflict``) unless forced:
it would not know of the failover until the next heartbeat and might run its own (a second
VM) or keep the item's replication going.

Responsible for: these local steps and the report queue. Not responsible for: parsing options
(``cli``), the hypervisor (given), the vault's side (``vault/breakglass.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from drsite.agent.recoverybook import BOOK_FILE, RecoveryBook
from drsite.agent.registration import AgentIdentity
from drsite.core.errors import (
    Conflict,
    DrsiteError,
    InvalidInput,
    PointNotAuthentic,
    classify_os_error,
)
from drsite.core.model import validate_name
from drsite.core.states import FailoverState
from drsite.failover import actions, records
from drsite.failover.wire import (
    BREAKGLASS_MAX_REPORTS,
    network_map_from_args,
    vm_spec_from_dict,
)
from drsite.fsutil import atomic_write_bytes, atomic_write_json, read_json
from drsite.hypervisors.contract import HypervisorDriver
from drsite.sitestore.acl import ACL_FILE, StoreAcl
from drsite.sitestore.server import held_marker, replica_lock
from drsite.sitestore.syncserver import journals_dir
from drsite.store.auth import PointAuth
from drsite.store.format import PointInfo, canonical_json
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository
from drsite.tracking.syncjournal import SyncJournal

log = logging.getLogger(__name__)

BG_DIR = "breakglass"
RUN_SUFFIX = ".run"             # DATA/breakglass/<item>.run: the run lock of a break-glass run
WORK_DIR = "failover"           # the failover library's work directory (as agent/failover.py)
RUN_FILE = "agent-run.json"   # how `drsite agent run` was started (hypervisor, VMs, store)
DONE_STATES = (FailoverState.PENDING_COMMIT, FailoverState.COMMITTED)


# ------------------------------------------------------------------ the daemon's run options

def save_run_options(data_dir: Path, *, hypervisor: str, vms_root: Path,
                     store_dir: Path | None) -> None:
    """Remember how the daemon runs, so that ``drsite agent failover`` finds the same
    hypervisor and store without repeating the options."""
    doc = {"hypervisor": hypervisor, "vms": str(Path(vms_root).absolute()),
           "store": str(Path(store_dir).absolute()) if store_dir is not None else None}
    path = Path(data_dir) / RUN_FILE
    try:
        if path.exists() and read_json(path) == doc:
            return
        atomic_write_bytes(path, canonical_json(doc))
        os.chmod(path, 0o600)
    except OSError as e:
        raise classify_os_error(e, f"agent run options {path}") from e


def load_run_options(data_dir: Path) -> dict[str, Any]:
    """The daemon's last run options (empty when it never ran)."""
    try:
        return dict(read_json(Path(data_dir) / RUN_FILE))
    except FileNotFoundError:
        return {}


# ------------------------------------------------------------------ reports to the vault

def _records_dir(data_dir: Path) -> Path:
    return Path(data_dir) / BG_DIR


def _record_path(data_dir: Path, item_id: str) -> Path:
    return _records_dir(data_dir) / f"{validate_name('item', item_id)}.json"


def _save_record(data_dir: Path, item_id: str, doc: dict[str, Any]) -> None:
    path = _record_path(data_dir, item_id)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(path, doc)
        os.chmod(path, 0o600)
    except OSError as e:
        raise classify_os_error(e, f"break-glass record {path}") from e


def pending_reports(data_dir: Path) -> list[dict[str, Any]]:
    """The finished break-glass failovers the vault has not acknowledged: the failover
    library's record of each as the break-glass run ended (``FailoverResult.to_dict()``), at
    most ``BREAKGLASS_MAX_REPORTS`` (what one heartbeat may carry; the rest go in the next
    ones, as these are acknowledged)."""
    out: list[dict[str, Any]] = []
    folder = _records_dir(data_dir)
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        try:
            doc = dict(read_json(path))
        except (OSError, ValueError) as e:
            log.error("unreadable break-glass record %s: %s", path, e)
            continue
        rec = doc.get("record")
        if doc.get("reported") or not isinstance(rec, dict):
            continue
        if rec.get("state") in [s.value for s in DONE_STATES]:
            out.append(rec)
            if len(out) >= BREAKGLASS_MAX_REPORTS:
                break
    return out


def mark_reported(data_dir: Path, failover_ids: list[str]) -> None:
    """The vault acknowledged these failovers: stop reporting them."""
    if not failover_ids:
        return
    wanted = set(failover_ids)
    folder = _records_dir(data_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            doc = dict(read_json(path))
            if doc.get("failover_id") in wanted and not doc.get("reported"):
                doc["reported"] = True
                doc["reported_at"] = time.time()
                atomic_write_json(path, doc)
                log.info("the vault recorded break-glass failover %s of %s",
                         doc.get("failover_id"), path.stem)


@contextlib.contextmanager
def _run_lock(data_dir: Path, item_id: str) -> Iterator[None]:
    """Held (``flock``) for the whole of a break-glass run of ``item_id``, up to its record
    being saved finished."""
    path = _records_dir(data_dir) / f"{validate_name('item', item_id)}{RUN_SUFFIX}"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise classify_os_error(e, f"break-glass run lock {path}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def vms_in_flight(data_dir: Path, book: dict[str, Any] | None) -> set[str]:
    """Names of the VMs break-glass runs on this host are creating right now (their run lock
    is held): the daemon leaves them out of its inventory until the run has saved its record,
    which goes in the same heartbeat as the VM. Otherwise the vault could meet the recovery
    VM before the failover — a new VM of its site, which a group there may auto-protect."""
    folder = _records_dir(data_dir)
    items = dict((book or {}).get("items") or {})
    out: set[str] = set()
    for path in sorted(folder.glob(f"*{RUN_SUFFIX}")) if folder.is_dir() else []:
        entry = items.get(path.name[:-len(RUN_SUFFIX)])
        if not isinstance(entry, dict):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:   # held: a run is under way
            out.update(str(n) for n in (entry.get("vm_name"),
                                        dict(entry.get("vm_spec") or {}).get("name")) if n)
        finally:
            os.close(fd)
    return out


# ------------------------------------------------------------------ the vault's presence

def active_failover(data_dir: Path, item_id: str) -> str | None:
    """The id of the item's break-glass failover that still holds it on this host (promoted,
    not cancelled: its step record says so, whoever cancelled it), or None. A vault's failover
    command for the item with another id is refused while there is one: the vault had not
    heard of it yet."""
    try:
        fid = str(dict(read_json(_record_path(data_dir, item_id))).get("failover_id") or "")
        raw = read_json(Path(data_dir) / WORK_DIR / "failovers"
                        / f"{validate_name('failover', fid)}.json")
    except FileNotFoundError:
        return None
    try:
        step = records.FailoverResult.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        return fid   # a damaged step record: assume it holds (no second VM on a guess)
    # stopped before its promotion (e.g. its point was refused): nothing changed, no hold
    return fid if records.holds_item(step) else None


def vault_answers(identity: AgentIdentity, timeout: float = 3.0) -> dict[str, bool]:
    """Every vault this host follows (``identity.vault_urls``, in that order) and whether it
    answers ``GET /api/v1/version`` over the agent's TLS identity within ``timeout`` seconds
    (a 5xx is no answer). All are asked, so that a refusal can say which answered."""
    out: dict[str, bool] = {}
    for url in identity.vault_urls:
        try:
            r = httpx.get(url + "/api/v1/version", verify=identity.client_context(),
                          timeout=timeout)
        except httpx.HTTPError:
            out[url] = False
            continue
        out[url] = r.status_code < 500
    return out


def refuse_while_a_vault_answers(identity: AgentIdentity, use_instead: str,
                                 timeout: float = 3.0) -> None:
    """``Conflict`` when any vault this host follows answers — either of a pair: a standby that
    answers is to be promoted ('drsite vault promote'), not bypassed. The message names every
    vault asked and which answered; ``use_instead`` is the ``drsite`` command doing the same
    through a vault (the hint). Not responsible for ``--force`` (the caller skips this)."""
    asked = vault_answers(identity, timeout)
    answered = [u for u, ok in asked.items() if ok]
    if not answered:
        return
    silent = [u for u, ok in asked.items() if not ok]
    who = (f"the vault at {answered[0]} answers" if len(answered) == 1
           else f"the vaults at {', '.join(answered)} answer")
    if silent:
        who += f" ({', '.join(silent)} did not)"
    pair = (" If the vault that answers is the standby of a lost active one, promote it first: "
            "drsite vault promote." if len(asked) > 1 else "")
    raise Conflict(
        f"{who}: break-glass is for when no vault does. A failover no vault runs is unknown "
        "to it until this agent's next heartbeat; meanwhile it may fail the item over itself "
        "(a second VM) or keep replicating it",
        hint=f"Use the vault: drsite {use_instead} (or --force if the vault is wrong about "
             f"it).{pair}")


# ------------------------------------------------------------------ the failover itself

def _refuse_others(site: actions.Site, item_id: str, fid: str | None) -> None:
    """``Conflict`` when another real failover (a vault's) holds the item on this host: a
    second one would promote again and start a second VM. Checked before waiting for the
    replica's lock and again under it (every failover of the item starts its record under
    that lock)."""
    others = [r for r in records.live_failovers(site, item_id) if r.failover_id != fid]
    if others:
        o = others[0]
        raise Conflict(f"item {item_id} is in failover {o.failover_id} on this host already "
                       f"({o.state.value}, VM {o.vm_name}); a second failover would start "
                       "a second VM",
                       hint="Commit or cancel that failover through the vault when it is "
                            "back (drsite failover commit|cancel ITEM).")


class BreakGlass:
    """Break-glass failovers of the items whose store this host serves (``store_dir``)."""

    def __init__(self, data_dir: Path, hypervisor: HypervisorDriver, store_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.hypervisor = hypervisor
        self.identity = AgentIdentity.load(self.data_dir)
        if not Path(store_dir).is_dir():
            raise InvalidInput(f"recovery store directory {store_dir} does not exist",
                               hint="Pass the --store directory the agent runs with.")
        self.store = LocalObjectStore(Path(store_dir))
        self.book = RecoveryBook(self.data_dir / BOOK_FILE)
        self.acl = StoreAcl(self.data_dir / ACL_FILE)
        self.replicas = self.data_dir / "replicas"
        self.work_dir = self.data_dir / WORK_DIR

    def _journal(self, item_id: str) -> SyncJournal | None:
        """The item's sync journal on this host, read-only (None: the item never ran in
        synchronous mode here)."""
        path = journals_dir(self.data_dir) / item_id
        return SyncJournal.open_readonly(path) if path.is_dir() else None

    def _check_user(self) -> None:
        """The records a failover writes (0600) must be the agent's: root (sudo) would write
        files the agent cannot read, so it would never report the failover to the vault."""
        try:
            owner = self.data_dir.stat().st_uid
        except OSError as e:
            raise classify_os_error(e, f"agent data directory {self.data_dir}") from e
        if owner != os.geteuid():
            raise InvalidInput(
                f"the agent data directory {self.data_dir} belongs to user id {owner}, not to "
                f"this user (id {os.geteuid()}): the agent could not read what break-glass "
                "writes, and would never report the failover to the vault",
                hint="Run it as the agent's user, e.g. sudo -u <agent user> drsite agent "
                     "failover ...")

    def _auth(self, item_id: str) -> PointAuth:
        """The item's point MAC: break-glass never reads a point it cannot authenticate."""
        auth = self.acl.point_auth(item_id)
        if auth is None:
            raise PointNotAuthentic(
                f"this host holds no point key of item {item_id}: its points cannot be "
                "authenticated, so they are not used",
                hint="Only the store agent of the item's recovery site holds the key (its "
                     "access list); run break-glass there.")
        return auth

    def items(self) -> list[dict[str, Any]]:
        """What this host can fail over: every item of the book, with its newest point."""
        out: list[dict[str, Any]] = []
        for item_id, entry in sorted(dict((self.book.doc or {}).get("items") or {}).items()):
            row: dict[str, Any] = {"item_id": item_id, "vm_name": entry.get("vm_name"),
                                   "source_site": entry.get("source_site"),
                                   "recovery_site": entry.get("recovery_site")}
            try:
                pts = [r for r in self.point_rows(item_id) if r["ok"]]
                row.update(points=len(pts), latest=pts[-1]["point_id"] if pts else None,
                           latest_at=pts[-1]["created_at"] if pts else None)
            except DrsiteError as e:  # shown per item; the listing goes on
                row["error"] = str(e)
            out.append(row)
        return out

    def plans(self) -> dict[str, Any]:
        return dict((self.book.doc or {}).get("plans") or {})

    def points(self, item_id: str) -> list[PointInfo]:
        """The item's committed points in the local store, oldest first (authenticated: one
        that is not raises, see :meth:`point_rows`)."""
        self.book.entry(validate_name("item", item_id))
        repo = Repository(self.store, item_id, auth=self._auth(item_id))
        try:
            return repo.points()
        finally:
            repo.close()

    def point_rows(self, item_id: str) -> list[dict[str, Any]]:
        """Every point of the item in the local store, oldest first, each checked on its own:
        ``{point_id, seq, created_at, consistency, ok, error}`` (a damaged or forged point is
        listed as not usable, with the reason)."""
        self.book.entry(validate_name("item", item_id))
        repo = Repository(self.store, item_id, auth=self._auth(item_id))
        rows: list[dict[str, Any]] = []
        try:
            for pid in repo.point_ids():
                try:
                    p = repo.point(pid)
                except DrsiteError as e:
                    rows.append({"point_id": pid, "seq": None, "created_at": None,
                                 "consistency": None, "ok": False, "error": e.code})
                    continue
                rows.append({"point_id": p.point_id, "seq": p.seq, "created_at": p.created_at,
                             "consistency": p.consistency.value, "ok": True, "error": None})
        finally:
            repo.close()
        return rows

    def failover(self, item_id: str, point: str = "latest") -> actions.FailoverResult:
        """Fail ``item_id`` over to ``point`` ("latest", "latest_app" or a point id) on this
        host; idempotent (see the module docstring). Runs under the item's run lock (see
        :func:`vms_in_flight`; a second run of the item waits for the first)."""
        item_id = validate_name("item", item_id)
        self._check_user()
        with _run_lock(self.data_dir, item_id):
            return self._failover(item_id, point)

    def _failover(self, item_id: str, point: str) -> actions.FailoverResult:
        entry = self.book.entry(item_id)
        auth = self._auth(item_id)
        path = _record_path(self.data_dir, item_id)
        prev: dict[str, Any] | None = None
        with contextlib.suppress(FileNotFoundError):
            prev = dict(read_json(path))
        fid: str | None = None
        rec: actions.FailoverResult | None = None
        site = actions.Site(str(entry["recovery_site"]), self.hypervisor, self.work_dir)
        if prev is not None:
            rec = actions.load_failover(site, str(prev["failover_id"]))
            if rec is None or rec.state not in (FailoverState.CANCELLED, FailoverState.CLEANED_UP):
                fid = str(prev["failover_id"])
                if rec is not None and rec.state in DONE_STATES and point not in (
                        "latest", prev.get("point"), rec.point_id):
                    raise Conflict(
                        f"item {item_id} was failed over already (break-glass {fid}, point "
                        f"{rec.point_id}); a second failover would start a second VM",
                        hint="Change the point through the vault once it is back: "
                             f"drsite failover change-point {item_id} --point {point}")
        _refuse_others(site, item_id, fid)
        if fid is None:
            fid = f"bg-{secrets.token_hex(6)}"
            _save_record(self.data_dir, item_id, {"failover_id": fid, "item_id": item_id,
                                                  "point": point, "requested_at": time.time(),
                                                  "reported": False, "record": None})
        elif prev is not None and prev.get("point") != point and (
                rec is None or rec.state not in DONE_STATES):
            # an attempt that did not finish (e.g. its point was refused): this one counts
            _save_record(self.data_dir, item_id, {**prev, "point": point})
        repo = Repository(self.store, item_id, auth=auth)
        replica_dir = self.replicas / item_id
        journal: SyncJournal | None = None
        try:
            with replica_lock(replica_dir):
                pi = actions.ProtectedItem(
                    item_id=item_id, vm_id=str(entry["vm_id"]),
                    spec=vm_spec_from_dict(dict(entry["vm_spec"])),
                    primary=actions.Site(str(entry["source_site"]), None, self.work_dir),
                    recovery=site, repo=repo, hydrator=ReplicaHydrator(repo, replica_dir),
                    network_map=network_map_from_args(entry.get("network_map")))
                # again under the lock: a vault's failover command (the vault came back) may
                # have held it and failed the item over while this run waited for it
                _refuse_others(site, item_id, fid)
                # the store service must not rebuild the replica behind the VM it moves into;
                # the agent's journal server acknowledges no write after it (syncserver)
                marker = held_marker(self.replicas, item_id)
                atomic_write_json(marker, {"held_by": "break-glass failover", "at": time.time()})
                # a synchronous item: "latest" replays the writes acknowledged after the
                # point's seal, read beside the agent that may still be appending
                journal = self._journal(item_id)
                pi.sync_journal = journal
                try:
                    rec = actions.unplanned_failover(pi, point, failover_id=fid)
                except DrsiteError:
                    step = actions.load_failover(site, fid)
                    if step is None or step.point_id is None:
                        marker.unlink(missing_ok=True)  # nothing was moved: hydrate again
                    raise
        finally:
            repo.close()
            if journal is not None:
                journal.close()
        doc = dict(read_json(path))
        if doc.get("record") != rec.to_dict():
            doc.update(record=rec.to_dict(), reported=False)
            _save_record(self.data_dir, item_id, doc)
        log.info("break-glass failover %s of %s: %s, VM %s from point %s (generation %d)",
                 fid, item_id, rec.state.value, rec.vm_name, rec.point_id, rec.generation)
        return rec

    def failover_plan(self, name: str, point: str = "latest") -> list[dict[str, Any]]:
        """Every item of plan ``name``, group by group in the plan's order (items of a group
        one after the other). Stops at the first failure (the items before it stay failed
        over; running the plan again resumes)."""
        plan = self.book.plan(name)
        out: list[dict[str, Any]] = []
        for group in plan.get("groups") or []:
            for item_id in group.get("items") or []:
                rec = self.failover(str(item_id), point)
                out.append({"group": group.get("name"), **rec.to_dict()})
        return out
