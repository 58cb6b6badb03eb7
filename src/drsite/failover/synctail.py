"""What a synchronous item's recovery site holds beyond its newest point, and how a failover
to "latest" adds it to the point's images.

:class:`SyncTail` is the contract both kinds implement:

- :class:`JournalTail` — a file VM's sync journal (``tracking.syncjournal``): the entries
  after the point's mark, replayed in order;
- :class:`OverlayTail` — a QEMU VM's sync overlays (``sitestore.syncoverlay``): the overlay
  of the run the point's mark names holds the newest content of every sector written after
  that run began (at or before the point's seal), so its allocated sectors written over the
  point's images give the disks as the guest last saw them acknowledged. A rotated run's
  overlay is a chain of *layers* (``run.json`` ``layers``, oldest first; each receives the
  writes from its switch to the next one's): applied one after the other, in that order.

Responsible for: coverage (may this tail be applied to that point?) and applying it. Not
responsible for: choosing the point or moving images (``failover.actions``), stopping
writers (the agent stops the overlay daemon / disconnects the journal first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from drsite.core.errors import PermanentError
from drsite.hypervisors.qemu.tools import run_tool
from drsite.tracking.syncjournal import Coverage, SyncJournal, replay


@runtime_checkable
class SyncTail(Protocol):
    """The recovery site's record of a synchronous item's writes after a point's seal."""

    def coverage(self, stream: str | None, mark: int | None) -> Coverage:
        """Whether everything acknowledged after a point sealed at ``(stream, mark)`` is
        here (``ok``), or why not (the RPO is then the point's)."""
        ...

    def apply(self, stream: str, mark: int, images: dict[str, Path]) -> tuple[int, int]:
        """Write it over the raw ``images`` (disk id → path) and fsync; idempotent. Returns
        (units applied, bytes)."""
        ...

    def describe(self, applied: tuple[int, int], point_id: str, cov: Coverage) -> str:
        """The failover record's note once applied."""
        ...


class JournalTail:
    """A file VM's sync journal as a :class:`SyncTail`."""

    def __init__(self, journal: SyncJournal) -> None:
        self.journal = journal

    def coverage(self, stream: str | None, mark: int | None) -> Coverage:
        return self.journal.coverage(stream, mark)

    def apply(self, stream: str, mark: int, images: dict[str, Path]) -> tuple[int, int]:
        return replay(self.journal, mark, images)

    def describe(self, applied: tuple[int, int], point_id: str, cov: Coverage) -> str:
        n, nbytes = applied
        return (f"sync journal replayed: {n} write batch(es), {nbytes} bytes after the seal of "
                f"point {point_id} (every write acknowledged up to entry {cov.last})")


def run_layers(rec: dict[str, Any]) -> list[int]:
    """The layers of a run (``run.json``), oldest first (a run never rotated: ``[0]``)."""
    return [int(n) for n in rec.get("layers") or [0]]


def layer_path(run_dir: Path, disk_id: str, n: int) -> Path:
    """Layer ``n`` of a disk's overlay: ``<disk>.qcow2`` (the first), ``<disk>.L<n>.qcow2``."""
    return run_dir / (f"{disk_id}.qcow2" if n == 0 else f"{disk_id}.L{n}.qcow2")


class OverlayTail:
    """A QEMU VM's sync overlays (``<root>/<item>/<stream>/<disk>.qcow2`` + ``run.json``)."""

    def __init__(self, item_dir: Path) -> None:
        self.dir = Path(item_dir)

    def _runs(self) -> list[dict[str, object]]:
        out = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                try:
                    rec = json.loads((p / "run.json").read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return sorted(out, key=lambda r: float(str(r.get("created", 0))))

    def coverage(self, stream: str | None, mark: int | None) -> Coverage:
        runs = self._runs()
        if not runs:
            return Coverage(False, 0, "no sync overlay is here")
        if stream is None or mark is None:
            return Coverage(False, 0, "the point was not sealed in synchronous mode")
        names = [str(r["stream"]) for r in runs]
        if stream not in names:
            return Coverage(False, 0, f"the sync overlay of run {stream[:8]} is gone")
        return Coverage(True, len(names) - 1 - names.index(stream))

    def apply(self, stream: str, mark: int, images: dict[str, Path]) -> tuple[int, int]:
        rd = self.dir / stream
        try:
            rec = json.loads((rd / "run.json").read_text())
        except (OSError, ValueError) as e:
            raise PermanentError(f"sync overlay {rd}: {e}") from e
        nbytes = 0
        for disk_id in rec["disks"]:
            if disk_id not in images:
                raise PermanentError(f"sync overlay {rd} has disk {disk_id!r}, which the "
                                     "recovery images lack")
        for n in run_layers(rec):   # oldest first: a later layer's sectors are newer
            for disk_id in rec["disks"]:
                ov = layer_path(rd, disk_id, n)
                # the overlay's allocated sectors (data or written zeros) onto the image: point
                # the overlay at the image (header only), then commit it down (idempotent)
                run_tool(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b",
                          str(Path(images[disk_id]).absolute()), "-F", "raw", str(ov)])
                extents = json.loads(run_tool(["qemu-img", "map", "--output=json", "-f",
                                               "qcow2", str(ov)], timeout=600))
                nbytes += sum(int(e["length"]) for e in extents
                              if e.get("present") and int(e.get("depth", 0)) == 0)
                run_tool(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(ov)],
                         timeout=3600)
        return len(rec["disks"]), nbytes

    def describe(self, applied: tuple[int, int], point_id: str, cov: Coverage) -> str:
        n, nbytes = applied
        later = (f"; {cov.last} later run(s) began after a suspension and are not applied "
                 "(their points were not committed)") if cov.last else ""
        return (f"sync overlay applied: {n} disk(s), {nbytes} bytes written after the run that "
                f"point {point_id} was sealed in began (every write the guest had "
                f"acknowledged while the mirror ran){later}")
