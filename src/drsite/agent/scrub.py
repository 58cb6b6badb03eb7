"""Scrub and verify commands on an agent: reading an item's recovery store where it is cheap.

The vault sends ``scrub`` and ``verify`` to the host that reads the item's store cheaply: the
agent that serves the site store (its own files), or for a cloud store a host of the target
site, with the store's spec in the arguments (as for failover commands). Both run in the item's
lane on that host (one command at a time per item).

``scrub`` runs :func:`drsite.store.scrub.scrub` for at most ``budget_s`` seconds at
``rate_bps`` and keeps the pass's cursor in ``<data>/scrub/<item>.json`` (written atomically
while the pass runs), so a pass cut short by the budget, a restart or a crash goes on where it
stopped. A scrub yields: as soon as another command waits in the item's lane (a failover, a
cleanup) it ends after the pack it is reading, with an incomplete report; the vault sends the
next slice, which queues behind that command. ``verify`` proves points
(:func:`drsite.store.scrub.verify_point`); it does not yield (it is asked for by hand or by a
drill, and reads only the points asked for).

Responsible for: opening the store from the arguments, the cursor file, the results. Not
responsible for: when to scrub or what the results mean (the vault: ``vault/scrub.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from drsite.agent import pointkeys
from drsite.agent.link import Command
from drsite.agent.registration import AgentIdentity
from drsite.agent.storeservice import StoreService
from drsite.core.errors import InvalidInput, NotFound, ObjectNotFound
from drsite.core.model import validate_name
from drsite.fsutil import atomic_write_json, read_json
from drsite.store.factory import open_store
from drsite.store.repository import Repository
from drsite.store.scrub import ScrubCursor, scrub, verify_point

log = logging.getLogger(__name__)

KINDS = ("scrub", "verify")
DEFAULT_BUDGET_S = 300.0


class StoreHost(Protocol):
    """What these commands need of the agent daemon."""

    data_dir: Path
    identity: AgentIdentity

    @property
    def store_service(self) -> StoreService | None: ...

    def lane_waiting(self, item_id: str) -> bool:
        """True while another command waits in the item's lane."""
        ...


class ScrubCommands:
    """Runs ``scrub`` and ``verify`` for one agent (called from the item's lane)."""

    def __init__(self, agent: StoreHost) -> None:
        self.agent = agent
        self.dir = agent.data_dir / "scrub"

    def handle(self, cmd: Command) -> dict[str, Any]:
        if cmd.kind == "scrub":
            return self._scrub(cmd)
        if cmd.kind == "verify":
            return self._verify(cmd)
        raise InvalidInput(f"unknown command kind {cmd.kind!r}")

    @contextlib.contextmanager
    def _repo(self, cmd: Command) -> Iterator[Repository]:
        item_id = validate_name("item", cmd.item_id or "")
        spec = cmd.args.get("store")
        if spec:
            store = open_store(dict(spec))
        else:
            svc = self.agent.store_service
            if svc is None:
                raise InvalidInput(f"host {self.agent.identity.host_name} serves no recovery store",
                                   hint="Scrubs of a site store run on the agent that serves it "
                                        "(--store-listen).")
            store = svc.local_store
        # every manifest read must be authentic: the key the command carries (kept in a 0600
        # file), else the one this host kept, else its store access list's
        auth = pointkeys.auth_from_args(self.agent.data_dir, item_id, cmd.args.get("point_key"))
        svc = self.agent.store_service
        if auth is None and svc is not None:
            auth = svc.acl.point_auth(item_id)
        repo = Repository(store, item_id, auth=auth)
        try:
            yield repo
        finally:
            repo.close()

    def cursor_path(self, item_id: str) -> Path:
        return self.dir / f"{validate_name('item', item_id)}.json"

    def _scrub(self, cmd: Command) -> dict[str, Any]:
        a = cmd.args
        rate = int(a["rate_bps"]) if a.get("rate_bps") else None
        budget = float(a.get("budget_s") or DEFAULT_BUDGET_S)
        path = self.cursor_path(cmd.item_id or "")
        cursor: ScrubCursor | None = None
        with contextlib.suppress(FileNotFoundError):
            try:
                cursor = ScrubCursor.from_dict(dict(read_json(path)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("scrub cursor %s unreadable (%s): starting a new pass", path, e)

        def keep(c: ScrubCursor) -> None:
            atomic_write_json(path, c.to_dict())

        item_id = cmd.item_id or ""
        with self._repo(cmd) as repo:
            report, nxt = scrub(repo, cursor, rate_bps=rate, budget_s=budget, on_progress=keep,
                                yield_to=lambda: self.agent.lane_waiting(item_id))
        if nxt is None:
            path.unlink(missing_ok=True)
        else:
            keep(nxt)
        log.info("scrub of %s: %s, %d object(s), %d bytes checked, %d damaged, %.1f s",
                 cmd.item_id, "pass complete" if report.complete else "pass goes on",
                 report.objects_checked, report.bytes_checked, len(report.findings),
                 report.seconds)
        return {"scrub": report.to_dict()}

    def _verify(self, cmd: Command) -> dict[str, Any]:
        want = cmd.args.get("points") or "latest"
        rate = int(cmd.args["rate_bps"]) if cmd.args.get("rate_bps") else None
        with self._repo(cmd) as repo:
            ids = [p.point_id for p in repo.points()]
            if not ids:
                raise NotFound(f"item {cmd.item_id} has no recovery point in its store")
            if want == "all":
                chosen = ids
            elif want == "latest":
                chosen = ids[-1:]
            else:
                chosen = [validate_name("point", str(p)) for p in list(want)]
            proofs = []
            for pid in chosen:
                try:
                    proofs.append(verify_point(repo, pid, rate_bps=rate).to_dict())
                except ObjectNotFound:
                    raise NotFound(f"recovery point {pid} of {cmd.item_id} is not in the store",
                                   hint=f"List its points: drsite items points {cmd.item_id}") \
                        from None
        return {"verify": {"points": proofs, "ok": all(p["ok"] for p in proofs)}}
