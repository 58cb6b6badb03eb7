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
  Built from plain columns, and at most once per change of what it depends on in each process
  (the point keys, immutable once made, are kept in memory): a store heartbeat every 2 s no
  longer reads every item and unseals every key of the site.
- **A grant is confirmed** (:func:`grant_pending`, before a job lets a source write) when the
  current list lets the item's source write it and the store's agent holds a list with that
  grant. The host row records the last list put in a reply (``store_acl_sent``, and when it
  was built, ``store_acl_sent_at``) and the build time of the last one the agent confirmed
  (``store_acl_confirmed_at``: its heartbeat sent that digest back). Two ways to confirm:
  *at scale*, the grant has been what it is now since ``CONFIRM_MARGIN_S`` before the
  confirmed list was built — since the item was made, its writer last changed
  (``items.grant_changed_at``: a failover, a cancel; :func:`set_status`) and its source got its
  certificate — so that list, and every later one (the one in flight too), has it; *exactly*,
  the list the agent holds (its digest) lets the item's source write it, with the source's
  current certificate, and no other list is in flight (a cancelled failover flips the list back
  to one the agent still holds while the read-only one may be on its way). The held list is
  read by its digest from the lists this process built (a digest names one content), not
  rebuilt per job: only when another process built it is the current list built, at most once
  per state of the store host and ``REBUILD_AFTER_S`` — a pass of N waiting jobs costs one
  build, not N (protecting N items at once was N²). So a stream of new items — a policy
  applied to thousands of VMs, whose list changes at every heartbeat — no longer keeps every
  grant pending until the stream stops, and a flip of the writer is never confirmed by a list
  built before it.
- **The store role** (:func:`site_store_host`, :func:`serves_store`): a host serves its
  site's store only when an admin granted it the site's store role (``sites.store_host_id``:
  ``drsite sites set-store SITE HOST``, audited; ``drsite up`` grants it to its store agents).
  A ``store_url`` in a heartbeat is only the host's claim: a host without the role gets no
  access list, no recovery book, is never a store host, and its break-glass reports are
  refused (``heartbeat`` raises one security alert per new claim). A host that lost the role
  and still holds a list gets an empty one (no grants, no keys).
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
import hashlib
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from drsite.core.states import RETIRED_ITEM_STATUSES, ItemProtection
from drsite.sitestore.acl import FORMAT, acl_digest
from drsite.vault import commands, push
from drsite.vault.db.models import Command, Group, Host, Item, PointKey, Site

KEY_BYTES = 32
CONFIRM_MARGIN_S = 30.0  # an item this much older than a confirmed list is in it
_CACHE = threading.Lock()
# (store host, the fingerprint of what its list holds of the site-store items, its host rows)
# -> (list, digest): the fingerprint is a digest of length-prefixed rows, so two different
# lists share an entry only if SHA-256/BLAKE2b collide (:func:`site_store_fingerprint`)
_DocKey = tuple[str, str, tuple[tuple[str, str, str, float | None], ...]]
_DOCS: OrderedDict[_DocKey, tuple[dict[str, Any], str]] = OrderedDict()
# digest -> list, for every list this process built (a digest names one content): what a store
# agent that reports a digest holds, read without rebuilding the list (:func:`grant_pending`)
_BY_DIGEST: OrderedDict[str, dict[str, Any]] = OrderedDict()
KNOWN_LISTS = 16
# store host -> (its agent's digest, the list sent last, monotonic time) of the last build
# :func:`grant_pending` made that did not name the agent's list: not rebuilt for that state
# within REBUILD_AFTER_S (a pass of N waiting jobs builds the list once, not N times)
_TRIED: dict[str, tuple[str | None, str | None, float]] = {}
REBUILD_AFTER_S = 1.0
_KEYS: dict[str, str] = {}  # item id -> point key: immutable once made (and committed)
MADE_KEYS = "drsite_made_point_keys"  # session.info: this transaction made a point key
# failed over (or further): the old primary's item is read-only on the store
READ_ONLY_STATUSES = frozenset({ItemProtection.FAILED_OVER, ItemProtection.COMMITTED,
                                ItemProtection.REPROTECTED})


