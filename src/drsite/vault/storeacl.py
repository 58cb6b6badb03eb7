"""The vault's half of store authorization: point keys, the access list of each store-serving
agent, and where a site-store item's retention runs.

- **Point keys** (:func:`point_key`): 32 random bytes per item (``point_keys`` table, sealed at
  rest), created on first use. Sent in ``protect`` (source agent), in failover commands, in
  ``reprotect_seed`` for the reverse item (``rev_point_key``), and in the access list of the
  store that holds the item; scrubbed from command arguments when the command ends.
- **Access list** (:func:`access_list`): for a host that serves a store — the hosts that may
  use it (their *current* certificate fingerprints: a re-issued certificate replaces the old
  one), per item of its site that replicates to the site's agent store: the writer (the item's
  source host; none once the item failed over), the readers (the source host; the store's own
  host may do everything) and the point key; and every revoked host with its serial and
  fingerprint. It goes in the heartbeat reply when the agent's digest differs
  (:func:`reply_fields`), so a revocation reaches every store within one heartbeat interval.
- **Store-side retention** (:func:`retention_target`): retention and deletion of a site-store
  item's points run on the store's own agent (``retention`` with ``store_side``), since remote
  clients may not delete committed objects.
- An agent's command that failed with ``point_not_authentic`` raises a security alert
  (:func:`drsite.vault.trust.alert_not_authentic`).

Responsible for: these decisions. Not responsible for: evaluating the list (the agent's
``sitestore.acl``), delivering commands (``commands``).
"""

from __future__ import annotations

import base64
import os
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.states import RETIRED_ITEM_STATUSES, ItemProtection
from drsite.sitestore.acl import FORMAT, acl_digest
from drsite.vault import commands
from drsite.vault.db.models import Command, Group, Host, Item, PointKey

KEY_BYTES = 32
# failed over (or further): the old primary's item is read-only on the store
READ_ONLY_STATUSES = frozenset({ItemProtection.FAILED_OVER, ItemProtection.COMMITTED,
                                ItemProtection.REPROTECTED})


def point_key(s: Session, item_id: str, now: float) -> str:
    """The item's point key (base64), created on first use."""
    row = s.get(PointKey, item_id)
    if row is None:
        row = PointKey(item_id=item_id, key=base64.b64encode(os.urandom(KEY_BYTES)).decode(),
                       created_at=now)
        s.add(row)
        s.flush()
    return row.key


def existing_point_key(s: Session, item_id: str) -> str | None:
    """The item's point key if it has one (read-only: for read transactions)."""
    row = s.get(PointKey, item_id)
    return row.key if row is not None else None


def point_keys(s: Session, item_ids: list[str], now: float) -> dict[str, str]:
    """The point keys of many items in one query (missing ones created)."""
    out = {r.item_id: r.key for r in s.scalars(select(PointKey).where(
        PointKey.item_id.in_(sorted(item_ids))))} if item_ids else {}
    for item_id in item_ids:
        if item_id not in out:
            out[item_id] = point_key(s, item_id, now)
    return out


def _site_store_items(s: Session, site_id: int) -> list[Item]:
    """Active items whose recovery store is the agent store of ``site_id`` (not a cloud
    store)."""
    rows = s.execute(select(Item, Group.store_id).join(Group, Group.id == Item.group_id)
                     .where(Item.target_site_id == site_id)).all()
    return sorted((it for it, store_id in rows
                   if store_id is None and it.status not in RETIRED_ITEM_STATUSES),
                  key=lambda it: it.id)


