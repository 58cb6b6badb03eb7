"""The object-store contract every recovery-store backend implements.

A backend stores immutable objects under ``/``-separated keys (see :func:`validate_key`). It
knows nothing of recovery points: the point format lives in :mod:`drsite.store.format`.
Backends raise only :mod:`drsite.core.errors`: ``ObjectNotFound``, ``ObjectExists``,
``InvalidInput`` (bad key), ``AuthError`` (permanent); ``NetworkError``, ``LowDiskSpace``,
``TransientError`` (transient, retried by the wrapper above).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from drsite.core.errors import InvalidInput

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
MAX_KEY = 512


def validate_key(key: str) -> str:
    """Keys are 1-512 chars of ``/``-separated segments ``[A-Za-z0-9._-]``; no empty segment, no
    ``.`` or ``..``, no leading ``/``. Anything else is refused before it reaches a backend."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise InvalidInput(f"invalid object key {key!r}")
    for seg in key.split("/"):
        if not _SEGMENT.fullmatch(seg) or seg in (".", "..") or ".." in seg:
            raise InvalidInput(f"invalid object key {key!r}",
                               hint="Keys are '/'-separated names of letters, digits, '.', '_', '-'.")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a valid key optionally ending in ``/``."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


@runtime_checkable
class ObjectStore(Protocol):
    """Immutable objects under string keys.

    Responsible for: atomic, durable puts (a reader sees the whole object or nothing; on return
    the object survives a crash), reads, listing, deletes. Not responsible for: hashing or
    verifying content (the repository does), retries (a wrapper does), encryption (a wrapper).
    """

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store ``data`` under ``key`` atomically and durably.

        Without ``overwrite`` an existing key raises ``ObjectExists`` (callers that retry a put
        of content-addressed data treat that as success). With ``overwrite`` the object is
        replaced atomically (used only for small mutable markers).
        """
        ...

    def get(self, key: str) -> bytes:
        """The whole object. Raises ``ObjectNotFound``."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; short only at the end of the object."""
        ...

    def exists(self, key: str) -> bool:
        ...

    def size(self, key: str) -> int:
        """Object size in bytes. Raises ``ObjectNotFound``."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key counts as deleted (idempotent)."""
        ...
