"""``EncryptedStore``: client-side AES-256-GCM encryption of every object, in segments.

Object format (all integers big-endian)::

    header  = b"DRSE" | version u8 (=1) | key-id length u8 | key id (ASCII) | segment size u32
              | plaintext length u64 | nonce prefix (8 random bytes)
    body    = segment 0 | segment 1 | ...     each = AES-GCM(plaintext piece) + 16-byte tag

Segment ``i`` holds plaintext bytes ``[i*S, (i+1)*S)`` (``S`` = segment size, 1 MiB by default;
an empty object has one empty segment). Its nonce is ``nonce prefix | i`` (u32) and its
associated data is ``header | object key``, so: a segment moved to another place, a truncated or
extended object, an edited header (key id, length) and an object copied or renamed to another key
all fail authentication. Ranged reads fetch the header and only the segments they touch.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from drsite.core.errors import AuthError, CorruptData, InvalidInput
from drsite.store.contract import ObjectStore, validate_key
from drsite.store.wrappers import ForwardingStore

MAGIC = b"DRSE"
VERSION = 1
TAG = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FIXED = struct.Struct(">4sBB")          # magic, version, key-id length
_TAIL = struct.Struct(">IQ8s")           # segment size, plaintext length, nonce prefix
HEADER_MAX = _FIXED.size + 64 + _TAIL.size


@dataclass(frozen=True)
class Header:
    key_id: str
    segment: int
    length: int
    nonce_prefix: bytes
    raw: bytes

    @property
    def segments(self) -> int:
        return max(1, -(-self.length // self.segment))

    def stored_size(self) -> int:
        return len(self.raw) + self.length + self.segments * TAG


def _parse_header(blob: bytes, key: str) -> Header:
    if len(blob) < _FIXED.size:
        raise CorruptData(f"encrypted object {key!r} is truncated (no header)")
    magic, version, klen = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptData(f"object {key!r} is not an encrypted drsite object (bad magic)")
    if version != VERSION:
        raise CorruptData(f"encrypted object {key!r} has unknown format version {version}")
    end = _FIXED.size + klen + _TAIL.size
    if len(blob) < end:
        raise CorruptData(f"encrypted object {key!r} is truncated (short header)")
    key_id = blob[_FIXED.size:_FIXED.size + klen].decode("ascii", "replace")
    segment, length, prefix = _TAIL.unpack_from(blob, _FIXED.size + klen)
    if segment <= 0 or not _KEY_ID.fullmatch(key_id):
        raise CorruptData(f"encrypted object {key!r} has a damaged header")
    return Header(key_id, segment, length, prefix, bytes(blob[:end]))


class EncryptedStore(ForwardingStore):
    """Encrypts on ``put`` and decrypts and authenticates on ``get``/``get_range`` over any
    ``inner`` store, with AES-256-GCM keys from ``keys`` (key id → 32-byte key).

    New objects use ``active_key_id``; every object records its key id, so after a rotation old
    objects stay readable as long as their key stays in ``keys``. ``size`` is the plaintext
    size (read from the header). Wrong key, damaged or moved object → ``CorruptData``; a key id
    not configured here → ``AuthError``; both permanent.

    Responsible for: confidentiality and integrity of object *contents*. Not responsible for:
    hiding keys, sizes or access patterns (names and approximate sizes stay visible to the
    store), key storage or distribution (the caller passes keys), re-encrypting old objects
    on rotation (:mod:`drsite.store.rekey`). ``factory.open_store`` puts it *outside*
    ``RetryingStore``: a put is encrypted once and a retry re-sends the same ciphertext, so
    the lost-reply check compares equal bytes.
    (Inside a ``RetryingStore`` it also works: each attempt re-encrypts with a fresh nonce and
    the check compares plaintexts.)
    """

    def __init__(self, inner: ObjectStore, keys: Mapping[str, bytes], active_key_id: str, *,
                 segment_size: int = 1024 * 1024) -> None:
        for kid, k in keys.items():
            if not _KEY_ID.fullmatch(kid):
                raise ValueError(f"invalid key id {kid!r} (1-64 of [A-Za-z0-9._-])")
            if len(k) != 32:
                raise ValueError(f"key {kid!r} must be 32 bytes (AES-256), not {len(k)}")
        if active_key_id not in keys:
            raise ValueError(f"active key id {active_key_id!r} is not among the keys")
        if not 0 < segment_size < 2 ** 32:
            raise ValueError("segment_size out of range")
        super().__init__(inner)
        self._aead = {kid: AESGCM(bytes(k)) for kid, k in keys.items()}
        self.active_key_id = active_key_id
        self.segment_size = segment_size

    def __repr__(self) -> str:  # never the keys
        return f"EncryptedStore({self.inner!r}, key_ids={sorted(self._aead)}, " \
               f"active={self.active_key_id!r})"

    @staticmethod
    def _nonce(h: Header, i: int) -> bytes:
        return h.nonce_prefix + struct.pack(">I", i)

    def _cipher(self, h: Header, key: str) -> AESGCM:
        aead = self._aead.get(h.key_id)
        if aead is None:
            raise AuthError(f"encrypted object {key!r} needs key id {h.key_id!r}, which is not "
                            "configured", hint="Add the key that encrypted it to the store's keys.")
        return aead

    def encrypt(self, key: str, data: bytes | memoryview) -> bytes:
        """The stored form of ``data`` under ``key`` (exposed for tests and tools)."""
        plain = memoryview(data).cast("B")
        if len(plain) >= 2 ** 32 * self.segment_size:
            raise InvalidInput(f"object {key!r} is too large to encrypt")
        kid = self.active_key_id.encode("ascii")
        raw = _FIXED.pack(MAGIC, VERSION, len(kid)) + kid + \
            _TAIL.pack(self.segment_size, len(plain), os.urandom(8))
        h = _parse_header(raw, key)
        aad = raw + key.encode()
        aead = self._aead[self.active_key_id]
        out = [raw]
        for i in range(h.segments):
            piece = bytes(plain[i * h.segment:(i + 1) * h.segment])
            out.append(aead.encrypt(self._nonce(h, i), piece, aad))
        return b"".join(out)

    def _open(self, h: Header, key: str, first: int, body: bytes) -> bytes:
        """Decrypt consecutive segments starting at index ``first`` from ``body``."""
        aead = self._cipher(h, key)
        aad = h.raw + key.encode()
        out = []
        pos, i = 0, first
        while pos < len(body):
            plain_len = min(h.segment, h.length - i * h.segment)
            if plain_len < 0:
                raise CorruptData(f"encrypted object {key!r} has trailing data")
            chunk = body[pos:pos + plain_len + TAG]
            if len(chunk) != plain_len + TAG:
                raise CorruptData(f"encrypted object {key!r} is truncated (segment {i})")
            try:
                out.append(aead.decrypt(self._nonce(h, i), chunk, aad))
            except InvalidTag:
                raise CorruptData(
                    f"cannot decrypt object {key!r} (segment {i}) with key id {h.key_id!r}: "
                    "wrong key, the object was tampered with, or it was moved from another key",
                    hint="Check the store's keys; quarantine the object if the key is right.",
                ) from None
            pos += plain_len + TAG
            i += 1
        return b"".join(out)

    def decrypt(self, key: str, blob: bytes) -> bytes:
        """The plaintext of a whole stored object (exposed for tests and tools)."""
        h = _parse_header(blob, key)
        if len(blob) != h.stored_size():
            raise CorruptData(f"encrypted object {key!r} has {len(blob)} bytes, its header "
                              f"says {h.stored_size()}")
        return self._open(h, key, 0, blob[len(h.raw):])

    def _header(self, key: str) -> Header:
        return _parse_header(self.inner.get_range(key, 0, HEADER_MAX), key)

    # --- contract ----------------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        validate_key(key)
        self.inner.put(key, self.encrypt(key, data), overwrite=overwrite)

    def get(self, key: str) -> bytes:
        return self.decrypt(key, self.inner.get(key))

    def key_id_of(self, key: str) -> str:
        """The key id an object is encrypted with (reads its header only)."""
        return self._header(key).key_id

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} of object {key!r}")
        h = self._header(key)
        try:
            return self._range(h, key, offset, length)
        except CorruptData:
            # the header and the segments are two reads: an object replaced in between (a
            # re-encryption, ``drsite.store.rekey``: same plaintext, new header) fails once;
            # a new header means a new object, read again; the same header means damage
            h2 = self._header(key)
            if h2.raw == h.raw:
                raise
            return self._range(h2, key, offset, length)

    def _range(self, h: Header, key: str, offset: int, length: int) -> bytes:
        self._cipher(h, key)
        end = min(offset + length, h.length)
        if end <= offset:
            return b""
        first, last = offset // h.segment, (end - 1) // h.segment
        start = len(h.raw) + first * (h.segment + TAG)
        stop = len(h.raw) + last * (h.segment + TAG) + \
            min(h.segment, h.length - last * h.segment) + TAG
        body = self.inner.get_range(key, start, stop - start)
        if len(body) != stop - start:
            raise CorruptData(f"encrypted object {key!r} is truncated")
        plain = self._open(h, key, first, body)
        skip = offset - first * h.segment
        return plain[skip:skip + (end - offset)]

    def size(self, key: str) -> int:
        return self._header(key).length
