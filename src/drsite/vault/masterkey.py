"""The vault's master key and its data directory's privacy.

Secrets the vault must be able to use again (cloud credentials, stores' data-encryption keys,
the store spec in commands not yet delivered) are sealed in the database with AES-256-GCM under
a master key (:mod:`drsite.vault.db.sealed` says which columns). The key is 32 random bytes,
base64 in a 0600 file: ``DATA/master.key`` by default, or the file ``--master-key-file`` /
``DRSITE_MASTER_KEY_FILE`` names. Its id (``mk-`` + 16 hex of a hash of the key) is in every
envelope, so a value always names the key that opens it; the additional data binds a value to
its column and path (a sealed value moved to another column does not open).

Rotation (``drsite vault rotate-master-key``) never leaves a secret unreadable:
1. the new key is written to ``master.key.new`` first (kept when it exists: a resumed rotation);
2. every sealed value not under the new key is re-sealed, one row per transaction (a kill
   between rows leaves some rows under each key: every process loads both files);
3. every value is checked to open under the new key; on SQLite the file is compacted (VACUUM),
   so no page still holds a value under the old key;
4. only then ``master.key.new`` is renamed over ``master.key`` (the old key is gone).
A vault must not run meanwhile: it holds a shared lock on ``DATA/vault.lock`` while it runs, and
the rotation takes it exclusively (refused while a vault runs).

At every start the vault makes its data directory 0700 and every file in it 0600 (fixing older
deployments), opens the keyring (creating the key at first start; refusing to start when the
database holds values under a key it does not have), checks that every sealed value opens, and
seals values still in clear (written by a vault before sealing existed), compacting SQLite
afterwards so the clear copies leave the file.

Responsible for: keys, envelopes, the rotation and start-up passes, modes. Not responsible for:
which API returns what (secrets are never returned; see ``vault/stores.py``).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import JSON, column, select, table, update
from sqlalchemy.engine import make_url

from drsite import failpoints
from drsite.core.errors import Conflict, InvalidInput, SecretUnreadable, classify_os_error
from drsite.fsutil import atomic_write_bytes, fsync_dir
from drsite.vault.audit import AuditEntry, record_audit
from drsite.vault.db.database import Database
from drsite.vault.db.sealed import (
    MARK,
    SEALED_COLUMNS,
    SealedColumn,
    attach_sealer,
    is_sealed,
    map_paths,
    purpose_of,
)
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)

KEY_FILE = "master.key"
NEXT_SUFFIX = ".new"
LOCK_FILE = "vault.lock"
VERSION = "v1"
AAD = b"drsite-sealed-v1\x00"
ROTATE_ROW_FAILPOINT = "vault.rotate-master-key.row"
ROTATE_SWAP_FAILPOINT = "vault.rotate-master-key.swap"


def key_id(key: bytes) -> str:
    return "mk-" + hashlib.sha256(b"drsite master key id\x00" + key).hexdigest()[:16]


@dataclass(frozen=True)
class MasterKey:
    key: bytes = field(repr=False)

    @property
    def kid(self) -> str:
        return key_id(self.key)

    @staticmethod
    def generate() -> MasterKey:
        return MasterKey(secrets.token_bytes(32))


class Keyring:
    """Master keys by id: ``active`` seals, every key opens (a :class:`~drsite.vault.db.sealed.Sealer`)."""

    def __init__(self, active: MasterKey, others: Iterable[MasterKey] = ()) -> None:
        self.active = active
        self._keys = {k.kid: k for k in (*others, active)}

    @property
    def kids(self) -> set[str]:
        return set(self._keys)

    def seal(self, value: Any, purpose: str) -> dict[str, Any]:
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        nonce = secrets.token_bytes(12)
        kid = self.active.kid
        ct = AESGCM(self.active.key).encrypt(nonce, data, AAD + f"{purpose}\x00{kid}".encode())
        return {MARK: VERSION, "kid": kid, "nonce": base64.b64encode(nonce).decode(),
                "ct": base64.b64encode(ct).decode()}

    def unseal(self, envelope: dict[str, Any], purpose: str) -> Any:
        kid = str(envelope.get("kid"))
        key = self._keys.get(kid)
        if envelope.get(MARK) != VERSION or key is None:
            raise SecretUnreadable(f"a secret of {purpose} is sealed under master key {kid}, "
                                   "which this vault does not have")
        try:
            nonce = base64.b64decode(str(envelope["nonce"]), validate=True)
            ct = base64.b64decode(str(envelope["ct"]), validate=True)
            data = AESGCM(key.key).decrypt(nonce, ct, AAD + f"{purpose}\x00{kid}".encode())
            return json.loads(data)
        except (KeyError, ValueError, binascii.Error, InvalidTag) as e:
            raise SecretUnreadable(f"a sealed secret of {purpose} does not open under master key "
                                   f"{kid}: it was altered or belongs elsewhere",
                                   hint="Restore the vault's database from a backup.") from e


# ------------------------------------------------------------------------------- key files

def next_path(path: Path) -> Path:
    return path.with_name(path.name + NEXT_SUFFIX)


def read_key(path: Path) -> MasterKey:
    """The key in ``path`` (``InvalidInput`` when others may read it or it is malformed)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        raw = path.read_bytes()
    except OSError as e:
        raise classify_os_error(e, f"master key file {path}") from e
    if mode & 0o077:
        raise InvalidInput(f"master key file {path} may be read by others (mode {mode:o})",
                           hint=f"Run 'chmod 600 {path}'.")
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise InvalidInput(f"master key file {path} does not hold a 32-byte key (base64)",
                           hint="Restore the file from its backup.")
    return MasterKey(key)


