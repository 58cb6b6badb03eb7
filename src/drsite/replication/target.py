"""Where a protected item's recovery points go: the repository plus what the recovery site does
after a commit (hydrate its replica disks) and how it answers a resync's checksum request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from drsite.core.errors import DrsiteError, ObjectNotFound, classify_os_error
from drsite.imagefile import RawImageReader
from drsite.replication.resync import RESYNC_BLOCK, DigestResult, block_digests
from drsite.store.format import PointInfo
from drsite.store.replica import ReplicaHydrator, ReplicaStream
from drsite.store.repository import Repository
from drsite.store.writer import Tee

log = logging.getLogger(__name__)


class RecoveryTarget(Protocol):
    """The recovery side of one protected item, as the replication engine sees it.

    Responsible for: the repository of points, keeping the recovery site's replica current after
    a commit, and the target half of a resync (digests of the latest point). Not responsible for
    deciding when to do any of it.
    """

    @property
    def repo(self) -> Repository: ...

    def after_commit(self, point: PointInfo) -> None:
        """Bring the recovery site's replica to ``point`` (or note that it must catch up)."""
        ...

    def digests(self, disk_id: str, *, from_store: bool, block: int = RESYNC_BLOCK,
                progress: Callable[[int], None] | None = None) -> DigestResult:
        """Per-block digests of the latest committed point of ``disk_id``.

        ``from_store`` forces reading the repository (used after store damage) instead of a
        hydrated replica known to equal the latest point.
        """
        ...

    def replica_point(self) -> str | None:
        """The point the hydrated replica holds, if the target keeps one."""
        ...

    @property
    def runs_retention(self) -> bool:
        """Whether the engine applies retention to this target itself after a commit (False:
        the store's own agent does, as on a site store, where remote clients may not delete
        committed points)."""
        ...


@runtime_checkable
class StreamingTarget(RecoveryTarget, Protocol):
    """A recovery target whose replica can be written while a cycle is shipped, from the same
    buffers (no second pass over the store after the commit)."""

    def open_stream(self, cycle_id: str, base_point_id: str | None,
                    disk_sizes: dict[str, int]) -> Tee | None:
        """A tee for the cycle's point writer (:attr:`PointWriter.tee`), or None when the replica
        cannot take this cycle now (it then catches up from the store after the commit). The
        stream is settled by :meth:`after_commit` of the cycle's point, or by
        :meth:`close_stream`."""
        ...

    def close_stream(self) -> None:
        """Drop an open stream without a commit (the replica's marker makes the next catch-up
        settle what it wrote)."""
        ...

    def after_commit(self, point: PointInfo, *, defer: bool = False) -> None:
        """:meth:`RecoveryTarget.after_commit`; ``defer``: a stream of ``point``'s cycle is
        settled (its images fsynced, the point recorded) later — by :meth:`settle`, which the
        next :meth:`open_stream`, :meth:`close_stream` and ``after_commit`` call first — so a
        cycle that overran its frequency does not hold the next seal back for the device."""
        ...

    def settle(self) -> None:
        """Settle a stream whose settling was deferred (nothing if none). Raises what the
        settling met (the stream is closed either way; the replica keeps its applying marker,
        and the next catch-up settles it from the store)."""
        ...

    def pinned_points(self) -> set[str]:
        """Points retention must keep for the replica (the one it holds, and while it is
        being written — also while a deferred stream is unsettled — the one it came from)."""
        ...


class LocalTarget:
    """A recovery site on this machine: a repository and, optionally, a hydrated replica
    (streamed while a cycle is shipped when it holds the cycle's base, else caught up from the
    store after the commit)."""

    def __init__(self, repo: Repository, hydrator: ReplicaHydrator | None = None, *,
                 stream_replica: bool = True) -> None:
        self._repo = repo
        self.hydrator = hydrator
        # False: the replica always catches up from the store after a commit (reads and verifies
        # every byte it applies, at the cost of a second pass)
        self.stream_replica = stream_replica
        self._stream: ReplicaStream | None = None
        # a committed cycle's stream whose settling was deferred (after_commit(defer=True))
        self._unsettled: tuple[ReplicaStream, PointInfo] | None = None

    @property
    def repo(self) -> Repository:
        return self._repo

    def open_stream(self, cycle_id: str, base_point_id: str | None,
                    disk_sizes: dict[str, int]) -> Tee | None:
        self.close_stream()   # settles a deferred one first
        if self.hydrator is None or not self.stream_replica:
            return None
        self._stream = self.hydrator.stream(cycle_id, base_point_id, disk_sizes)
        return self._stream.write_runs if self._stream is not None else None

    def close_stream(self) -> None:
        self._settle_quietly()
        s, self._stream = self._stream, None
        if s is not None:
            s.close()

    def _settle_quietly(self) -> None:
        """:meth:`settle`, a failure logged (whoever opens or settles next catches up)."""
        try:
            self.settle()
        except DrsiteError as e:
            log.warning("a deferred replica stream was not settled (the next catch-up settles "
                        "it from the store): %s", e)

    def after_commit(self, point: PointInfo, *, defer: bool = False) -> None:
        self._settle_quietly()   # the catch-up below settles what it could not
        s, self._stream = self._stream, None
        if s is not None:
            if s.cycle_id == point.cycle_id:
                if defer:
                    # the images hold the point (written by the tee), unsynced; the marker
                    # says "applying" until settle(), so a crash meanwhile is caught up
                    self._unsettled = (s, point)
                    return
                s.finish(point)
            else:
                s.close()
        if self.hydrator is not None:
            self.hydrator.catch_up()

    def settle(self) -> None:
        u, self._unsettled = self._unsettled, None
        if u is not None:
            try:
                u[0].finish(u[1])   # closes the stream whatever happens
            except OSError as e:
                raise classify_os_error(e, f"settling the replica of point {u[1].point_id}") \
                    from e

    def pinned_points(self) -> set[str]:
        return self.hydrator.pinned() if self.hydrator is not None else set()

    @property
    def runs_retention(self) -> bool:
        return True

    def replica_point(self) -> str | None:
        if self.hydrator is None:
            return None
        current, applying = self.hydrator.state()
        return current if applying is None else None

    def digests(self, disk_id: str, *, from_store: bool, block: int = RESYNC_BLOCK,
                progress: Callable[[int], None] | None = None) -> DigestResult:
        latest = self._repo.latest()
        if latest is None:
            raise ObjectNotFound("no committed recovery point to resync against")
        if not from_store and self.hydrator is not None and self.replica_point() == latest.point_id:
            path = self.hydrator.disk_path(disk_id)
            with RawImageReader(path, latest.disk_sizes[disk_id]) as r:
                return block_digests(r, block=block, progress=progress)
        # block_digests marks unreadable (corrupt) ranges bad, so they are always re-sent
        return block_digests(self._repo.reader(latest.point_id, disk_id), block=block,
                             progress=progress)
