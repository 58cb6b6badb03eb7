"""Items that replicate to a cloud recovery store (S3, Azure Blob) instead of a site's agent
store: where the agent keeps their store specs, and their recovery target.

The vault sends the full spec (credentials and encryption keys included) in the ``protect``
command's ``store`` argument. ``items.json`` records only ``store_url = "cloud:<store name>"``;
the spec is written to ``<data_dir>/cloud-stores/<item_id>.json`` with mode 0600 (directory
0700), atomically, so the agent reopens the item after a restart without asking the vault.

Responsible for: those files and building the target. Not responsible for: the store stack
(:func:`drsite.store.factory.open_store`) or replication.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from drsite.core.errors import DrsiteError, InvalidInput, NotFound, classify_os_error
from drsite.core.model import validate_name
from drsite.replication.target import LocalTarget, RecoveryTarget
from drsite.store.factory import StoreSpec, store_repository

CLOUD_STORE_URL = "cloud:"
SPEC_DIR = "cloud-stores"


def is_cloud(store_url: str) -> bool:
    return store_url.startswith(CLOUD_STORE_URL)


def spec_path(data_dir: Path, item_id: str) -> Path:
    return Path(data_dir) / SPEC_DIR / f"{validate_name('item', item_id)}.json"


def save_spec(data_dir: Path, item_id: str, spec: dict[str, Any]) -> bool:
    """Write ``spec`` (already checked) for ``item_id`` with mode 0600; returns whether it
    differs from what was there."""
    path = spec_path(data_dir, item_id)
    try:
        old = load_spec(data_dir, item_id)
    except (NotFound, InvalidInput):
        old = None
    if old == spec:
        return False
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise classify_os_error(e, f"cloud store spec of {item_id}") from e
    return True


def load_spec(data_dir: Path, item_id: str) -> dict[str, Any]:
    path = spec_path(data_dir, item_id)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"item {item_id} replicates to a cloud store, but its spec "
                       f"({path}) is missing",
                       hint="Enable protection again so the vault sends the store spec.") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cloud store spec of {item_id} ({path}) is unreadable: "
                           f"{type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"cloud store spec of {item_id} ({path}) is damaged")
    return raw


def remove_spec(data_dir: Path, item_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        spec_path(data_dir, item_id).unlink()


def restore_spec(data_dir: Path, item_id: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """A ``protect`` journaled without its store's secrets, made whole again from the item's
    spec file (written before the command ran); None when the file is gone or names another
    store."""
    try:
        spec = load_spec(data_dir, item_id)
    except DrsiteError:
        return None
    kept = dict(args.get("store") or {})
    if spec.get("name") != kept.get("name") or spec.get("kind") != kept.get("kind"):
        return None
    return {**args, "store": spec}


def cloud_target(spec: dict[str, Any], item_id: str) -> RecoveryTarget:
    """The recovery target of an item in a cloud store: its repository over the full store
    stack, no hydrated replica (the recovery site restores from the store at failover)."""
    target: RecoveryTarget = LocalTarget(store_repository(StoreSpec.from_dict(spec), item_id))
    return target
