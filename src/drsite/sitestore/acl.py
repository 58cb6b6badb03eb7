"""Who may do what on a store server: the access list the vault pushes to a store-serving agent.

The vault is the source of truth (``drsite.vault.storeacl``); it sends the list in the
heartbeat reply of every agent that serves a store, and the agent hands it to
:meth:`StoreAcl.update`, which persists it (0600, atomically) so a restarted server enforces the
last list it had at once. The document::

    {"format": 1, "store_host": HOST_ID,
     "hosts":   {HOST_ID: {"fingerprint": SHA256_HEX, "serial": HEX}},   # current certificates
     "items":   {ITEM_ID: {"writer": HOST_ID, "readers": [HOST_ID...],
                           "point_key": BASE64 | null}},
     "revoked": {"hosts": [...], "serials": [...], "fingerprints": [...]}}

A request is allowed by (the caller's verified certificate, the item its key or route names,
the operation):

- the certificate must be the *current* one of a host in ``hosts`` (same fingerprint): an
  unknown host, a revoked host, serial or fingerprint, or a certificate replaced by a re-issue is
  refused (403 ``forbidden``);
- ``read`` (GET/HEAD/list/catch-up/digests): the item's ``readers`` (its source host and the
  store's own host);
- ``put`` (a new object): the item's ``writer`` (its source host) and the store's own host;
- ``overwrite`` and ``delete``: the writer and the store's host, *and* the immutability rules of
  :mod:`drsite.sitestore.immutable` (committed objects are never replaced or removed remotely);
- keys outside ``items/<item>/``: the store's own host only.

Before the first list arrives (no file, nothing received) every request is refused with a clear
error: the server fails closed.

Responsible for: holding, persisting and evaluating the list. Not responsible for: verifying
certificates (TLS, :mod:`drsite.tlsutil`), the immutability rules (``immutable``), or building
the list (the vault).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from blake3 import blake3

from drsite.core.errors import Forbidden, InvalidInput, classify_os_error
from drsite.core.model import validate_name
from drsite.fsutil import atomic_write_bytes, read_json
from drsite.pki import CertIdentity
from drsite.store.auth import PointAuth, decode_point_key
from drsite.store.format import canonical_json

log = logging.getLogger(__name__)

Op = Literal["read", "put", "overwrite", "delete"]
FORMAT = 1
ACL_FILE = "store-acl.json"

_NO_LIST_HINT = ("The store's agent receives its access list in the vault's heartbeat reply: "
                 "check that it runs and reaches the vault ('drsite hosts list' shows its last "
                 "heartbeat).")
_REVOKED_HINT = ("This host's certificate was revoked or replaced; re-register the agent with a "
                 "re-issue key from 'drsite hosts reissue HOST'.")
_SCOPE_HINT = ("A host may read and add objects of the items the vault assigned to it only; "
               "check the item's source host with 'drsite items list'.")


class Authorizer(Protocol):
    """What the store server asks (:class:`StoreAcl` in production; an open one in the
    object-store conformance tests only, ``sitestore.testing``)."""

    immutable: bool

    def identify(self, ident: CertIdentity) -> None: ...

    def readable(self, ident: CertIdentity, item_id: str | None) -> bool: ...

    def authorize(self, ident: CertIdentity, op: Op, item_id: str | None, what: str) -> None: ...

    def point_auth(self, item_id: str) -> PointAuth | None: ...


def acl_digest(doc: dict[str, Any]) -> str:
    """The digest the agent sends back so the vault re-sends the list only when it changed."""
    return str(blake3(canonical_json(doc)).hexdigest())


@dataclass(frozen=True)
class ItemGrant:
    writer: str
    readers: frozenset[str]
    point_key: bytes | None


@dataclass(frozen=True)
class AclState:
    """A parsed access list."""

    store_host: str
    hosts: dict[str, str]                      # host id → current certificate fingerprint
    items: dict[str, ItemGrant]
    revoked_hosts: frozenset[str] = field(default_factory=frozenset)
    revoked_serials: frozenset[str] = field(default_factory=frozenset)
    revoked_fingerprints: frozenset[str] = field(default_factory=frozenset)

    @staticmethod
    def parse(doc: Any) -> AclState:
        """Validate a list as the vault sends it (``InvalidInput`` naming the bad part)."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InvalidInput(f"store access list must be an object of format {FORMAT}")
        try:
            hosts = {validate_name("host", str(h)): str(v["fingerprint"]).lower()
                     for h, v in dict(doc.get("hosts") or {}).items()}
            items: dict[str, ItemGrant] = {}
            for item_id, g in dict(doc.get("items") or {}).items():
                raw_key = g.get("point_key")
                items[validate_name("item", str(item_id))] = ItemGrant(
                    str(g["writer"]), frozenset(str(r) for r in g.get("readers") or []),
                    decode_point_key(str(raw_key)) if raw_key else None)
            rev = dict(doc.get("revoked") or {})
            return AclState(
                store_host=validate_name("host", str(doc["store_host"])), hosts=hosts, items=items,
                revoked_hosts=frozenset(str(x) for x in rev.get("hosts") or []),
                revoked_serials=frozenset(str(x).lower() for x in rev.get("serials") or []),
                revoked_fingerprints=frozenset(str(x).lower()
                                               for x in rev.get("fingerprints") or []))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidInput(f"store access list is malformed ({type(e).__name__}: {e})") \
                from None


