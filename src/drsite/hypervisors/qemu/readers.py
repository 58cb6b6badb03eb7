""":class:`~drsite.hypervisors.contract.DiskReader` over an NBD export of a QEMU runner.

The engine reads with several threads at once (``read_batches``), and an :class:`NbdClient` is
one connection for one thread: the reader keeps a small pool of connections, each used by one
thread at a time, opened on demand and all closed by :meth:`NbdDiskReader.close`.

Responsible for: connections, reads, allocation map. Not responsible for: creating or removing
the export (the driver does; ``on_close`` lets it remove an export made for this reader).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from drsite.core.errors import InvalidInput
from drsite.core.extents import ExtentList
from drsite.hypervisors.qemu.nbd import BASE_ALLOCATION, NbdClient

T = TypeVar("T")


class NbdDiskReader:
    """Reads one export on the NBD unix socket ``socket_path``."""

    def __init__(self, socket_path: str, export: str, size: int, *,
                 on_close: Callable[[], None] | None = None, timeout: float = 60.0) -> None:
        self._path = socket_path
        self._export = export
        self._size = size
        self._timeout = timeout
        self._on_close = on_close
        self._idle: list[NbdClient] = []
        self._all: list[NbdClient] = []
        self._lock = threading.Lock()
        self._closed = False
        self._put(self._connect())  # fail early if the export is not there

    @property
    def size(self) -> int:
        return self._size

    @property
    def socket_path(self) -> str:
        return self._path

    @property
    def export(self) -> str:
        return self._export

    def _connect(self) -> NbdClient:
        c = NbdClient.connect_unix(self._path, self._export, meta_contexts=[BASE_ALLOCATION],
                                   timeout=self._timeout)
        with self._lock:
            self._all.append(c)
        return c

    def _take(self) -> NbdClient:
        with self._lock:
            if self._closed:
                raise InvalidInput("the disk reader is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _put(self, c: NbdClient) -> None:
        with self._lock:
            self._idle.append(c)

    def _on_connection(self, fn: Callable[[NbdClient], T]) -> T:
        """``fn`` on a pooled connection, which goes back to the pool only if ``fn`` returned:
        after any error it is broken (or at least suspect) and closed, never reused."""
        c = self._take()
        try:
            out = fn(c)
        except BaseException:
            c.close()
            raise
        self._put(c)
        return out

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset < 0 or offset + len(buf) > self._size:
            raise InvalidInput(f"read [{offset}, {offset + len(buf)}) passes the end of the "
                               f"disk ({self._size} bytes)")
        self._on_connection(lambda c: c.readinto(offset, buf))

    def readv(self, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              buf: memoryview) -> None:
        """Read many extents into ``buf`` (concatenated, in order), pipelined on one pooled
        connection (:class:`~drsite.hypervisors.contract.VectorDiskReader`)."""
        offs, lens = offsets.tolist(), lengths.tolist()
        if offs and (min(offs) < 0 or max(o + n for o, n in zip(offs, lens, strict=True))
                     > self._size):
            raise InvalidInput(f"a read passes the end of the disk ({self._size} bytes)")
        self._on_connection(lambda c: c.read_many(offs, lens, buf))

    def read_extents(self, extents: ExtentList, *, inflight: int = 16,
                     request_size: int | None = None) -> list[tuple[int, memoryview]]:
        """Read many extents pipelined on one connection (``inflight`` requests outstanding)."""
        return self._on_connection(lambda c: list(
            c.read_extents(extents, inflight=inflight, request_size=request_size)))

    def data_extents(self) -> ExtentList:
        return self._on_connection(lambda c: c.allocated_extents())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._all, self._idle = self._all, [], []
        for c in conns:
            c.close()
        if self._on_close is not None:
            self._on_close()
