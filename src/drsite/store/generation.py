"""The split-brain guard: one generation number per protected item, kept in its recovery store.

``items/<item_id>/generation`` is a small JSON object replaced atomically (``put(...,
overwrite=True)``)::

    {"body": {"item_id", "generation", "primary", "promoted_at", "reason", "failover_id"},
     "blake3": <hex blake3 of the canonical body>, "mac": <keyed blake3, store/auth.py>}

With the item's point key (``GenerationStore(store, auth)``) records are written with a MAC and
a record without a valid one is refused (:class:`~drsite.core.errors.PointNotAuthentic`), so
someone with the store's files or the bucket's credentials can neither fence the primary nor
un-fence a demoted one.

``primary`` is the site name allowed to write the item's data; ``generation`` grows by one at
every promotion (failover) and at every demotion back (cancel): a number is never reused. A
writer that holds generation ``g`` is *fenced* (:class:`~drsite.core.errors.Fenced`) when the
store says ``> g``; the replication engine checks this before every step and again right before
committing a point (``ItemReplicator(generation=...)``).

Responsible for: reading, validating and advancing the record; the fencing and direction checks.
Not responsible for: serialising two promoters (the object-store contract has no conditional put;
the caller — the vault's job engine — runs one failover action per item at a time; see
``design.md``), or for stopping a fenced writer's VM (the failover actions do).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

from drsite.core.errors import CorruptData, Fenced, InvalidInput, ObjectNotFound
from drsite.core.model import validate_name
from drsite.store.auth import GENERATION, PointAuth
from drsite.store.contract import ObjectStore


def generation_key(item_id: str) -> str:
    return f"items/{validate_name('item', item_id)}/generation"


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class GenerationRecord:
    """Who may write an item, as of which promotion."""

    item_id: str
    generation: int
    primary: str
    promoted_at: float
    reason: str = ""
    failover_id: str | None = None

    def body(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "generation": self.generation, "primary": self.primary,
                "promoted_at": self.promoted_at, "reason": self.reason,
                "failover_id": self.failover_id}

    def to_bytes(self, auth: PointAuth | None = None) -> bytes:
        body = self.body()
        env: dict[str, Any] = {"body": body, "blake3": blake3(_canon(body)).hexdigest()}
        if auth is not None:
            env["mac"] = auth.mac(GENERATION, _canon(body))
        return _canon(env)

    @staticmethod
    def from_bytes(data: bytes, key: str, auth: PointAuth | None = None) -> GenerationRecord:
        try:
            env = json.loads(data)
            body = env["body"]
            ok = env.get("blake3") == blake3(_canon(body)).hexdigest()
            if ok and auth is not None:
                auth.check(GENERATION, _canon(body), env, f"generation record {key}")
            rec = GenerationRecord(str(body["item_id"]), int(body["generation"]),
                                   str(body["primary"]), float(body["promoted_at"]),
                                   str(body.get("reason", "")), body.get("failover_id"))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptData(f"generation record {key} is unreadable: {exc}",
                              hint="Restore it from the vault's database before any failover "
                                   "or replication of this item.") from exc
        if not ok:
            raise CorruptData(f"generation record {key} failed its checksum",
                              hint="Restore it from the vault's database before any failover "
                                   "or replication of this item.")
        return rec


class GenerationStore:
    """The generation records of the items of one recovery store."""

    def __init__(self, store: ObjectStore, auth: PointAuth | None = None) -> None:
        self.store = store
        self.auth = auth

    def read(self, item_id: str) -> GenerationRecord | None:
        """The item's record, None if it has none yet. ``CorruptData`` if damaged."""
        key = generation_key(item_id)
        try:
            data = self.store.get(key)
        except ObjectNotFound:
            return None
        rec = GenerationRecord.from_bytes(data, key, self.auth)
        if rec.item_id != item_id:
            raise CorruptData(f"generation record {key} names item {rec.item_id!r}")
        return rec

    def current(self, item_id: str) -> int:  # 0: no record (engines then hold 1)
        """The item's generation; 0 when it has no record (never promoted, never protected
        with a guard)."""
        rec = self.read(item_id)
        return rec.generation if rec else 0

    def _put(self, rec: GenerationRecord) -> GenerationRecord:
        key = generation_key(rec.item_id)
        self.store.put(key, rec.to_bytes(self.auth), overwrite=True)
        back = self.read(rec.item_id)  # read back: the record we rely on is the stored one
        if back != rec:
            raise Fenced(f"generation record {key} changed under us (another promoter?): "
                         f"expected {rec.generation}, found {back.generation if back else None}")
        return rec

    def ensure(self, item_id: str, primary: str, *, now: float, at_least: int = 1,
               reason: str = "protection enabled") -> GenerationRecord:
        """Create the item's record (generation ``at_least``, ``primary``) if it has none;
        return the existing one otherwise (idempotent). ``at_least`` carries a lineage's
        generation into a new item (re-protect)."""
        validate_name("site", primary)
        rec = self.read(item_id)
        if rec is not None:
            return rec
        return self._put(GenerationRecord(item_id, max(1, at_least), primary, now, reason))

    def advance(self, item_id: str, new_primary: str, *, now: float, failover_id: str,
                reason: str, at_least: int = 0) -> GenerationRecord:
        """Record a promotion of ``new_primary`` (or a demotion back): generation + 1, at least
        ``at_least``. Idempotent per ``failover_id`` + ``reason``: when the stored record was
        written by the same action it is returned unchanged, so a resumed action never advances
        twice."""
        validate_name("site", new_primary)
        rec = self.read(item_id)
        if rec is not None and rec.failover_id == failover_id and rec.reason == reason \
                and rec.primary == new_primary:
            return rec
        # no record = generation 1: every engine starts at 1, so the first promotion must be
        # 2 or the old primary would not be fenced by it
        nxt = max((rec.generation if rec else 1) + 1, at_least)
        return self._put(GenerationRecord(item_id, nxt, new_primary, now, reason, failover_id))