class StoreAcl:
    """The access list of one store server (thread-safe). ``path``: where it persists (0600);
    None keeps it in memory only (tests)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._state: AclState | None = None
        self._doc: dict[str, Any] | None = None
        if path is not None:
            self._load(path)

    # -- the list --------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        try:
            doc = read_json(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("store access list %s is unreadable (%s): every request is refused until "
                      "the vault sends a new one", path, e)
            return
        try:
            self._state, self._doc = AclState.parse(doc), doc
        except InvalidInput as e:
            log.error("store access list %s: %s; every request is refused until the vault "
                      "sends a new one", path, e)

    @property
    def loaded(self) -> bool:
        with self._lock:
            return self._state is not None

    @property
    def digest(self) -> str | None:
        """Digest of the list in force (None: no list yet)."""
        with self._lock:
            return acl_digest(self._doc) if self._doc is not None else None

    @property
    def state(self) -> AclState | None:
        with self._lock:
            return self._state

    def update(self, doc: dict[str, Any]) -> bool:
        """Take a new list (validated, persisted before it is used); True if it changed."""
        state = AclState.parse(doc)
        with self._lock:
            if self._doc is not None and acl_digest(self._doc) == acl_digest(doc):
                return False
            if self.path is not None:
                try:
                    self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    atomic_write_bytes(self.path, canonical_json(doc))
                    os.chmod(self.path, 0o600)
                except OSError as e:
                    raise classify_os_error(e, f"store access list {self.path}") from e
            self._state, self._doc = state, doc
        return True

    def point_auth(self, item_id: str) -> PointAuth | None:
        """The item's point MAC (its key came with the list), or None."""
        st = self.state
        grant = st.items.get(item_id) if st is not None else None
        if grant is None or grant.point_key is None:
            return None
        return PointAuth(item_id, grant.point_key)

    # -- decisions -------------------------------------------------------------------------

    immutable = True   # committed objects may not be changed remotely (``immutable``)

    def _identified(self, ident: CertIdentity) -> AclState:
        st = self.state
        who = f"host {ident.common_name} (certificate serial {ident.serial:x})"
        if st is None:
            raise Forbidden("this store has not received its access list from the vault yet: "
                            "every request is refused until it does", hint=_NO_LIST_HINT)
        fp = ident.fingerprint.lower()
        if ident.common_name in st.revoked_hosts or f"{ident.serial:x}" in st.revoked_serials \
                or fp in st.revoked_fingerprints:
            raise Forbidden(f"{who} is revoked: refused by this store", hint=_REVOKED_HINT)
        current = st.hosts.get(ident.common_name)
        if current is None:
            raise Forbidden(f"{who} is not a host this store may serve", hint=_SCOPE_HINT)
        if current != fp:
            raise Forbidden(f"{who} presents a certificate that is not its current one (replaced "
                            "by a re-issue)", hint=_REVOKED_HINT)
        return st

    def identify(self, ident: CertIdentity) -> None:
        """``Forbidden`` unless a list is in force and the caller's certificate is the current
        one of a host it names (not revoked, not replaced)."""
        self._identified(ident)

    @staticmethod
    def _may(st: AclState, host: str, op: Op, item_id: str | None) -> bool:
        if host == st.store_host:
            return True
        if item_id is None:
            return False
        grant = st.items.get(item_id)
        if grant is None:
            return False
        if op == "read":
            return host in grant.readers or host == grant.writer
        return host == grant.writer

    def readable(self, ident: CertIdentity, item_id: str | None) -> bool:
        """Whether the caller (identified already) may read ``item_id`` (None: keys outside
        ``items/``): what a listing is scoped to."""
        st = self.state
        return st is not None and self._may(st, ident.common_name, "read", item_id)

    def authorize(self, ident: CertIdentity, op: Op, item_id: str | None, what: str) -> None:
        """``Forbidden`` unless the caller may ``op`` on ``item_id``; ``what`` names the object
        in the error."""
        st = self._identified(ident)
        if not self._may(st, ident.common_name, op, item_id):
            scope = f"item {item_id}" if item_id is not None else "keys outside items/"
            raise Forbidden(f"host {ident.common_name} may not {op} {what}: {scope} is not "
                            "assigned to it", hint=_SCOPE_HINT)


def item_of(key: str) -> tuple[str | None, str]:
    """``items/<item>/<rel>`` → (item, rel); any other key → (None, key). ``key`` is validated."""
    parts = key.split("/", 2)
    if len(parts) >= 2 and parts[0] == "items":
        try:
            return validate_name("item", parts[1]), parts[2] if len(parts) == 3 else ""
        except InvalidInput:
            return None, key
    return None, key