def access_list(s: Session, host: Host, now: float) -> dict[str, Any]:
    """The access list of the store ``host`` serves (see the module docstring and
    ``sitestore/acl.py`` for the format). It holds no time stamp: an unchanged list has an
    unchanged digest, and is not sent again."""
    items = _site_store_items(s, host.site_id)
    writers = {it.host_id for it in items} | {host.id}
    hosts = {h.id: h for h in s.scalars(select(Host).where(Host.id.in_(sorted(writers))))}
    live = {hid: {"fingerprint": h.cert_fingerprint, "serial": h.cert_serial}
            for hid, h in hosts.items() if h.revoked_at is None}
    keys = point_keys(s, [it.id for it in items if it.host_id in live], now)
    grants: dict[str, Any] = {}
    for it in items:
        if it.host_id not in live:
            continue  # a revoked source host: no grant at all
        # after a failover the old primary may read its item but never write it again
        writer = "" if it.status in READ_ONLY_STATUSES else it.host_id
        grants[it.id] = {"writer": writer, "readers": sorted({it.host_id, host.id}),
                         "point_key": keys[it.id]}
    revoked = list(s.scalars(select(Host).where(Host.revoked_at.is_not(None)).order_by(Host.id)))
    return {"format": FORMAT, "store_host": host.id,
            "hosts": live, "items": grants,
            "revoked": {"hosts": [h.id for h in revoked],
                        "serials": [h.cert_serial for h in revoked],
                        "fingerprints": [h.cert_fingerprint for h in revoked]}}


def reply_fields(s: Session, host: Host, agent_digest: str | None, now: float) -> dict[str, Any]:
    """``{"store_acl": list}`` for a store-serving host whose list differs from the one it has
    (``agent_digest``), else nothing."""
    if host.store_url is None or host.revoked_at is not None:
        return {}
    if host.store_acl_digest != agent_digest:
        host.store_acl_digest = agent_digest
    doc = access_list(s, host, now)
    want = acl_digest(doc)
    # heartbeats of one agent are sequential and each reply is applied before the next beat:
    # what the agent reports now already reflects (or lost) every earlier reply, so the only
    # list in flight is the one this reply carries
    if host.store_acl_sent != want:
        host.store_acl_sent = want
    if agent_digest is not None and agent_digest == want:
        return {}
    return {"store_acl": doc}


def grant_pending(s: Session, item: Item, now: float) -> str | None:
    """Why the item's writes would still be refused by its site store (its agent has not
    confirmed, in a heartbeat, the list that grants them), or None. A job waits on this before
    it sends ``protect``, so the first write never races the list."""
    host = store_host(s, item)
    if host is None:
        return None
    doc = access_list(s, host, now)
    grant = doc["items"].get(item.id)
    want = acl_digest(doc)
    # confirmed only when the agent holds this very list and no other one is in flight: after
    # a failover is cancelled the list flips back to one the agent still holds, while a reply
    # with the read-only list may not have reached it yet
    if grant is not None and grant["writer"] == item.host_id \
            and host.store_acl_digest == want and host.store_acl_sent in (None, want):
        return None
    return (f"waiting for the store agent of the target site ({host.name}) to receive the "
            "item's access grant (next heartbeat)")


def store_host(s: Session, item: Item) -> Host | None:
    """The host whose agent store holds ``item`` (None: a cloud store, or no store host): the
    most recently heard, non-revoked store-serving host of the item's target site."""
    group = s.get(Group, item.group_id)
    if group is None or group.store_id is not None:
        return None
    return s.scalars(select(Host).where(Host.site_id == item.target_site_id,
                                        Host.revoked_at.is_(None), Host.store_url.is_not(None))
                     .order_by(Host.last_heartbeat.desc())).first()


def retention_target(s: Session, item: Item, settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(host id, arguments) of the item's ``retention`` command: the store's own agent for a
    site-store item, else the source agent."""
    host = store_host(s, item)
    if host is None:
        return item.host_id, {}
    return host.id, {"store_side": True, "settings": settings}


def enqueue_store_purge(s: Session, item: Item, now: float, job_id: str | None) -> Command | None:
    """Order the store's own agent to delete every point of a site-store item (protection
    disabled with its points deleted); None for a cloud-store item (the source deletes)."""
    host = store_host(s, item)
    if host is None:
        return None
    return commands.enqueue(s, host_id=host.id, kind="retention", item_id=item.id,
                            args={"store_side": True, "delete_all": True}, now=now, job_id=job_id)