def write_key(path: Path, key: MasterKey) -> None:
    """Write ``key`` durably (temp file 0600, fsync, rename, fsync of the directory)."""
    try:
        atomic_write_bytes(path, base64.b64encode(key.key) + b"\n")
        os.chmod(path, 0o600)
    except OSError as e:
        raise classify_os_error(e, f"master key file {path}") from e


def load_keyring(path: Path) -> Keyring | None:
    """``path``'s key (active) plus ``path.new``'s when a rotation left one; None when
    ``path`` does not exist."""
    if not path.exists():
        return None
    active = read_key(path)
    nxt = next_path(path)
    return Keyring(active, [read_key(nxt)] if nxt.exists() else [])


# --------------------------------------------------------------------------- sealed values

def _table(col: SealedColumn) -> Any:
    return table(col.table, column(col.pk), column(col.column, JSON))


def _leaves(raw: Any, col: SealedColumn) -> list[tuple[Any, str]]:
    out: list[tuple[Any, str]] = []

    def visit(inner: Any, path: tuple[str, ...]) -> Any:
        out.append((inner, purpose_of(col.name, path)))
        return inner

    map_paths(raw, col.paths, visit)
    return out


def _rows(db: Database, col: SealedColumn) -> Iterator[tuple[Any, Any]]:
    t = _table(col)
    with db.read() as s:
        yield from s.execute(select(t.c[col.pk], t.c[col.column]).order_by(t.c[col.pk])).all()


def open_database(url: str, key_file: Path) -> Database:
    """A database whose sealed columns open with the keys of ``key_file`` (and a rotation's
    ``.new``), for tools and tests that read the vault's rows beside it. The schema is not
    migrated; nothing is created."""
    ring = load_keyring(key_file)
    if ring is None:
        raise SecretUnreadable(f"master key file {key_file} does not exist")
    db = Database(url)
    attach_sealer(db.engine, ring)
    return db


def sealed_kids(db: Database) -> set[str]:
    """The ids of the master keys the database's sealed values name."""
    kids: set[str] = set()
    for col in SEALED_COLUMNS:
        for _pk, raw in _rows(db, col):
            kids.update(str(v.get("kid")) for v, _p in _leaves(raw, col) if is_sealed(v))
    return kids


