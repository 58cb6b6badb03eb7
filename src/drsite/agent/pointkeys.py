"""Items' point keys on an agent: ``DATA/point-keys/<item>.key`` (base64), 0600 in a 0700
directory, written atomically.

A source agent receives its item's key in ``protect`` (and keeps it: the vault scrubs the
command's arguments once it ended); failover commands carry the key too (``point_key``; a
re-protect seed carries the reverse item's, ``rev_point_key``). A store-serving agent also has
the keys of the items its store holds in its access list (``sitestore.acl``).

Responsible for: the files. Not responsible for: MACs (``drsite.store.auth``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from drsite.core.errors import InvalidInput, classify_os_error
from drsite.core.model import validate_name
from drsite.fsutil import atomic_write_bytes
from drsite.store.auth import PointAuth, decode_point_key

KEY_DIR = "point-keys"


def key_path(data_dir: Path, item_id: str) -> Path:
    return Path(data_dir) / KEY_DIR / f"{validate_name('item', item_id)}.key"


def save_key(data_dir: Path, item_id: str, raw: str) -> bool:
    """Keep ``raw`` (base64, validated first) as the item's point key; whether it changed."""
    decode_point_key(raw)
    path = key_path(data_dir, item_id)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            if path.read_text().strip() == raw:
                return False
        atomic_write_bytes(path, raw.encode())   # mkstemp: 0600
        os.chmod(path, 0o600)
    except OSError as e:
        raise classify_os_error(e, f"point key of {item_id}") from e
    return True


def load_auth(data_dir: Path, item_id: str) -> PointAuth | None:
    """The item's point MAC from its key file; None when the agent has no key for it."""
    path = key_path(data_dir, item_id)
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise classify_os_error(e, f"point key of {item_id}") from e
    try:
        return PointAuth(item_id, decode_point_key(raw))
    except InvalidInput as e:
        raise InvalidInput(f"point key file {path} is damaged: {e.message}",
                           hint="Enable protection again so the vault sends the key.") from None


def auth_from_args(data_dir: Path, item_id: str, raw: object) -> PointAuth | None:
    """The point MAC a command names (``point_key`` argument, kept in the key file), else the
    one the agent kept; None when neither exists. A redacted argument (a command delivered
    again after it ended) falls back to the kept key."""
    if isinstance(raw, str) and raw and raw != "redacted":
        save_key(data_dir, item_id, raw)
    return load_auth(data_dir, item_id)


def keep_keys(data_dir: Path, item_id: str, args: dict[str, Any]) -> dict[str, Any]:
    """A command's arguments for the agent's journal: its point keys (``point_key`` for its
    item, ``rev_point_key`` for a re-protect's reverse item) go to their 0600 key files now and
    are left out, so the journal holds no key; a command queued again after a restart finds
    them there (:func:`auth_from_args` falls back to the kept key)."""
    args = dict(args)
    rev = args.get("rev_item_id")
    for arg, owner in (("point_key", item_id), ("rev_point_key", rev)):
        raw = args.pop(arg, None)
        if isinstance(raw, str) and raw and raw != "redacted" and owner:
            save_key(data_dir, str(owner), raw)
    return args


def remove_key(data_dir: Path, item_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        key_path(data_dir, item_id).unlink()