def point_key(s: Session, item_id: str, now: float) -> str:
    """The item's point key (base64), created on first use. Two transactions may both find it
    missing (the job runner and a store heartbeat building the list, in two vault processes on
    PostgreSQL): the second insert fails in its own savepoint and reads the first one's key."""
    row = s.get(PointKey, item_id)
    if row is None:
        row = PointKey(item_id=item_id, key=base64.b64encode(os.urandom(KEY_BYTES)).decode(),
                       created_at=now)
        s.info[MADE_KEYS] = True
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError:
            made = s.get(PointKey, item_id)
            if made is None:
                raise
            row = made
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


def on_site_store(site_id: int) -> Any:
    """The items whose recovery store is the agent store of ``site_id`` (not a cloud store)
    and that are not retired: a filter for a select joined with their group."""
    return ((Item.target_site_id == site_id) & Group.store_id.is_(None)
            & Item.status.not_in(sorted(RETIRED_ITEM_STATUSES)))


def site_store_items(s: Session, site_id: int) -> list[Item]:
    """Active items whose recovery store is the agent store of ``site_id`` (not a cloud
    store), as rows (the recovery book needs their configuration), by id."""
    rows = s.scalars(select(Item).join(Group, Group.id == Item.group_id)
                     .where(on_site_store(site_id)))
    return sorted(rows, key=lambda it: it.id)


def set_status(item: Item, status: ItemProtection, now: float) -> None:
    """Set the item's protection status; a change between writable and read-only (failover,
    cancel) is when its store grant changed writer (``grant_changed_at``, see
    :func:`grant_pending`). Every such change (all in ``jobs/failover.py``) goes through here."""
    if (item.status in READ_ONLY_STATUSES) != (status in READ_ONLY_STATUSES):
        item.grant_changed_at = now
    item.status = status


def _site_store_rows(s: Session, site_id: int) -> list[tuple[str, str, ItemProtection]]:
    """(id, source host, status) of the active items whose recovery store is the agent store of
    ``site_id`` (not a cloud store), by id."""
    rows = s.execute(select(Item.id, Item.host_id, Item.status)
                     .join(Group, Group.id == Item.group_id)
                     .where(on_site_store(site_id))).all()
    return sorted((i, h, st) for i, h, st in rows)


def _field(expr: str) -> str:
    """SQL: a column as text in a row's fingerprint. Free text (``*``-marked: a VM's name) is
    length-prefixed; ids, statuses, numbers and JSON (whose strings escape control
    characters) cannot hold the separator, char(31). NULL is ``-``, '' is empty: so the
    concatenation of the rows names one content."""
    if expr.startswith("*"):
        expr = expr[1:]
        return (f"(CASE WHEN {expr} IS NULL THEN '-' ELSE "
                f"CAST(length({expr}) AS TEXT) || ':' || {expr} END)")
    return f"coalesce(CAST({expr} AS TEXT), '-')"


# what of a site-store item its access list holds: the item, its source (the writer and
# reader), whether it is read-only — not its status (enabling -> protected changes nothing)
_ACL_FIELDS = ("i.id", "i.host_id", "CASE WHEN i.status IN ({ro}) THEN 'r' ELSE 'w' END")
# what of it the recovery book holds (``recoverybook``): its status, VM, kept configuration,
# the VM's inventory row and its source host's site
BOOK_FIELDS = ("i.id", "i.status", "i.host_id", "i.vm_id", "*i.vm_name", "i.target_site_id",
               "i.vm_spec", "*v.name", "v.info", "h.site_id")