def open_keyring(db: Database, path: Path) -> Keyring:
    """The keyring for ``db``: ``path`` (created at first start, when no value is sealed yet)
    and a rotation's ``path.new``. ``SecretUnreadable`` when the database names a key the
    files do not hold (a lost or wrong key file: the vault must not start and seal anew)."""
    ring = load_keyring(path)
    kids = sealed_kids(db)
    if ring is None:
        if kids:
            raise SecretUnreadable(f"master key file {path} is missing, but the database holds "
                                   f"secrets sealed under {', '.join(sorted(kids))}")
        key = MasterKey.generate()
        write_key(path, key)
        log.info("master key %s created in %s (mode 0600); back it up: without it the vault's "
                 "secrets cannot be read", key.kid, path)
        return Keyring(key)
    missing = kids - ring.kids
    if missing:
        raise SecretUnreadable(f"the database holds secrets sealed under {', '.join(sorted(missing))}, "
                               f"which the master key file {path} does not hold")
    return ring


def _reseal(ring: Keyring, col: SealedColumn, raw: Any, *, rotate: bool) -> Any:
    """``raw`` with clear leaves sealed, every sealed leaf checked (it must open), and — with
    ``rotate`` — leaves under another key sealed again under the active one."""

    def fix(inner: Any, path: tuple[str, ...]) -> Any:
        purpose = purpose_of(col.name, path)
        if not is_sealed(inner):
            return ring.seal(inner, purpose)
        value = ring.unseal(inner, purpose)
        if rotate and inner.get("kid") != ring.active.kid:
            return ring.seal(value, purpose)
        return inner

    return map_paths(raw, col.paths, fix)


def seal_clear_values(db: Database, ring: Keyring) -> int:
    """Seal every value still in clear (one transaction); check every sealed one opens.
    Returns how many rows changed; SQLite is compacted when any did."""
    changed = 0
    for col in SEALED_COLUMNS:
        t = _table(col)
        updates = [(pk, new) for pk, raw in _rows(db, col)
                   if raw is not None and (new := _reseal(ring, col, raw, rotate=False)) != raw]
        if updates:
            with db.tx() as s:
                for pk, new in updates:
                    s.execute(update(t).where(t.c[col.pk] == pk).values({col.column: new}))
            changed += len(updates)
    if changed:
        log.info("sealed %d row(s) of secrets that were stored in clear", changed)
        compact(db)
    return changed


def compact(db: Database) -> None:
    """SQLite only: checkpoint the WAL, VACUUM (free pages go, with any old copy of a value),
    truncate the WAL. Nothing for PostgreSQL (no file of ours)."""
    if not db.url.startswith("sqlite"):
        return
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        for sql in ("PRAGMA wal_checkpoint(TRUNCATE)", "VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"):
            cur.execute(sql)
            cur.fetchall()
        cur.close()
    finally:
        raw.close()


@dataclass(frozen=True)
class RotationReport:
    old_kid: str
    new_kid: str
    values_resealed: int  # (row, column) pairs written again
    resumed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"old_key": self.old_kid, "new_key": self.new_kid,
                "values_resealed": self.values_resealed, "resumed": self.resumed}


