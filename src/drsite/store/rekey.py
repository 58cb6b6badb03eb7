"""Re-encrypting a cloud store's old objects under its active key (``drsite stores rekey``).

After ``rotate-key``, new objects use the new key and old ones keep naming their old key id
(``crypto.EncryptedStore``). This pass rewrites the old ones under the active key, so the old
keys can be retired once it reports none left.

How an object is replaced: the AES-GCM associated data binds the *object key*, so a
re-encrypted object must be written under the same key; it is written in place with one
atomic overwrite (S3 ``PutObject``/``CompleteMultipartUpload``, Azure Put Blob/Put Block List:
a reader sees the whole old or the whole new object, never neither). The plaintext is the
same, so every reader gets the same bytes: a whole-object read is one request; a ranged read
(header, then segments: two requests) that straddles the replacement fails authentication
once, sees a new header and reads again (``EncryptedStore.get_range``).

Which objects: only the *immutable* ones under ``items/<item>/`` (``packs/``, ``maps/``,
``points/``, ``quarantine/``), whose content never changes under their key. The mutable
records (``seq``, ``generation``, ``staging/`` markers) are not rewritten here: overwriting one
could undo a concurrent update (a failover advancing the generation); their owners rewrite them
under the active key at their next update (every commit writes ``seq``; markers live for one
cycle; ``generation`` at the next failover). They are counted in ``mutable_old``.

Deleted meanwhile: an object is re-checked (``exists``) right before its overwrite and skipped
when gone; what GC deletes in the instant between that check and the write comes back as an
unreferenced object (a pack or map: reclaimed by the next GC; a manifest retention removed: an
older authentic point, removed again by the next retention) — never a changed one.

Resumable: keys are visited in sorted order; ``start_after`` skips what a previous run did, and
an object already under the active key costs one header read. Idempotent.

Responsible for: the pass. Not responsible for: where the cursor is kept (the vault's job),
retiring old keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drsite.core.errors import ObjectNotFound
from drsite.store.crypto import EncryptedStore

IMMUTABLE_DIRS = ("packs", "maps", "points", "quarantine")
PROGRESS_EVERY_S = 2.0


@dataclass
class RekeyReport:
    active_key_id: str
    total: int = 0                # keys after the cursor when the pass started
    scanned: int = 0
    rewritten: int = 0
    already: int = 0              # under the active key already
    gone: int = 0                 # deleted while the pass ran
    mutable_old: int = 0          # seq/generation/markers still under an old key (left alone)
    bytes_rewritten: int = 0
    last_key: str | None = None   # the cursor: every key <= it was handled
    old_key_ids: dict[str, int] = field(default_factory=dict)   # key id → objects rewritten

    def to_dict(self) -> dict[str, Any]:
        return {"active_key_id": self.active_key_id, "total": self.total,
                "scanned": self.scanned,
                "rewritten": self.rewritten, "already": self.already, "gone": self.gone,
                "mutable_old": self.mutable_old, "bytes_rewritten": self.bytes_rewritten,
                "last_key": self.last_key, "old_key_ids": dict(self.old_key_ids)}


def _immutable(key: str) -> bool:
    parts = key.split("/", 3)
    return len(parts) == 4 and parts[0] == "items" and parts[2] in IMMUTABLE_DIRS


def rekey(store: EncryptedStore, *, start_after: str | None = None,
          on_progress: Callable[[RekeyReport], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> RekeyReport:
    """Rewrite every immutable object of ``store`` that is not under its active key. Returns
    the report; ``on_progress`` gets it every few seconds (its ``last_key`` is a safe cursor);
    ``should_stop`` ends the pass early (the report's cursor says where)."""
    raw = store.inner
    rep = RekeyReport(store.active_key_id)
    keys = [k for k in raw.list("items/") if start_after is None or k > start_after]
    rep.total = len(keys)
    last_report = time.monotonic()
    for key in keys:
        if should_stop is not None and should_stop():
            break
        rep.scanned += 1
        try:
            kid = store.key_id_of(key)
            if kid == store.active_key_id:
                rep.already += 1
            elif not _immutable(key):
                rep.mutable_old += 1
            else:
                plain = store.get(key)
                if raw.exists(key):       # never bring back what was deleted meanwhile
                    store.put(key, plain, overwrite=True)
                    rep.rewritten += 1
                    rep.bytes_rewritten += len(plain)
                    rep.old_key_ids[kid] = rep.old_key_ids.get(kid, 0) + 1
                else:
                    rep.gone += 1
        except ObjectNotFound:
            rep.gone += 1
        rep.last_key = key
        if on_progress is not None and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            on_progress(rep)
            last_report = time.monotonic()
    return rep