def site_store_fingerprint(s: Session, site_id: int, fields: tuple[str, ...]) -> str:
    """A digest of ``fields`` of every active item on ``site_id``'s agent store (and of its VM
    row ``v`` and source host row ``h``): one statement and one row, whatever the number of
    items — the database reads the rows (in C: ~7 ms for the list's fields of 5,000 items on
    SQLite, ~23 ms for the book's), Python does not decode them. Equal fingerprints, equal
    rows: a document built from those rows is reused while its fingerprint stands (the store
    heartbeat's access list and recovery book), so a beat where nothing they hold changed
    builds neither."""
    ro = ", ".join(f"'{st.value}'" for st in sorted(READ_ONLY_STATUSES))
    retired = ", ".join(f"'{st.value}'" for st in sorted(RETIRED_ITEM_STATUSES))
    pg = s.get_bind().dialect.name == "postgresql"
    row = f" || {'chr' if pg else 'char'}(31) || ".join(_field(f.format(ro=ro)) for f in fields)
    frm = ("FROM items i JOIN groups g ON g.id = i.group_id "
           "LEFT JOIN vms v ON v.host_id = i.host_id AND v.vm_id = i.vm_id "
           "LEFT JOIN hosts h ON h.id = i.host_id "
           f"WHERE i.target_site_id = :site AND g.store_id IS NULL AND i.status NOT IN ({retired})")
    if pg:
        got = s.execute(text(
            f"SELECT count(*), encode(sha256(convert_to(coalesce(string_agg({row}, ';' "
            f"ORDER BY i.id), ''), 'UTF8')), 'hex') {frm}"), {"site": site_id}).one()
        return f"{got[0]}:{got[1]}"
    # SQLite: in the table's order, not sorted (a sort of the rows cost more than the rest):
    # the same rows in another order only make another key (a rebuild), never a wrong hit
    got = s.execute(text(f"SELECT count(*), group_concat({row}, ';') {frm}"),
                    {"site": site_id}).one()
    return f"{got[0]}:{hashlib.blake2b((got[1] or '').encode(), digest_size=32).hexdigest()}"


def _keys(s: Session, item_ids: list[str], now: float) -> tuple[dict[str, str], bool]:
    """The items' point keys, and whether this transaction created any. Only committed keys
    are cached: a key created here is undone if the transaction rolls back (a failed commit,
    a refused request, a group commit's batch), and a cached one would then go out in an
    access list while the next transaction makes the item another key."""
    with _CACHE:
        out = {i: _KEYS[i] for i in item_ids if i in _KEYS}
    missing = [i for i in item_ids if i not in out]
    if not missing:
        return out, False
    out.update(point_keys(s, missing, now))
    # a key read or made here may be one this transaction made: then cache nothing
    made = bool(s.info.get(MADE_KEYS))
    if not made:
        with _CACHE:
            _KEYS.update({i: out[i] for i in missing})
    return out, made


def access_list(s: Session, host: Host, now: float) -> dict[str, Any]:
    """The access list of the store ``host`` serves (see the module docstring and
    ``sitestore/acl.py`` for the format). It holds no time stamp: an unchanged list has an
    unchanged digest, and is not sent again."""
    return access_list_digest(s, host, now)[0]


def access_list_digest(s: Session, host: Host, now: float) -> tuple[dict[str, Any], str]:
    """:func:`access_list` and its digest, built once per change of what it holds: the key is
    the fingerprint of the site-store items' (id, source, read-only) — one statement, one row —
    and the host rows (few). A status change that does not flip the writer (enabling ->
    protected) changes nothing here."""
    fp = site_store_fingerprint(s, host.site_id, _ACL_FIELDS)
    host_rows: list[tuple[str, str, str, float | None]] = sorted(
        (r[0], r[1], r[2], r[3]) for r in s.execute(
            select(Host.id, Host.cert_fingerprint, Host.cert_serial, Host.revoked_at)
            .where((Host.id.in_(select(Item.host_id).join(Group, Group.id == Item.group_id)
                                .where(on_site_store(host.site_id)).distinct()))
                   | (Host.id == host.id) | Host.revoked_at.is_not(None))))
    key: _DocKey = (host.id, fp, tuple(host_rows))
    with _CACHE:
        hit = _DOCS.get(key)
        if hit is not None:
            _DOCS.move_to_end(key)
            return hit
    items = _site_store_rows(s, host.site_id)
    writers = {h for _, h, _ in items} | {host.id}
    live = {hid: {"fingerprint": fp_, "serial": serial}
            for hid, fp_, serial, revoked_at in host_rows
            if hid in writers and revoked_at is None}
    keys, made = _keys(s, [i for i, h, _ in items if h in live], now)
    grants: dict[str, Any] = {}
    for item_id, source, status in items:
        if source not in live:
            continue  # a revoked source host: no grant at all
        # after a failover the old primary may read its item but never write it again
        writer = "" if status in READ_ONLY_STATUSES else source
        grants[item_id] = {"writer": writer, "readers": sorted({source, host.id}),
                           "point_key": keys[item_id]}
    revoked = [r for r in host_rows if r[3] is not None]
    doc = {"format": FORMAT, "store_host": host.id, "hosts": live, "items": grants,
           "revoked": {"hosts": [r[0] for r in revoked], "serials": [r[2] for r in revoked],
                       "fingerprints": [r[1] for r in revoked]}}
    out = (doc, acl_digest(doc))
    with _CACHE:
        if not made:   # a list holding keys this transaction made is not known to be committed
            _DOCS[key] = out
            while len(_DOCS) > KNOWN_LISTS:
                _DOCS.popitem(last=False)
        _remember(doc, out[1])
    return out