def rotate(db: Database, path: Path) -> RotationReport:
    """Re-seal every secret under a new master key, crash-safely (see the module's docstring).
    The caller holds the data directory's lock exclusively."""
    ring = load_keyring(path)
    if ring is None:
        raise SecretUnreadable(f"master key file {path} does not exist: nothing to rotate",
                               hint="Start the vault once (it creates the key), or pass "
                                    "--master-key-file.")
    old = ring.active
    nxt = next_path(path)
    resumed = nxt.exists()
    new = read_key(nxt) if resumed else MasterKey.generate()
    if not resumed:
        write_key(nxt, new)
    work = Keyring(new, [old])
    missing = sealed_kids(db) - work.kids
    if missing:
        raise SecretUnreadable(f"the database holds secrets sealed under {', '.join(sorted(missing))}, "
                               f"which neither {path} nor {nxt} holds")
    rows = 0
    for col in SEALED_COLUMNS:
        t = _table(col)
        for pk in [pk for pk, _raw in _rows(db, col)]:
            with db.tx() as s:
                raw = s.execute(select(t.c[col.column]).where(t.c[col.pk] == pk)).scalar()
                if raw is None:
                    continue
                new_raw = _reseal(work, col, raw, rotate=True)
                if new_raw == raw:
                    continue
                s.execute(update(t).where(t.c[col.pk] == pk).values({col.column: new_raw}))
            rows += 1
            failpoints.hit(ROTATE_ROW_FAILPOINT)  # a kill here: rows under both keys
    left = sealed_kids(db) - {new.kid}
    if left:  # pragma: no cover - a vault wrote meanwhile despite the lock
        raise Conflict(f"values under {', '.join(sorted(left))} appeared during the rotation",
                       hint="Stop every vault using this database, then run the rotation again.")
    compact(db)
    failpoints.hit(ROTATE_SWAP_FAILPOINT)  # a kill here: every row under the new key, both files
    try:
        os.replace(nxt, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise classify_os_error(e, f"master key file {path}") from e
    log.info("master key rotated: %s → %s (%d value(s) sealed again)", old.kid, new.kid, rows)
    return RotationReport(old.kid, new.kid, rows, resumed)


def rotate_master_key(data_dir: Path, *, db_url: str | None = None,
                      master_key_file: Path | None = None) -> dict[str, Any]:
    """``drsite vault rotate-master-key``: lock the data directory (no vault may run), bring the
    schema up to date, rotate. Returns the report as a dict."""
    settings = VaultSettings(data_dir=Path(data_dir), db_url=db_url, master_key_file=master_key_file)
    if not settings.data_dir.is_dir():
        raise InvalidInput(f"{settings.data_dir} is not a vault data directory",
                           hint="Pass --data with the directory 'drsite vault serve' uses.")
    fix_modes(settings.data_dir)
    lock = DataDirLock(settings.data_dir, exclusive=True)
    try:
        db = Database(settings.database_url)
        try:
            db.migrate()
            report = rotate(db, settings.master_key_path)
            with db.tx() as s:
                record_audit(s, AuditEntry(at=time.time(), actor_kind="local",
                                           actor=_local_user(), action="vault.rotate_master_key",
                                           target=str(settings.master_key_path),
                                           detail=report.to_dict()))
        finally:
            db.dispose()
    finally:
        lock.release()
    return report.to_dict()


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


# ------------------------------------------------------------------ data directory privacy

def private_dir(path: Path) -> None:
    """Create ``path`` (0700) if needed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def fix_modes(data_dir: Path) -> list[Path]:
    """Make ``data_dir`` and every directory under it 0700 and every file 0600 (symlinks are
    left alone). Returns what changed."""
    changed: list[Path] = []

    def fix(p: Path, want: int) -> None:
        try:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) == want:
                return
            os.chmod(p, want)
        except FileNotFoundError:  # removed meanwhile (a plan script's temp file)
            return
        except PermissionError:  # not ours: say so, loudly, rather than refuse to start
            log.warning("cannot make %s private (mode %o wanted): it belongs to another user",
                        p, want)
            return
        changed.append(p)

    fix(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for d in dirs:
            fix(Path(root) / d, 0o700)
        for f in files:
            fix(Path(root) / f, 0o600)
    if changed:
        log.info("tightened the modes of %d path(s) under %s to 0700/0600", len(changed), data_dir)
    return changed


def private_sqlite_file(url: str) -> None:
    """A SQLite database file is created 0600 before SQLite opens it: its -wal, -shm and
    -journal files take the database file's mode."""
    if not url.startswith("sqlite"):
        return
    name = make_url(url).database
    if not name or name == ":memory:":
        return
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return
    os.close(fd)


class DataDirLock:
    """``DATA/vault.lock``: shared while a vault runs, exclusive for a master-key rotation."""

    def __init__(self, data_dir: Path, *, exclusive: bool) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            if exclusive:
                raise Conflict(f"a vault is running on {data_dir}",
                               hint="Stop the vault (and every vault using its database), then "
                                    "run the rotation again.") from None
            raise Conflict(f"a master-key rotation is running on {data_dir}",
                           hint="Wait for 'drsite vault rotate-master-key' to end.") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
