"""The recovery book the vault hands every store-serving agent beforehand, for break-glass
failover when no vault answers (``drsite agent failover``; issue 14 part 4).

For the store host of a site (the holder of its store role, ``storerole``): every item that
replicates to that site's agent store and is protected (or was in the middle of a failover),
with what an unplanned failover needs of the vault — the VM's configuration as last reported,
the source and recovery sites' names, the network map between them — and every recovery plan,
its groups narrowed to those items. The point keys are not in it: they are in the store's access
list already (``storeacl``). ``sync_journals`` lists the items whose sync journals the store
host keeps (those a failover may still replay); it deletes the others.

It goes in the heartbeat reply when the agent's ``recovery_book_digest`` differs (so an
unchanged book costs nothing but the digest), and the agent keeps it in a 0600 file. An agent
that says it takes patches (``recovery_book_patches``) and holds a book this process built
recently gets only what changed (``failover.wire.book_patch``): at thousands of items the book
is megabytes, and it changes with every item protected.

Responsible for: building the book. Not responsible for: using it (the agent's
``breakglass``), or what the vault does with a break-glass report (``vault/breakglass.py``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from drsite.core.errors import InvalidInput
from drsite.core.states import LIVE_ITEM_STATUSES, ItemProtection
from drsite.failover.wire import (
    BOOK_FORMAT,
    book_patch,
    recovery_book_digest,
    vm_spec_from_dict,
)
from drsite.vault.db.models import Group, Host, Item, NetworkMapping, RecoveryPlan, Site, Vm
from drsite.vault.storeacl import BOOK_FIELDS, on_site_store, serves_store, site_store_fingerprint

log = logging.getLogger(__name__)

# what break-glass may fail over: protected items, and those a failover was running on when
# the vault was lost (the agent resumes or finishes it)
BOOK_STATUSES = frozenset({ItemProtection.PROTECTED, ItemProtection.FAILING_OVER})
# whose sync journals the store host keeps: a failover may still replay them (the others'
# are deleted there: unprotected, committed, re-protected; see the agent's storeservice)
JOURNAL_STATUSES = LIVE_ITEM_STATUSES | {ItemProtection.FAILING_OVER, ItemProtection.FAILED_OVER}


# (store host, fingerprint of its items' rows, the small tables' rows) -> (book, digest):
# a beat where nothing the book holds changed reads one row of items, not every item
_BOOKS: OrderedDict[tuple[str, str, str], tuple[dict[str, Any], str]] = OrderedDict()
# the same books by digest: what an agent that sends one of these holds, to patch it
_BY_DIGEST: OrderedDict[str, dict[str, Any]] = OrderedDict()
_CACHE = threading.Lock()
KNOWN_BOOKS = 8


def _vm_spec(item_id: str, vm_name: str | None, info: dict[str, Any] | None,
             kept_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The VM's configuration as its host last reported it (``vm_name``, ``info``: its
    inventory row, None when gone), else as kept in the item; None without either. The
    agent takes a book whole or not at all: one VM's bad inventory must not cost the site's
    other items their entries."""
    kept = dict(kept_spec) if kept_spec else None
    candidates: list[dict[str, Any] | None] = [kept]
    if vm_name is not None:
        info = info or {}
        candidates.insert(0, {
            "name": vm_name, "vcpus": info.get("vcpus") or 1,
            "memory_mib": info.get("memory_mib") or 512,
            "nics": [{"network": n.get("network"), "mac": n.get("mac"), "ip": n.get("ip")}
                     for n in info.get("nics") or [] if isinstance(n, dict)],
            "disks": [{"disk_id": d.get("disk_id"), "size": d.get("size")}
                      for d in info.get("disks") or [] if isinstance(d, dict)]})
    for spec in candidates:
        if spec is None:
            continue
        try:
            vm_spec_from_dict(spec)
        except InvalidInput as e:
            # built whenever the book changes: debug, not a warning per build
            log.debug("item %s: VM configuration left out of the recovery book: %s", item_id, e)
            continue
        return spec
    return None


def _small_rows(s: Session, site_id: int) -> tuple[dict[int, str], list[NetworkMapping],
                                                   list[RecoveryPlan]]:
    sites = {st.id: st.name for st in s.scalars(select(Site))}
    maps = list(s.scalars(select(NetworkMapping).where(NetworkMapping.recovery_site_id == site_id)
                          .order_by(NetworkMapping.source_network, NetworkMapping.id)))
    plans = list(s.scalars(select(RecoveryPlan).order_by(RecoveryPlan.name)))
    return sites, maps, plans


