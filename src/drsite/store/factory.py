"""One place that turns a store specification into a ready :class:`ObjectStore`.

A spec is a plain dict (what the vault stores, what ``protect`` carries to an agent, what an
agent keeps in a 0600 file)::

    {"kind": "s3" | "azure" | "local",
     "name": "offsite",                       # the vault's name of the store (informational)
     "config": {...},                         # what may be shown: endpoint, bucket, prefix, limits
     "secret": {...},                         # credentials: never shown, never logged
     "keys": {"k-1a2b": "<base64 of 32 bytes>", ...},   # AES-256 keys by key id (optional)
     "active_key_id": "k-1a2b"}               # the key new objects are encrypted with

``config`` by kind (unknown fields are refused, so a typo never silently does nothing):

- ``s3``: ``bucket`` (required), ``endpoint_url`` (None = AWS), ``region`` ("us-east-1"),
  ``prefix``, ``path_style`` (True), ``conditional_writes`` (True);
  ``secret``: ``access_key``, ``secret_key`` (both required).
- ``azure``: ``container`` (required), ``account_url`` (required unless the secret is a
  ``connection_string``), ``account_name`` (for an account key; default: the first label of
  the URL's host, or its first path segment for Azurite-style URLs), ``prefix``;
  ``secret``: exactly one of ``account_key``, ``sas_token``, ``connection_string``.
- ``local``: ``path`` (required); no secret.
- every kind: ``max_in_flight`` (8), ``bandwidth_limit_bps`` (None = unlimited, else >= 1024),
  ``retry_attempts`` (4), ``retry_base_delay_s`` (0.05).

Stacking (innermost first), done only here::

    backend → RetryingStore → ConcurrencyLimitedStore → RateLimitedStore → EncryptedStore

- retry sits right on the backend: a transient error is retried per call, a retried delete that
  finds nothing is done, a retried no-overwrite put that finds its own bytes is done (the bytes
  compared are the ciphertext the encryption layer produced once, so a retry re-sends the same
  ciphertext and never re-encrypts);
- the concurrency limit wraps the retries, so a call being retried keeps its slot (back-pressure
  while the service is throttling);
- the bandwidth limit (a smooth token bucket, paid in 256 KiB pieces) sits outside the slots, so
  a caller waiting for tokens does not hold a slot;
- encryption is outermost: everything below moves ciphertext (what goes on the wire is what is
  paced), and every object records its key id so rotated keys keep old objects readable.

Not responsible for: creating buckets/containers (operators do; ``ensure_bucket`` is for tests
and first-time setup), key storage (the vault keeps keys; agents get them over mTLS).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from drsite.core.errors import InvalidInput
from drsite.store.contract import ObjectStore, validate_prefix
from drsite.store.repository import Repository

KINDS = ("s3", "azure", "local")
# packs are ~8 MiB of frames plus a trailer (and, encrypted, 16 bytes per MiB): up to about
# 9.5 MiB. One PUT each, not a multipart/block upload of 3-4 requests.
SINGLE_PUT_MAX = 16 * 1024 * 1024
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")

_COMMON = {"prefix", "max_in_flight", "bandwidth_limit_bps", "retry_attempts",
           "retry_base_delay_s"}
_CONFIG_FIELDS = {
    "s3": _COMMON | {"bucket", "endpoint_url", "region", "path_style", "conditional_writes"},
    "azure": _COMMON | {"container", "account_url", "account_name"},
    "local": _COMMON | {"path"},
}
_SECRET_FIELDS = {
    "s3": {"access_key", "secret_key"},
    "azure": {"account_key", "sas_token", "connection_string"},
    "local": set(),
}


def _str(where: str, value: Any, *, required: bool = False, limit: int = 1024) -> str | None:
    if value is None or value == "":
        if required:
            raise InvalidInput(f"store {where} is required")
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"store {where} must be a string")
    if len(value) > limit or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"store {where} is too long or has control characters")
    return value


def _int(where: str, value: Any, default: int | None, lo: int, hi: int) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"store {where} must be an integer from {lo} to {hi}")
    return value


def _bool(where: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"store {where} must be true or false")
    return value


def _url(where: str, value: str | None) -> str | None:
    if value is None:
        return None
    u = urlparse(value)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise InvalidInput(f"store {where} must be an http(s) URL")
    return value.rstrip("/")


def decode_key(key_id: str, text: Any) -> bytes:
    """A key from its base64 form, checked (32 bytes, AES-256)."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise InvalidInput("invalid encryption key id (1-64 of [A-Za-z0-9._-])")
    if not isinstance(text, str):
        raise InvalidInput(f"encryption key {key_id} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"encryption key {key_id} is not valid base64") from None
    if len(raw) != 32:
        raise InvalidInput(f"encryption key {key_id} must be 32 bytes (AES-256), not {len(raw)}")
    return raw


@dataclass(frozen=True)
class StoreSpec:
    """A checked store specification (see the module docstring). ``repr`` shows no secret."""

    kind: str
    name: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    secret: Mapping[str, str] = field(default_factory=dict, repr=False)
    keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    active_key_id: str | None = None

    # --- parsing ---------------------------------------------------------------------------

    @staticmethod
    def from_dict(d: Any) -> StoreSpec:
        """Parse and check ``d``; every problem is an ``InvalidInput`` naming the field (never
        its value)."""
        if not isinstance(d, Mapping):
            raise InvalidInput("a store spec must be an object")
        unknown = set(d) - {"kind", "name", "config", "secret", "keys", "active_key_id"}
        if unknown:
            raise InvalidInput(f"unknown store spec field(s): {', '.join(sorted(unknown))}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise InvalidInput("store kind must be one of " + ", ".join(KINDS))
        name = _str("name", d.get("name")) or ""
        if name and not _NAME_RE.fullmatch(name):
            raise InvalidInput("invalid store name (1-63 of [A-Za-z0-9._-], not starting with "
                               "a dot or dash)")
        config = d.get("config") or {}
        secret = d.get("secret") or {}
        raw_keys = d.get("keys") or {}
        for what, v in (("config", config), ("secret", secret), ("keys", raw_keys)):
            if not isinstance(v, Mapping):
                raise InvalidInput(f"store {what} must be an object")
        keys = {str(k): decode_key(str(k), v) for k, v in raw_keys.items()}
        active = _str("active_key_id", d.get("active_key_id"), limit=64)
        if keys and active is None:
            raise InvalidInput("store keys need an active_key_id")
        if active is not None and active not in keys:
            raise InvalidInput("store active_key_id is not among its keys")
        spec = StoreSpec(kind, name, _check_config(kind, config), _check_secret(kind, secret),
                         keys, active)
        spec._check_pair()
        return spec

    def _check_pair(self) -> None:
        if self.kind == "azure":
            has_cs = "connection_string" in self.secret
            if has_cs == ("account_url" in self.config):
                raise InvalidInput("an azure store needs exactly one of config.account_url and "
                                   "secret.connection_string")
            if "account_url" in self.config and not self.secret:
                raise InvalidInput("an azure store needs secret.account_key or secret.sas_token")

    def to_dict(self) -> dict[str, Any]:
        """The full spec, secrets and keys included (for command arguments and 0600 files)."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "config": dict(self.config),
                               "secret": dict(self.secret)}
        if self.keys:
            out["keys"] = {k: base64.b64encode(v).decode("ascii") for k, v in self.keys.items()}
            out["active_key_id"] = self.active_key_id
        return out

    def redacted(self) -> dict[str, Any]:
        """What may be shown or logged: no credential, no key (the names of the secret fields
        that are set, and the key ids, are shown)."""
        return {"kind": self.kind, "name": self.name, "config": dict(self.config),
                "secret_fields": sorted(self.secret), "key_ids": sorted(self.keys),
                "active_key_id": self.active_key_id, "encrypted": bool(self.keys)}

    def with_keys(self, keys: Mapping[str, bytes], active_key_id: str | None) -> StoreSpec:
        return replace(self, keys=dict(keys), active_key_id=active_key_id)

    @property
    def encrypted(self) -> bool:
        return bool(self.keys)

    def location(self) -> str:
        """A short human description (no secret): ``s3://bucket/prefix`` etc."""
        c = self.config
        if self.kind == "s3":
            return f"s3://{c['bucket']}/{c.get('prefix', '')}"
        if self.kind == "azure":
            return f"azure://{c['container']}/{c.get('prefix', '')}"
        return f"file://{c['path']}"


def _check_config(kind: str, config: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(config) - _CONFIG_FIELDS[kind]
    if unknown:
        raise InvalidInput(f"unknown {kind} store config field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    prefix = _str("config.prefix", config.get("prefix"), limit=256)
    if prefix is not None:
        if not prefix.endswith("/"):
            prefix += "/"
        try:
            validate_prefix(prefix)
        except (InvalidInput, ValueError):
            raise InvalidInput("store config.prefix is not a valid key prefix") from None
        out["prefix"] = prefix
    out["max_in_flight"] = _int("config.max_in_flight", config.get("max_in_flight"), 8, 1, 256)
    bw = _int("config.bandwidth_limit_bps", config.get("bandwidth_limit_bps"), None, 1024,
              10 ** 12)
    if bw is not None:
        out["bandwidth_limit_bps"] = bw
    out["retry_attempts"] = _int("config.retry_attempts", config.get("retry_attempts"), 4, 1, 20)
    delay = config.get("retry_base_delay_s")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 60:
            raise InvalidInput("store config.retry_base_delay_s must be a number from 0 to 60")
        out["retry_base_delay_s"] = float(delay)
    if kind == "s3":
        bucket = _str("config.bucket", config.get("bucket"), required=True, limit=63)
        assert bucket is not None
        if not _BUCKET_RE.fullmatch(bucket):
            raise InvalidInput("store config.bucket is not a valid S3 bucket name")
        out["bucket"] = bucket
        ep = _url("config.endpoint_url", _str("config.endpoint_url", config.get("endpoint_url")))
        if ep is not None:
            out["endpoint_url"] = ep
        out["region"] = _str("config.region", config.get("region"), limit=64) or "us-east-1"
        out["path_style"] = _bool("config.path_style", config.get("path_style"), True)
        out["conditional_writes"] = _bool("config.conditional_writes",
                                          config.get("conditional_writes"), True)
    elif kind == "azure":
        container = _str("config.container", config.get("container"), required=True, limit=63)
        assert container is not None
        if not _CONTAINER_RE.fullmatch(container):
            raise InvalidInput("store config.container is not a valid Azure container name")
        out["container"] = container
        url = _url("config.account_url", _str("config.account_url", config.get("account_url")))
        if url is not None:
            out["account_url"] = url
        acct = _str("config.account_name", config.get("account_name"), limit=64)
        if acct is not None:
            out["account_name"] = acct
    else:
        path = _str("config.path", config.get("path"), required=True, limit=4096)
        assert path is not None
        if not Path(path).is_absolute():
            raise InvalidInput("store config.path must be an absolute path")
        out["path"] = path
    return out


def _check_secret(kind: str, secret: Mapping[str, Any]) -> dict[str, str]:
    unknown = set(secret) - _SECRET_FIELDS[kind]
    if unknown:
        raise InvalidInput(f"unknown {kind} store secret field(s): {', '.join(sorted(unknown))}")
    out: dict[str, str] = {}
    for k, v in secret.items():
        s = _str(f"secret.{k}", v, limit=4096)
        if s is not None:
            out[str(k)] = s
    if kind == "s3" and set(out) != {"access_key", "secret_key"}:
        raise InvalidInput("an s3 store needs secret.access_key and secret.secret_key")
    if kind == "azure" and len(out) > 1:
        raise InvalidInput("an azure store takes exactly one of secret.account_key, "
                           "secret.sas_token, secret.connection_string")
    return out


def _account_name(url: str) -> str:
    u = urlparse(url)
    host = u.hostname or ""
    if host and not host.replace(".", "").isdigit() and host != "localhost" and "." in host:
        return host.split(".", 1)[0]
    seg = u.path.strip("/").split("/", 1)[0]  # Azurite/emulator: http://127.0.0.1:10000/ACCOUNT
    if not seg:
        raise InvalidInput("cannot tell the azure account name from config.account_url",
                           hint="Set config.account_name.")
    return seg


# --- building --------------------------------------------------------------------------------

def open_backend(spec: StoreSpec) -> ObjectStore:
    """The bare backend of ``spec`` (no wrappers)."""
    c, sec = spec.config, spec.secret
    prefix = str(c.get("prefix") or "")
    if spec.kind == "s3":
        from drsite.store.s3 import S3ObjectStore

        return S3ObjectStore(c["bucket"], prefix, endpoint_url=c.get("endpoint_url"),
                             region=c.get("region", "us-east-1"), access_key=sec["access_key"],
                             secret_key=sec["secret_key"], path_style=c.get("path_style", True),
                             conditional_writes=c.get("conditional_writes", True),
                             multipart_threshold=SINGLE_PUT_MAX,
                             max_pool_connections=max(16, int(c.get("max_in_flight", 8))))
    if spec.kind == "azure":
        from drsite.store.azure import AzureBlobObjectStore

        if "connection_string" in sec:
            return AzureBlobObjectStore(c["container"], prefix,
                                        connection_string=sec["connection_string"],
                                        max_single_put_size=SINGLE_PUT_MAX)
        url = c["account_url"]
        cred: Any
        if "account_key" in sec:
            cred = {"account_name": c.get("account_name") or _account_name(url),
                    "account_key": sec["account_key"]}
        else:
            cred = sec.get("sas_token")
        return AzureBlobObjectStore(c["container"], prefix, account_url=url, credential=cred,
                                    max_single_put_size=SINGLE_PUT_MAX)
    from drsite.store.local import LocalObjectStore

    root = Path(c["path"])
    return LocalObjectStore(root / prefix if prefix else root)


def stack(backend: ObjectStore, spec: StoreSpec) -> ObjectStore:
    """Wrap ``backend`` as the module docstring says (retry → concurrency → bandwidth →
    encryption)."""
    from drsite.store.crypto import EncryptedStore
    from drsite.store.wrappers import ConcurrencyLimitedStore, RateLimitedStore, RetryingStore

    c = spec.config
    store: ObjectStore = RetryingStore(backend, attempts=int(c.get("retry_attempts", 4)),
                                       base_delay=float(c.get("retry_base_delay_s", 0.05)))
    store = ConcurrencyLimitedStore(store, int(c.get("max_in_flight", 8)))
    if c.get("bandwidth_limit_bps"):
        store = RateLimitedStore(store, float(c["bandwidth_limit_bps"]))
    if spec.keys:
        assert spec.active_key_id is not None
        store = EncryptedStore(store, spec.keys, spec.active_key_id)
    return store


def open_store(spec: StoreSpec | Mapping[str, Any]) -> ObjectStore:
    """The ready store of ``spec`` (a :class:`StoreSpec` or its dict form): the backend with
    every wrapper the spec asks for. No network call is made here."""
    s = spec if isinstance(spec, StoreSpec) else StoreSpec.from_dict(spec)
    try:
        backend = open_backend(s)
    except ValueError as e:  # a backend's own argument checks
        raise InvalidInput(f"store {s.name or s.kind}: {e}") from None
    return stack(backend, s)


def ensure_bucket(spec: StoreSpec | Mapping[str, Any]) -> None:
    """Create the spec's bucket/container if missing (tests and first-time setup only)."""
    s = spec if isinstance(spec, StoreSpec) else StoreSpec.from_dict(spec)
    backend: Any = open_backend(s)
    if s.kind == "s3":
        backend.create_bucket()
    elif s.kind == "azure":
        backend.create_container()


UPLOAD_THREADS = 4
"""Packs a writer stores at once in a cloud store (bounded by the spec's ``max_in_flight``):
one request per pack, so several in flight fill the link as the SDKs' own uploads do."""


def store_repository(spec: StoreSpec | Mapping[str, Any], item_id: str) -> Repository:
    """The repository of ``item_id`` in the store of ``spec`` (the whole stack), with parallel
    pack uploads."""
    s = spec if isinstance(spec, StoreSpec) else StoreSpec.from_dict(spec)
    uploads = min(UPLOAD_THREADS, int(s.config.get("max_in_flight", 8)))
    return Repository(open_store(s), item_id, upload_threads=uploads)


def open_item_repository(spec: Mapping[str, Any] | None, local_store_dir: Path | None,
                         item_id: str) -> Repository:
    """The repository of ``item_id``: in the cloud store of ``spec`` when given (the failover
    handlers pass the ``store`` argument of their command), else in the agent's local recovery
    store under ``local_store_dir``."""
    if spec is not None:
        return store_repository(spec, item_id)
    if local_store_dir is None:
        raise InvalidInput(f"item {item_id}: no cloud store spec and no local recovery store",
                           hint="Run this on an agent with --store-dir, or give the item's "
                                "store spec.")
    from drsite.store.local import LocalObjectStore

    return Repository(LocalObjectStore(Path(local_store_dir)), item_id)