def _remember(doc: dict[str, Any], digest: str) -> None:
    """Index a list this process built by its digest (caller holds ``_CACHE``)."""
    _BY_DIGEST[digest] = doc
    _BY_DIGEST.move_to_end(digest)
    while len(_BY_DIGEST) > KNOWN_LISTS:
        _BY_DIGEST.popitem(last=False)


def _known_list(digest: str) -> dict[str, Any] | None:
    with _CACHE:
        doc = _BY_DIGEST.get(digest)
        if doc is not None:
            _BY_DIGEST.move_to_end(digest)
        return doc


def site_store_host(s: Session, site_id: int) -> Host | None:
    """The host that serves ``site_id``'s agent store: the one holding the site's store role,
    when it is not revoked and its agent runs a store (a ``store_url``); else None."""
    site = s.get(Site, site_id)
    if site is None or site.store_host_id is None:
        return None
    host = s.get(Host, site.store_host_id)
    if host is None or host.site_id != site_id or host.revoked_at is not None \
            or host.store_url is None:
        return None
    return host


def has_store_role(s: Session, host: Host) -> bool:
    """Whether an admin granted ``host`` its site's store role (whether or not it runs one)."""
    site = s.get(Site, host.site_id)
    return site is not None and site.store_host_id == host.id


def serves_store(s: Session, host: Host) -> bool:
    """Whether ``host`` serves its site's store (role granted, store running, not revoked)."""
    return host.store_url is not None and host.revoked_at is None and has_store_role(s, host)


def _no_grants(host: Host) -> dict[str, Any]:
    """The list of a host that lost the store role: nobody may use its store remotely."""
    return {"format": FORMAT, "store_host": host.id, "hosts": {}, "items": {},
            "revoked": {"hosts": [], "serials": [], "fingerprints": []}}


def reply_fields(s: Session, host: Host, agent_digest: str | None, now: float) -> dict[str, Any]:
    """``{"store_acl": list}`` for a store-serving host whose list differs from the one it has
    (``agent_digest``), else nothing. Records what the agent confirmed: the last list sent to
    it, when its digest comes back. A host without the store role gets nothing — or, while it
    still holds a list (it lost the role), an empty one."""
    if host.revoked_at is not None:
        return {}
    if not serves_store(s, host):
        if agent_digest is None:
            return {}
        empty = _no_grants(host)
        return {} if agent_digest == acl_digest(empty) else {"store_acl": empty}
    if host.store_acl_digest != agent_digest:
        host.store_acl_digest = agent_digest
    doc, want = access_list_digest(s, host, now)
    # heartbeats of one agent are sequential and each reply is applied before the next beat:
    # what the agent reports now already reflects (or lost) every earlier reply, so the only
    # list in flight is the one this reply carries. The agent's digest confirms the list sent
    # last (before it is replaced by this reply's), or the current one it already holds.
    _confirm(host, agent_digest)
    if host.store_acl_sent != want or host.store_acl_sent_at is None:
        host.store_acl_sent = want
        host.store_acl_sent_at = now
        _confirm(host, agent_digest)
    if agent_digest is not None and agent_digest == want:
        return {}
    return {"store_acl": doc}


