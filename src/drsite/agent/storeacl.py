"""A store-serving agent's side of store authorization: the access list the vault pushes, the
audit entries it reports, and retention run by the store's owner.

- Heartbeat: the agent sends ``store_acl_digest`` (the digest of the list in force, or null)
  and ``audit`` (deletes/overwrites its store did or refused); the vault answers with
  ``store_acl`` only when its list differs (:func:`beat_fields`, :func:`apply_reply`).
- ``retention`` with ``store_side: true``: the vault sends an item's retention to the agent
  whose store holds it (remote clients may not delete committed objects: see
  ``sitestore/immutable.py``). With ``settings`` it applies the item's retention rule, pinning
  the point the local replica holds; with ``delete_all`` (protection disabled with its points
  deleted) it aborts staged cycles and deletes every point. Then GC. Every deleted point is an
  audit entry with this host as the caller. The source agent reports the removed points in
  its heartbeat as before, and the vault accepts them only as its retention rule explains.

Responsible for: these exchanges. Not responsible for: the list's rules (``sitestore.acl``),
retention's rules (``store.maintenance``), the heartbeat loop (``daemon``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from drsite.agent.link import Command
from drsite.agent.state import settings_from_args
from drsite.agent.storeservice import StoreService
from drsite.core.errors import DrsiteError, InvalidInput
from drsite.core.model import validate_name
from drsite.sitestore.server import replica_lock
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

log = logging.getLogger(__name__)


def beat_fields(svc: StoreService | None) -> dict[str, Any]:
    """What a store-serving agent adds to its heartbeat (nothing when it serves no store)."""
    if svc is None:
        return {}
    return {"store_acl_digest": svc.acl.digest, "audit": svc.audit.take()}


def beat_failed(svc: StoreService | None, fields: dict[str, Any]) -> None:
    """The heartbeat carrying ``fields`` was not delivered: keep its audit entries."""
    if svc is not None and fields.get("audit"):
        svc.audit.give_back(list(fields["audit"]))


def apply_reply(svc: StoreService | None, doc: Any) -> bool:
    """Take the list of a heartbeat reply (absent: unchanged); True when the list in force
    changed. A malformed list is logged and ignored: the list in force stays."""
    if svc is None or doc is None:
        return False
    if not isinstance(doc, dict):
        log.error("ignoring a store access list that is not an object")
        return False
    try:
        if svc.acl.update(doc):
            st = svc.acl.state
            log.info("store access list updated: %d item(s), %d host(s), %d revoked",
                     len(st.items) if st else 0, len(st.hosts) if st else 0,
                     len(st.revoked_hosts) if st else 0)
            return True
    except InvalidInput as e:
        log.error("ignoring the vault's store access list: %s", e)
    except DrsiteError as e:  # not persisted (a full disk): not used; the vault sends it again
        log.error("cannot keep the vault's store access list (%s); the list in force stays, "
                  "the next heartbeat brings it again", e)
    return False


def retention_keep(cmd: Command) -> set[str]:
    """The ``keep`` of a ``retention`` command: points its retention must not remove (member
    points of group points within the policy's retention; the vault names them)."""
    keep = cmd.args.get("keep") or []
    if not isinstance(keep, list) or not all(isinstance(p, str) for p in keep):
        raise InvalidInput(f"retention of {cmd.item_id}: 'keep' must be a list of point ids",
                           hint="The vault sends it; check that agent and vault run the same "
                                "drsite version (drsite version).")
    return set(keep)


def store_retention(svc: StoreService, cmd: Command) -> dict[str, Any]:
    """Run an item's retention (or deletion of every point) on this host's store."""
    item_id = validate_name("item", cmd.item_id or "")
    delete_all = bool(cmd.args.get("delete_all"))
    rule = None
    if not delete_all:
        settings = cmd.args.get("settings")
        if not isinstance(settings, dict):
            raise InvalidInput(f"store-side retention of {item_id}: missing settings")
        rule = settings_from_args(dict(settings)).retention
    repo = Repository(svc.local_store, item_id, auth=svc.acl.point_auth(item_id))
    replica_dir = svc.replicas_dir / item_id
    try:
        with replica_lock(replica_dir):
            if delete_all:
                for cycle_id in repo.staged_cycles():
                    repo.abort(cycle_id)
                deleted = [p.point_id for p in repo.points()]
                for pid in deleted:
                    repo.delete_point(pid)
                repo.gc()
            else:
                assert rule is not None
                # the vault's ``keep``: member points of group points within retention
                pinned = ReplicaHydrator(repo, replica_dir).pinned() | retention_keep(cmd)
                deleted = repo.apply_retention(rule, time.time(), pinned)  # GC included
    finally:
        repo.close()
    for pid in deleted:
        svc.audit.record("delete", f"items/{item_id}/points/{pid}", item_id,
                         svc.identity.host_id, "ok")
    if deleted:
        log.info("item %s: store-side %s removed %d point(s)", item_id,
                 "deletion" if delete_all else "retention", len(deleted))
    return {"deleted_points": deleted, "store_side": True}
