"""Committed points are immutable on a store server: which remote overwrites and deletes remain.

Under ``items/<item>/`` (see ``store/design.md`` for the layout), a *remote* client — whoever
it is, the item's own source host and the store's own host included — may:

- **overwrite** only ``seq``, and only with a number not below the stored one (the writer's
  high-water mark; lowering it would let a point id be reused);
- **delete** ``staging/<cycle>`` (commit and abort drop their marker), and ``packs/<cycle>/…``
  / ``maps/<cycle>/…`` of a cycle that is *staged* (its marker exists) and *not committed* (no
  manifest names the cycle): a writer aborting its own staged cycle;
- **delete** an object the server itself finds damaged (a pack/map whose blake3 does not match
  its key, a manifest that fails its checksum or — with the item's point key — its MAC): the
  writer's quarantine, which first copies it under ``quarantine/``;
- nothing else: manifests, packs and maps of committed points, ``quarantine/``, ``generation``
  and any other key are never overwritten or deleted remotely (403 ``forbidden``).

Retention and GC therefore run on the store's own agent, locally (``retention`` commands with
``store_side``, see ``agent/storeacl.py``). What the ACL allows first (who may write an item at
all) is :mod:`drsite.sitestore.acl`.

Responsible for: these rules, evaluated against the store's current content. Not responsible
for: identity (``acl``), atomicity between the check and the write (the only writer of an item
is its source host, one cycle at a time; a race can only make a legal abort fail).
"""

from __future__ import annotations

import json
import threading

from drsite.core.errors import CorruptData, Forbidden, ObjectNotFound, PointNotAuthentic
from drsite.store.auth import MANIFEST, PointAuth
from drsite.store.contract import ObjectStore
from drsite.store.format import canonical_json, hex_hash

_HINT = ("Committed recovery points are immutable on the store; retention and GC run on the "
         "store's own agent (the vault sends it 'retention').")


class CommittedCycles:
    """Cycle ids of committed points, per item (manifests are immutable: cached forever)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, str]] = {}   # item → point id → cycle id

    def committed(self, store: ObjectStore, item_id: str, cycle_id: str) -> bool:
        prefix = f"items/{item_id}/points/"
        with self._lock:
            seen = dict(self._seen.get(item_id, {}))
        for key in store.list(prefix):
            pid = key.rsplit("/", 1)[-1]
            if pid not in seen:
                try:
                    body = json.loads(store.get(key))["body"]
                    seen[pid] = str(body["cycle_id"])
                except ObjectNotFound:
                    continue
                except (ValueError, KeyError, TypeError):
                    return True   # an unreadable manifest might name it: refuse the delete
            if seen[pid] == cycle_id:
                with self._lock:
                    self._seen.setdefault(item_id, {}).update(seen)
                return True
        with self._lock:
            self._seen.setdefault(item_id, {}).update(seen)
        return False


def _damaged(store: ObjectStore, key: str, rel: str, auth: PointAuth | None) -> bool:
    """Whether the object at ``key`` is missing or fails the check its kind has."""
    try:
        data = store.get(key)
    except ObjectNotFound:
        return True   # nothing to protect: the delete is a no-op
    except CorruptData:
        return True
    if rel.startswith(("packs/", "maps/")):
        return hex_hash(data) != rel.rsplit("/", 1)[-1]
    try:
        env = json.loads(data)
        canon = canonical_json(env["body"])
        if env.get("blake3") != hex_hash(canon):
            return True
        if auth is not None:
            auth.check(MANIFEST, canon, env, "manifest")
    except (ValueError, KeyError, TypeError, PointNotAuthentic):
        return True
    return False


def check_remote_change(store: ObjectStore, item_id: str, rel: str, op: str,
                        body: bytes | None, auth: PointAuth | None,
                        cycles: CommittedCycles) -> None:
    """Raise ``Forbidden`` unless a remote ``op`` (``overwrite`` or ``delete``) of
    ``items/<item_id>/<rel>`` is one the rules above allow."""
    key = f"items/{item_id}/{rel}"
    if op == "overwrite":
        if rel == "seq" and body is not None:
            try:
                new = int(body.decode().strip())
            except (UnicodeDecodeError, ValueError):
                raise Forbidden(f"{key}: the sequence marker must be a number") from None
            try:
                old = int(store.get(key).decode().strip() or 0)
            except ObjectNotFound:
                old = 0
            except (UnicodeDecodeError, ValueError):
                old = 0   # a damaged marker: any number repairs it
            if new < old:
                raise Forbidden(f"{key}: the sequence marker never goes down ({old} → {new})",
                                hint=_HINT)
            return
        raise Forbidden(f"{key} cannot be overwritten remotely: recovery-store objects are "
                        "immutable (only the 'seq' marker may grow)", hint=_HINT)
    parts = rel.split("/")
    if len(parts) == 2 and parts[0] == "staging":
        return
    if len(parts) == 3 and parts[0] in ("packs", "maps"):
        cycle = parts[1]
        try:
            store.size(f"items/{item_id}/staging/{cycle}")
            staged = True
        except ObjectNotFound:
            staged = False
        if staged and not cycles.committed(store, item_id, cycle):
            return   # aborting a staged, uncommitted cycle
    if len(parts) >= 2 and parts[0] in ("packs", "maps", "points") \
            and _damaged(store, key, rel, auth):
        return       # quarantine of a damaged object (it was copied aside first)
    raise Forbidden(f"{key} cannot be deleted remotely: it belongs to a committed recovery "
                    "point (or is not a staged cycle's object)", hint=_HINT)