def check_not_fenced(store: ObjectStore, item_id: str, my_generation: int,
                     auth: PointAuth | None = None) -> None:
    """Raise :class:`Fenced` when the item's stored generation is newer than ``my_generation``.

    Equal (or no record, generation 0) passes. The replication engine calls this before each
    step and before each commit; anything that writes an item's data should.
    """
    if my_generation < 0:
        raise InvalidInput(f"generation {my_generation} is negative")
    rec = GenerationStore(store, auth).read(item_id)
    if rec is not None and rec.generation > my_generation:
        raise Fenced(f"item {item_id}: this writer holds generation {my_generation} but "
                     f"{rec.primary!r} was promoted to generation {rec.generation} "
                     f"({rec.reason or 'failover'}); it must not write")


def check_replication_direction(store: ObjectStore, item_id: str, source_site: str,
                                my_generation: int | None = None,
                                auth: PointAuth | None = None) -> GenerationRecord | None:
    """The check a caller runs before a resync (or any replication) of ``item_id`` from
    ``source_site``: the record must name ``source_site`` as primary, and ``my_generation``
    (when given) must not be older than the record. Raises :class:`Fenced` otherwise, so a
    resync never copies a demoted side over the promoted one. Returns the record (None when
    the item has none: nothing was ever promoted, any direction is the first one)."""
    rec = GenerationStore(store, auth).read(item_id)
    if rec is None:
        return None
    if rec.primary != source_site:
        raise Fenced(f"item {item_id}: {source_site!r} is not the primary (generation "
                     f"{rec.generation} belongs to {rec.primary!r}); replication from it "
                     "would run in the wrong direction")
    if my_generation is not None and rec.generation > my_generation:
        check_not_fenced(store, item_id, my_generation, auth)
    return rec