def book_digest(s: Session, host: Host) -> tuple[dict[str, Any], str]:
    """:func:`book` and its digest, built once per change of what it holds: the key is the
    fingerprint of the site-store items' rows (with their VM and source host rows: one
    statement, one row) and the few rows of sites, network maps and plans."""
    fp = site_store_fingerprint(s, host.site_id, BOOK_FIELDS)
    sites, maps, plans = _small_rows(s, host.site_id)
    small = json.dumps([sorted(sites.items()),
                        [(m.source_site_id, m.source_network, m.recovery_network, m.test_network,
                          m.ip_rule) for m in maps],
                        [(p.name, p.spec) for p in plans]], sort_keys=True, default=str)
    key = (host.id, fp, small)
    with _CACHE:
        hit = _BOOKS.get(key)
        if hit is not None:
            _BOOKS.move_to_end(key)
            return hit
    doc = _build(s, host, sites, maps, plans)
    out = (doc, recovery_book_digest(doc))
    with _CACHE:
        _BOOKS[key] = out
        _BY_DIGEST[out[1]] = doc
        _BY_DIGEST.move_to_end(out[1])
        while len(_BOOKS) > KNOWN_BOOKS:
            _BOOKS.popitem(last=False)
        while len(_BY_DIGEST) > KNOWN_BOOKS:
            _BY_DIGEST.popitem(last=False)
    return out


def book(s: Session, host: Host) -> dict[str, Any]:
    """The recovery book of the store ``host`` serves (format: ``failover.wire``). A fixed
    number of queries, whatever the number of items; built only when what it holds changed."""
    return book_digest(s, host)[0]


def _build(s: Session, host: Host, sites: dict[int, str], maps_rows: list[NetworkMapping],
           plan_rows: list[RecoveryPlan]) -> dict[str, Any]:
    rows = sorted(s.execute(
        select(Item.id, Item.status, Item.host_id, Item.vm_id, Item.vm_name,
               Item.target_site_id, Item.vm_spec, Vm.name, Vm.info, Host.site_id)
        .join(Group, Group.id == Item.group_id)
        .outerjoin(Vm, (Vm.host_id == Item.host_id) & (Vm.vm_id == Item.vm_id))
        .outerjoin(Host, Host.id == Item.host_id)
        .where(on_site_store(host.site_id))).all(), key=lambda r: str(r[0]))
    maps: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for m in maps_rows:
        maps.setdefault((m.source_site_id, m.recovery_site_id), []).append(
            {"source": m.source_network, "recovery": m.recovery_network,
             "test": m.test_network, "ip_rule": dict(m.ip_rule)})
    items: dict[str, Any] = {}
    for item_id, status, _host_id, vm_id, vm_name, target, kept, vname, info, src_site in rows:
        if status not in BOOK_STATUSES or src_site is None:
            continue  # nothing to recover from without its source host
        spec = _vm_spec(item_id, vname, info, kept)
        if spec is None:
            continue  # nothing to recover from without its configuration
        items[item_id] = {"vm_id": vm_id, "vm_name": vm_name, "vm_spec": spec,
                          "source_site": sites.get(src_site, str(src_site)),
                          "recovery_site": sites.get(target, str(target)),
                          "network_map": maps.get((src_site, target), [])}
    by_name = {entry["vm_name"]: item_id for item_id, entry in items.items()}
    plans: dict[str, Any] = {}
    for p in plan_rows:
        groups, actions = [], []
        for g in p.spec.get("groups", []):
            ids = [by_name[v] for v in g.get("vms", []) if v in by_name]
            if ids:
                groups.append({"name": g.get("name"), "items": ids})
            actions += [f"{g.get('name')}: {kind} action" for kind in ("pre", "post")
                        for _ in g.get(kind) or []]
        if groups:
            plans[p.name] = {"groups": groups, "actions": actions}
    return {"format": BOOK_FORMAT, "site": sites.get(host.site_id, str(host.site_id)),
            "items": items, "plans": plans,
            "sync_journals": sorted(r[0] for r in rows if r[1] in JOURNAL_STATUSES)}


def reply_fields(s: Session, host: Host, agent_digest: str | None, *,
                 patches: bool = False) -> dict[str, Any]:
    """For a store-serving host whose book differs: ``{"recovery_book_patch": patch}`` when
    it takes patches and holds a book this process built recently, else
    ``{"recovery_book": book}``; nothing when its book is current."""
    if not serves_store(s, host):
        return {}   # a store_url without the site's store role is only a claim (storerole)
    doc, digest = book_digest(s, host)
    if agent_digest is not None and agent_digest == digest:
        return {}
    if patches and agent_digest:
        with _CACHE:
            held = _BY_DIGEST.get(agent_digest)
        if held is not None:
            return {"recovery_book_patch": book_patch(held, doc, agent_digest, digest)}
    return {"recovery_book": doc}