def _confirm(host: Host, agent_digest: str | None) -> None:
    """The agent holds the list sent last: record when that list was built."""
    if agent_digest is not None and agent_digest == host.store_acl_sent \
            and host.store_acl_sent_at is not None \
            and host.store_acl_confirmed_at != host.store_acl_sent_at:
        host.store_acl_confirmed_at = host.store_acl_sent_at


def grant_pending(s: Session, item: Item, now: float) -> str | None:
    """Why the item's writes would still be refused by its site store (its agent has not
    confirmed, in a heartbeat, a list that grants them), or None. A job waits on this before
    it sends ``protect``, so the first write never races the list (module docstring). While
    it waits, the store host is asked for a heartbeat now (``push.want_heartbeat``): the list
    goes out in its reply and comes back confirmed in the beat after, instead of one and two
    heartbeat intervals later."""
    host = store_host(s, item)
    if host is None:
        return None
    why = _grant_pending(s, item, host, now)
    if why is not None:
        push.want_heartbeat(s, host.id)
    return why


def _grant_pending(s: Session, item: Item, host: Host, now: float) -> str | None:
    waiting = (f"waiting for the store agent of the target site ({host.name}) to receive the "
               "item's access grant (next heartbeat)")
    source = s.get(Host, item.host_id)
    # the item's row in the current list, read from the item alone (the list is built from
    # every item of the store: one job per pass rebuilding it made protecting N items cost N²):
    # listed unless retired, its source the writer unless read-only, no grant for a revoked one
    if (item.status in RETIRED_ITEM_STATUSES or item.status in READ_ONLY_STATUSES
            or source is None or source.revoked_at is not None):
        return waiting   # the current list does not let the source write (read-only, revoked)
    # at scale: the grant is as it is now since ``since`` (the item was made, its writer last
    # changed, its source got its certificate); a list the agent confirmed, built well after
    # that, has it — and so has every list built later, the one in flight included
    since = max(item.created_at, item.grant_changed_at or 0.0, source.registered_at)
    confirmed = host.store_acl_confirmed_at
    if confirmed is not None and since <= confirmed - CONFIRM_MARGIN_S:
        return None
    # exactly: the list the agent holds lets the source write the item, and no other list is
    # in flight (after a failover is cancelled the list flips back to one the agent still
    # holds, while a reply with the read-only list may not have reached it yet)
    held = host.store_acl_digest
    if held is None or host.store_acl_sent not in (None, held):
        return waiting
    doc = _known_list(held)
    if doc is None:
        # a list built by another vault process (or before a restart): build the current one,
        # at most once per state of the store host per REBUILD_AFTER_S — whichever list the
        # agent holds, only a list whose content this process knows can confirm a grant
        state = (held, host.store_acl_sent)
        with _CACHE:
            tried = _TRIED.get(host.id)
        mono = time.monotonic()
        if tried is not None and tried[:2] == state and mono - tried[2] < REBUILD_AFTER_S:
            return waiting
        _doc, want = access_list_digest(s, host, now)
        if want != held:
            with _CACHE:
                _TRIED[host.id] = (*state, mono)
            return waiting
        doc = _doc
    grant = doc["items"].get(item.id)
    if grant is not None and grant["writer"] == source.id and grants_writer(doc, host.id, source):
        return None
    return waiting


def grants_writer(doc: dict[str, Any], store_host_id: str, source: Host) -> bool:
    """Whether the list ``doc`` of ``store_host_id``'s store accepts ``source``'s current
    certificate (listed with its fingerprint and serial, not revoked)."""
    cert = doc["hosts"].get(source.id)
    return (doc["store_host"] == store_host_id and cert is not None
            and cert["fingerprint"] == source.cert_fingerprint
            and cert["serial"] == source.cert_serial
            and source.id not in doc["revoked"]["hosts"]
            and source.cert_serial not in doc["revoked"]["serials"]
            and source.cert_fingerprint not in doc["revoked"]["fingerprints"])


def store_host(s: Session, item: Item) -> Host | None:
    """The host whose agent store holds ``item`` (None: a cloud store, or no store host): the
    holder of the store role of the item's target site (:func:`site_store_host`)."""
    group = s.get(Group, item.group_id)
    if group is None or group.store_id is not None:
        return None
    return site_store_host(s, item.target_site_id)


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
