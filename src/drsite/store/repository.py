"""The recovery points of one protected item: :class:`Repository`, the facade callers use.

A repository is its :class:`~drsite.store.catalog.Catalog` (points, markers, verified reads)
plus the life of a cycle (:meth:`Repository.begin`, :meth:`~Repository.resume`,
:meth:`~Repository.abort`; writing and committing is :class:`~drsite.store.writer.PointWriter`),
reads (:class:`~drsite.store.reader.PointReader`, :meth:`~Repository.diff`) and upkeep
(retention, GC, verification, quarantine: :mod:`drsite.store.maintenance`).

Invariants (the module that keeps each is named):
- a point is visible only after its manifest is put, and the manifest is put only after every
  object it references (directly or through maps) is durably stored (``writer``);
- every object is content-addressed and verified on read (``format``, ``catalog``);
- GC keeps every object reachable from a manifest, everything of a staged cycle, and what the
  base point of a staged cycle references (``maintenance``);
- point ids are never reused (``writer``: the ``seq`` high-water mark).

See ``store/design.md`` for the on-store layout, the reasons and the costs.
"""

from __future__ import annotations

import time

from drsite.core.errors import Conflict, InvalidInput, ObjectExists
from drsite.core.extents import ExtentList
from drsite.core.model import validate_name
from drsite.core.retention import RetentionRule
from drsite.store import maintenance
from drsite.store.catalog import Catalog
from drsite.store.format import KINDS, canonical_json
from drsite.store.maintenance import GcReport, VerifyReport
from drsite.store.reader import PointReader, diff_points
from drsite.store.writer import PointWriter, reopen


class Repository(Catalog):
    """Recovery points of one protected item over an object store.

    Responsible for: the on-store format, atomic visibility of points, verified reads,
    retention/GC that never drops data a kept point or a staged cycle needs, resumable cycles.
    Not responsible for: retries (wrap the store in ``RetryingStore``), locking between two
    writers of the same item (the engine runs one cycle per item at a time), scheduling.
    """

    # -- cycles ------------------------------------------------------------------------------

    def begin(self, cycle_id: str, *, base: str | None, disk_sizes: dict[str, int],
              kind: str) -> PointWriter:
        """Stage a new cycle (writes its marker first) and return its writer.

        ``base=None`` makes a full point (unwritten ranges are zero); otherwise unwritten ranges
        come from ``base``. If ``cycle_id`` is already staged with the same parameters this is
        :meth:`resume`; a committed ``cycle_id`` raises ``Conflict``.
        """
        validate_name("cycle", cycle_id)
        if kind not in KINDS:
            raise InvalidInput(f"unknown point kind {kind!r}; expected one of {KINDS}")
        for d, sz in disk_sizes.items():
            validate_name("disk", d)
            if sz < 0:
                raise InvalidInput(f"disk {d}: negative size {sz}")
        if base is not None:
            self._load_manifest(base)  # must exist and be readable
        if self.committed_cycle(cycle_id) is not None:
            raise Conflict(f"cycle {cycle_id} of {self.item_id} is already committed",
                           hint="A cycle commits once: use the point it made.")
        sizes = {d: int(s) for d, s in sorted(disk_sizes.items())}
        marker = {"cycle_id": cycle_id, "base": base, "kind": kind, "disk_sizes": sizes,
                  "started_at": time.time()}
        try:
            self.store.put(self.key(f"staging/{cycle_id}"), canonical_json(marker))
        except ObjectExists:
            w = self.resume(cycle_id)
            if w is None:
                raise Conflict(f"cycle {cycle_id} of {self.item_id} is already committed") \
                    from None
            if w.base != base or w.disk_sizes != sizes or w.kind != kind:
                w.close()
                raise Conflict(f"cycle {cycle_id} of {self.item_id} is staged with other "
                               f"parameters (base {w.base}, kind {w.kind})",
                               hint="Abort the staged cycle or resume it as it is.") from None
            return w
        return PointWriter(self, cycle_id, base, sizes, kind)

    def resume(self, cycle_id: str) -> PointWriter | None:
        """Rebuild the writer of a staged cycle from its marker and its pack trailers.

        Returns None if the cycle is not staged (never begun, aborted or committed; a marker left
        behind by a commit that crashed after its manifest is removed here).
        """
        validate_name("cycle", cycle_id)
        m = self._marker(cycle_id)
        if m is None:
            return None
        if self.committed_cycle(cycle_id) is not None:
            self.store.delete(self.key(f"staging/{cycle_id}"))
            return None
        return reopen(self, cycle_id, m)

    def abort(self, cycle_id: str) -> None:
        """Drop a staged cycle: its packs and maps, then its marker. A committed cycle keeps its
        objects (only a stale marker is removed). Idempotent."""
        validate_name("cycle", cycle_id)
        if self.committed_cycle(cycle_id) is None:
            for rel in self._list(f"packs/{cycle_id}/") + self._list(f"maps/{cycle_id}/"):
                self.store.delete(self.key(rel))
        self.store.delete(self.key(f"staging/{cycle_id}"))

    # -- reads -------------------------------------------------------------------------------

    def reader(self, point_id: str, disk_id: str) -> PointReader:
        """A verified random-access reader of one disk of a committed point."""
        body = self._load_manifest(point_id)
        return PointReader(self, point_id, disk_id, self._disk(body, disk_id))

    def diff(self, a: str | None, b: str, disk_id: str) -> ExtentList:
        """Ranges of disk ``disk_id`` that may differ between points ``a`` and ``b`` (reading
        ``b`` over them turns an image of ``a`` into ``b``; an image must also be resized to
        ``b``'s size). ``a=None`` (or ``a`` without the disk) gives every data extent of ``b``.
        Compares segment maps only: shared segments cost nothing, no data is read."""
        return diff_points(self, a, b, disk_id)

    # -- retention, GC, verification ---------------------------------------------------------

    def delete_point(self, point_id: str) -> None:
        """Remove a point's manifest (its data goes at the next :meth:`gc`). Idempotent."""
        maintenance.delete_point(self, point_id)

    def apply_retention(self, rule: RetentionRule, now: float,
                        pinned: set[str] | frozenset[str] = frozenset(), *,
                        sweep: bool = True) -> list[str]:
        """Delete the points :func:`points_to_keep` drops (never a pinned point, the latest, or
        the base of a staged cycle), then :meth:`gc` (unless not ``sweep``: their data waits
        for a later GC). Returns the deleted point ids."""
        return maintenance.apply_retention(self, rule, now, pinned, sweep=sweep)

    def gc(self) -> GcReport:
        """Delete the objects under ``packs/`` and ``maps/`` that no kept point and no staged
        cycle needs, and staging markers left by commits that crashed after their manifest.
        Safe against a concurrent commit; an unreadable manifest or map aborts the sweep (raises)
        rather than guess what it referenced."""
        return maintenance.gc(self)

    def verify(self, point_id: str) -> VerifyReport:
        """Read and hash-check every object the point references. Damage is reported (key,
        reason, disk ranges it covers), not raised; fix it with :meth:`quarantine` + resync."""
        return maintenance.verify(self, point_id)

    def quarantine(self, key: str) -> None:
        """Move an object (full or repository-relative key) to ``quarantine/<rel>.<ns>`` so the
        key can be written again. A missing object is a no-op."""
        maintenance.quarantine(self, key)

    def storage_bytes(self) -> int:
        """Bytes of every object of this item (quarantine included)."""
        return sum(self.store.size(k) for k in self.store.list(self.prefix))


__all__ = ["Repository"]
