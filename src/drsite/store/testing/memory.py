"""``MemoryObjectStore``: the object-store contract in a dict, thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from drsite.core.errors import InvalidInput, ObjectExists, ObjectNotFound
from drsite.store.contract import validate_key, validate_prefix


class MemoryObjectStore:
    """Objects in memory behind one lock. Responsible for the contract's semantics only;
    nothing is durable. ``objects`` is exposed so tests can inspect or damage objects."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        validate_key(key)
        blob = bytes(data)
        with self._lock:
            if not overwrite and key in self.objects:
                raise ObjectExists(f"object {key!r} already exists")
            self.objects[key] = blob

    def _blob(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            blob = self.objects.get(key)
        if blob is None:
            raise ObjectNotFound(f"object {key!r} not found")
        return blob

    def get(self, key: str) -> bytes:
        return self._blob(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} of object {key!r}")
        return self._blob(key)[offset:offset + length]

    def exists(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return key in self.objects

    def size(self, key: str) -> int:
        return len(self._blob(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        with self._lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
        return iter(keys)

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self.objects.pop(key, None)
