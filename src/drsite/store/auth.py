"""Authentic recovery points: a MAC under a per-item key over manifests and generation records.

The vault generates one 32-byte *point key* per protected item and gives it only to the item's
source agent (``protect``), to its recovery agent (the store-serving agent of the target site,
in its store access list; failover commands carry it too) and keeps it sealed at rest. The
writer adds ``"mac"`` to a manifest's envelope; a failover action adds it to a generation
record. Readers that hold the key refuse a manifest or record whose MAC is missing or wrong
(:class:`~drsite.core.errors.PointNotAuthentic`).

Why the manifest covers a whole point: a manifest lists its segment tables and changed-extent
list by key, and those keys are the blake3-256 of the object (checked on every read,
``Catalog._get_blob``); a table lists segment maps by such keys; a map lists pack keys and,
per extent, the blake3-128 of the frame's raw bytes, which every frame read checks
(``Catalog.read_frame``) and ``verify`` checks whole packs by the blake3 in their key. So an
authentic manifest pins every byte of the point: changing any object below it either changes
its key (and the manifest would have to name the new key: it cannot, without the key) or fails
its hash check.

The MAC is keyed blake3 (``blake3(data, key=point_key)``, 256 bits) over a domain string, the
item id and the canonical JSON body: a manifest can neither be moved to another item nor pass
as a generation record.

Responsible for: computing and checking MACs. Not responsible for: where keys come from (vault,
agent key files) or which readers must hold one (callers set ``Catalog.auth``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from blake3 import blake3

from drsite.core.errors import InvalidInput, PointNotAuthentic
from drsite.core.model import validate_name

KEY_BYTES = 32
MANIFEST = "manifest"
GENERATION = "generation"
_DOMAINS = (MANIFEST, GENERATION)


def decode_point_key(raw: str) -> bytes:
    """A point key as the vault sends it (standard base64 of 32 bytes)."""
    try:
        key = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise InvalidInput("point key is not base64") from exc
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"point key must be {KEY_BYTES} bytes, not {len(key)}")
    return key


def encode_point_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


class PointAuth:
    """The MAC of one item's manifests and generation records. ``repr`` shows no key."""

    def __init__(self, item_id: str, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise InvalidInput(f"point key must be {KEY_BYTES} bytes, not {len(key)}")
        self.item_id = validate_name("item", item_id)
        self._key = bytes(key)

    def __repr__(self) -> str:
        return f"PointAuth(item={self.item_id})"

    def mac(self, domain: str, canonical_body: bytes) -> str:
        """Hex MAC of ``canonical_body`` (the canonical JSON the checksum covers too)."""
        if domain not in _DOMAINS:
            raise InvalidInput(f"unknown MAC domain {domain!r}")
        h = blake3(key=self._key)
        h.update(f"drsite-{domain}-v1\x00{self.item_id}\x00".encode())
        h.update(canonical_body)
        return str(h.hexdigest())

    def check(self, domain: str, canonical_body: bytes, envelope: dict[str, Any],
              what: str) -> None:
        """Raise :class:`PointNotAuthentic` naming ``what`` unless ``envelope["mac"]`` is the MAC
        of ``canonical_body``."""
        got = envelope.get("mac")
        if not isinstance(got, str):
            raise PointNotAuthentic(
                f"{what} of item {self.item_id} is not authentic: it carries no MAC (written "
                "before points were authenticated, or by someone without the item's point key)")
        if not hmac.compare_digest(got.encode(), self.mac(domain, canonical_body).encode()):
            raise PointNotAuthentic(
                f"{what} of item {self.item_id} is not authentic: its MAC does not match (it "
                "was written or altered by someone without the item's point key)")
