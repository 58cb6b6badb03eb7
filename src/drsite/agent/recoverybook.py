"""The recovery book a store-serving agent keeps for break-glass failover: what it would need of
the vault to fail an item over, written down beforehand.

The vault sends it in the heartbeat reply of every store-serving agent whose copy differs
(``recovery_book_digest`` in the heartbeat), like the store's access list. The document
(``failover.wire.check_recovery_book``)::

    {"format": 1, "site": SITE,
     "items": {ITEM: {"vm_id", "vm_name", "vm_spec", "source_site", "recovery_site",
                      "network_map"}},
     "plans": {NAME: {"groups": [{"name", "items": [ITEM]}], "actions": [str]}}}

It holds no secret (the items' point keys are in the access list, ``store-acl.json``) and is
persisted at ``DATA/recovery-book.json`` (0600, atomically) before it counts.

Responsible for: holding and persisting the book. Not responsible for: using it
(``breakglass``), building it (the vault's ``recoverybook``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from drsite.core.errors import DrsiteError, InvalidInput, NotFound, classify_os_error
from drsite.failover.wire import apply_book_patch, check_recovery_book, recovery_book_digest
from drsite.fsutil import atomic_write_bytes, read_json
from drsite.store.format import canonical_json

log = logging.getLogger(__name__)

BOOK_FILE = "recovery-book.json"
NO_BOOK_HINT = ("The vault sends the recovery book to the recovery site's store agent with its "
                "heartbeat replies; an item protected after the vault was lost is not in it.")


class RecoveryBook:
    """The book at ``path`` (thread-safe; ``None`` until one was received)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._doc: dict[str, Any] | None = None
        self._digest: str | None = None
        self._unpatched = False  # a patch did not apply: ask for the whole book
        with contextlib.suppress(FileNotFoundError):
            try:
                doc = check_recovery_book(read_json(self.path))
            except InvalidInput as e:
                log.error("ignoring the recovery book in %s: %s", self.path, e)
            else:
                self._doc, self._digest = doc, recovery_book_digest(doc)

    @property
    def digest(self) -> str | None:
        """The digest the vault is told (None: send the whole book, after a patch failed)."""
        return None if self._unpatched else self._digest

    @property
    def doc(self) -> dict[str, Any] | None:
        return self._doc

    def update(self, doc: Any) -> bool:
        """Persist and adopt ``doc`` (``InvalidInput`` if malformed: the old book stays);
        whether it changed."""
        doc = check_recovery_book(doc)
        with self._lock:
            return self._adopt(doc, recovery_book_digest(doc))

    def patch(self, patch: dict[str, Any]) -> bool:
        """Apply a patch of the vault's (``failover.wire.apply_book_patch``) to the book held,
        persist and adopt the result; whether it changed. ``InvalidInput`` if it does not
        apply (another base, malformed, another digest): the book stays, and the next
        heartbeat asks for the whole book."""
        with self._lock:
            try:
                if self._doc is None or patch.get("base") != self._digest:
                    raise InvalidInput("recovery book patch: not of the book held")
                doc = apply_book_patch(self._doc, patch)
            except InvalidInput:
                self._unpatched = True
                raise
            return self._adopt(doc, str(patch["digest"]))

    def _adopt(self, doc: dict[str, Any], digest: str) -> bool:
        self._unpatched = False
        if digest == self._digest:
            return False
        try:
            atomic_write_bytes(self.path, canonical_json(doc))
            os.chmod(self.path, 0o600)
        except OSError as e:
            raise classify_os_error(e, f"recovery book {self.path}") from e
        self._doc, self._digest = doc, digest
        return True

    def entry(self, item_id: str) -> dict[str, Any]:
        """What the book says of ``item_id`` (``NotFound`` with a hint)."""
        items = dict((self._doc or {}).get("items") or {})
        if item_id not in items:
            raise NotFound(f"item {item_id} is not in this host's recovery book",
                           hint="List what this host can fail over: drsite agent points. "
                                + NO_BOOK_HINT)
        return dict(items[item_id])

    def plan(self, name: str) -> dict[str, Any]:
        plans = dict((self._doc or {}).get("plans") or {})
        if name not in plans:
            raise NotFound(f"recovery plan {name} is not in this host's recovery book",
                           hint="List what this host can fail over: drsite agent points. "
                                + NO_BOOK_HINT)
        return dict(plans[name])


def apply_reply(book: RecoveryBook | None, doc: Any, patch: dict[str, Any] | None = None) -> None:
    """Take the book (or the patch of the book held) of a heartbeat reply (absent: unchanged).
    A malformed one is logged and ignored: the book in force stays (after a patch that did
    not apply, the next heartbeat asks for the whole book)."""
    if book is None or (doc is None and patch is None):
        return
    try:
        if doc is not None:
            changed = book.update(doc)
        else:
            assert patch is not None
            changed = book.patch(patch)
        if changed and book.doc is not None:
            log.info("recovery book updated%s: %d item(s), %d plan(s)",
                     "" if doc is not None else " (patch)", len(book.doc.get("items") or {}),
                     len(book.doc.get("plans") or {}))
    except InvalidInput as e:
        log.error("ignoring the vault's recovery book%s: %s", "" if doc is not None else " patch",
                  e)
    except DrsiteError as e:  # not persisted (a full disk): not adopted; the digest the vault
        # is told is still the old book's, so the next heartbeat brings it again
        log.error("cannot keep the vault's recovery book (%s); the book in force stays", e)
