"""``drsite vault backup`` / ``drsite vault restore``: the vault's state for deployments without
HA (issue 14 part 5).

A backup is one tar file (0600, written atomically) holding:

- ``vault.db``: a consistent online snapshot of the SQLite database (SQLite's backup API, in
  one step: one read transaction, so a point in time while the vault keeps writing). Its
  secrets stay sealed under the master key, as in the live database.
- ``pki/ca.pem``, ``pki/server.pem``: certificates (public).
- ``pki/ca.key.sealed``, ``pki/server.key.sealed``, ``admin.token.sealed``: the private files,
  sealed (AES-256-GCM) under the same master key — the CA key is the identity every agent
  trusts, and must not sit in a backup in clear.
- ``manifest.json``: format, time, drsite version, the master key's id, each member's blake3;
  ``manifest.json.sealed``: the manifest's blake3 sealed under the master key, so a restore
  refuses any member (a swapped database) changed by someone without the key.

**The master key is never in a backup** (``docs/security.md``: the key and the database
together open every secret, so they are kept apart). The backup names the key's id; a restore
needs the key file (``--master-key-file``), checks that it is that key, and writes it as
``DATA/master.key`` (0600) of the restored vault. A backup without its key restores nothing
secret: keep the key file in a separate place (a password manager, an HSM export, paper).

Points reported to the vault after the backup was made are learnt again: restore marks every
item so that its agent's next heartbeat is answered with ack 0, and the agent then reports its
whole catalogue (``heartbeat``); points removed after the backup are dropped when the retention
rule explains their removal.

Restore writes into a new directory beside the target, verifies it there (every member's
digest, SQLite's integrity check, every sealed value of the database and every sealed file
opens under the key), and only then renames it into place. A target that holds a vault is
refused unless ``--force`` (it is then renamed aside, never deleted); a target a running vault
holds (its ``vault.lock``) is refused always.

PostgreSQL deployments: back the database up with PostgreSQL's own tools (``pg_dump`` /
``pg_basebackup``) and the ``pki`` directory with it; ``backup`` refuses a PostgreSQL URL.

Responsible for: the archive and the restore. Not responsible for: scheduling backups, or
copying them off the host.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blake3 import blake3
from sqlalchemy import update
from sqlalchemy.engine import make_url

import drsite
from drsite.core.errors import (
    Conflict,
    CorruptData,
    InvalidInput,
    SecretUnreadable,
    classify_os_error,
)
from drsite.fsutil import atomic_write_bytes, fsync_dir
from drsite.vault.context import ADMIN_TOKEN_FILE
from drsite.vault.db.database import Database, sqlite_url
from drsite.vault.db.models import Host, Item
from drsite.vault.heartbeat import RESTORED
from drsite.vault.masterkey import (
    KEY_FILE,
    DataDirLock,
    Keyring,
    MasterKey,
    fix_modes,
    load_keyring,
    open_keyring,
    read_key,
    seal_clear_values,
    sealed_kids,
    write_key,
)
from drsite.vault.settings import VaultSettings

FORMAT = 1
DB_MEMBER = "vault.db"
MANIFEST = "manifest.json"
MANIFEST_SEAL = "manifest.json.sealed"
PUBLIC_FILES = ("pki/ca.pem", "pki/server.pem")
SECRET_FILES = ("pki/ca.key", "pki/server.key", ADMIN_TOKEN_FILE)
SEALED_SUFFIX = ".sealed"
PURPOSE = "backup:"   # a sealed file's purpose: "backup:<member path>"


def _digest(data: bytes) -> str:
    return str(blake3(data).hexdigest())


@dataclass(frozen=True)
class BackupReport:
    path: str
    bytes: int
    master_key_id: str
    members: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "master_key_id": self.master_key_id,
                "members": self.members, "seconds": self.seconds}


def _snapshot(db_path: Path, dest: Path) -> None:
    """A consistent copy of the live SQLite database ``db_path`` (WAL included) in ``dest``."""
    src = sqlite3.connect(str(db_path), timeout=30.0)
    try:
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst, pages=-1)   # one step: one read transaction, one instant
            dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            ok = dst.execute("PRAGMA integrity_check").fetchone()
        finally:
            dst.close()
    finally:
        src.close()
    if not ok or ok[0] != "ok":
        raise CorruptData(f"the database snapshot of {db_path} failed SQLite's integrity check: "
                          f"{ok}", hint="Check the vault's disk; restore an older backup.")


def backup(data_dir: Path, out: Path, *, db_url: str | None = None,
           master_key_file: Path | None = None) -> BackupReport:
    """Write a backup of the vault in ``data_dir`` to ``out`` (see the module docstring). The
    vault may be running; a master-key rotation may not (the data directory's lock)."""
    t0 = time.monotonic()
    settings = VaultSettings(data_dir=Path(data_dir), db_url=db_url,
                             master_key_file=master_key_file)
    url = settings.database_url
    if not url.startswith("sqlite"):
        raise InvalidInput("drsite vault backup covers the embedded SQLite database only",
                           hint="Back up PostgreSQL with pg_dump (or pg_basebackup) and copy "
                                f"{settings.pki_dir} with it.")
    db_path = Path(make_url(url).database or "")
    if not db_path.is_file():
        raise InvalidInput(f"{settings.data_dir} holds no vault database",
                           hint="Pass --data with the directory 'drsite vault serve' uses.")
    lock = DataDirLock(settings.data_dir, exclusive=False)  # no rotation meanwhile
    try:
        ring = load_keyring(settings.master_key_path)
        if ring is None or ring.kids != {ring.active.kid}:
            raise SecretUnreadable(f"master key file {settings.master_key_path} is missing or a "
                                   "rotation is unfinished",
                                   hint="Finish 'drsite vault rotate-master-key' first.")
        members: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
            snap = Path(tmp) / DB_MEMBER
            _snapshot(db_path, snap)
            check = Database(sqlite_url(snap))
            try:
                kids = sealed_kids(check)
            finally:
                check.dispose()
            if kids - {ring.active.kid}:
                raise SecretUnreadable("the database holds secrets under master keys "
                                       f"{', '.join(sorted(kids - {ring.active.kid}))} that "
                                       f"{settings.master_key_path} does not hold")
            members[DB_MEMBER] = snap.read_bytes()
        for rel in PUBLIC_FILES:
            path = settings.data_dir / rel
            if path.exists():
                members[rel] = path.read_bytes()
        for rel in SECRET_FILES:
            path = settings.data_dir / rel
            if path.exists():
                env = ring.seal(path.read_text(), PURPOSE + rel)
                members[rel + SEALED_SUFFIX] = json.dumps(env).encode()
    except OSError as e:
        raise classify_os_error(e, f"backup of {settings.data_dir}") from e
    finally:
        lock.release()
    manifest = {"format": FORMAT, "created_at": time.time(), "version": drsite.__version__,
                "master_key_id": ring.active.kid,
                "members": {name: _digest(data) for name, data in sorted(members.items())}}
    raw_manifest = json.dumps(manifest, indent=1).encode()
    # the manifest's digest sealed under the master key: only its holder makes a backup that
    # restores (the manifest's digests alone are recomputed by anyone who alters a member)
    seal = json.dumps(ring.seal(_digest(raw_manifest), PURPOSE + MANIFEST)).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [(MANIFEST, raw_manifest), (MANIFEST_SEAL, seal),
                           *sorted(members.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    try:
        atomic_write_bytes(out, buf.getvalue())
        os.chmod(out, 0o600)
    except OSError as e:
        raise classify_os_error(e, f"backup file {out}") from e
    return BackupReport(str(out), len(buf.getvalue()), ring.active.kid, sorted(members),
                        round(time.monotonic() - t0, 3))


def _read_archive(path: Path) -> tuple[dict[str, Any], bytes, bytes, dict[str, bytes]]:
    """(manifest, its raw bytes, its seal, the other members) of the archive at ``path``,
    the members checked against the manifest (not yet the seal: that needs the key)."""
    try:
        with tarfile.open(path, mode="r") as tar:
            files: dict[str, bytes] = {}
            for m in tar.getmembers():
                if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/"):
                    raise CorruptData(f"backup {path} holds an unexpected member {m.name!r}")
                f = tar.extractfile(m)
                files[m.name] = f.read() if f is not None else b""
    except (OSError, tarfile.TarError) as e:
        raise CorruptData(f"backup {path} cannot be read: {e}",
                          hint="Use another copy of the backup.") from e
    try:
        raw = files.pop(MANIFEST)
        seal = files.pop(MANIFEST_SEAL)
        manifest = json.loads(raw)
        want = dict(manifest["members"])
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptData(f"backup {path} has no readable, sealed manifest") from e
    if manifest.get("format") != FORMAT:
        raise InvalidInput(f"backup {path} is of format {manifest.get('format')}, not {FORMAT}",
                           hint="Restore it with the drsite version that wrote it.")
    if set(want) != set(files) or any(_digest(files[n]) != d for n, d in want.items()):
        raise CorruptData(f"backup {path} is damaged: its members do not match its manifest",
                          hint="Use another copy of the backup.")
    return manifest, raw, seal, files


def _check_seal(path: Path, ring: Keyring, raw: bytes, seal: bytes) -> None:
    """The manifest was sealed under the master key ``ring`` holds (so every member, whose
    digest it lists, is as the backup wrote it)."""
    try:
        ok = ring.unseal(json.loads(seal), PURPOSE + MANIFEST) == _digest(raw)
    except (ValueError, TypeError, AttributeError, SecretUnreadable):
        ok = False
    if not ok:
        raise CorruptData(f"backup {path} was not made with this master key, or was altered "
                          "since: its manifest's seal does not match",
                          hint="Restore a copy of the backup kept where it cannot be changed, "
                               "with the master key the vault used when it was made.")


def _holds_vault(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("vault.db", "pki", KEY_FILE))


def restore(archive: Path, data_dir: Path, *, master_key_file: Path,
            force: bool = False) -> dict[str, Any]:
    """Restore ``archive`` into ``data_dir`` (see the module docstring); returns a report."""
    data_dir = Path(data_dir).absolute()
    manifest, raw_manifest, seal, files = _read_archive(Path(archive))
    key: MasterKey = read_key(Path(master_key_file))
    if key.kid != manifest["master_key_id"]:
        raise SecretUnreadable(f"{master_key_file} holds master key {key.kid}, but the backup's "
                               f"secrets are sealed under {manifest['master_key_id']}",
                               hint="Pass the master key file the vault used when the backup "
                                    "was made (backups never contain it).")
    ring = Keyring(key)
    _check_seal(Path(archive), ring, raw_manifest, seal)
    replaced: Path | None = None
    lock: DataDirLock | None = None
    if _holds_vault(data_dir):
        try:
            lock = DataDirLock(data_dir, exclusive=True)
        except Conflict:
            raise Conflict(f"a vault is running on {data_dir}: it is never restored over",
                           hint="Stop that vault first (and restore into a new directory, or "
                                "pass --force to replace it).") from None
        if not force:
            lock.release()
            raise Conflict(f"{data_dir} holds a vault already",
                           hint="Restore into a new directory, or pass --force to replace it "
                                "(the old one is renamed aside, not deleted).")
    elif data_dir.exists() and any(data_dir.iterdir()):
        raise Conflict(f"{data_dir} is not empty and holds no vault",
                       hint="Restore into a new or empty directory.")
    stage: Path | None = None
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=data_dir.parent))
        os.chmod(stage, 0o700)
        (stage / "pki").mkdir(mode=0o700)
        atomic_write_bytes(stage / DB_MEMBER, files[DB_MEMBER])
        for rel in PUBLIC_FILES:
            if rel in files:
                atomic_write_bytes(stage / rel, files[rel])
        for rel in SECRET_FILES:
            sealed = files.get(rel + SEALED_SUFFIX)
            if sealed is not None:
                text = ring.unseal(json.loads(sealed), PURPOSE + rel)
                atomic_write_bytes(stage / rel, str(text).encode())
        write_key(stage / KEY_FILE, key)
        fix_modes(stage)
        db = Database(sqlite_url(stage / DB_MEMBER))
        try:
            ok = db.engine.raw_connection()
            try:
                row = ok.cursor().execute("PRAGMA integrity_check").fetchone()
            finally:
                ok.close()
            if not row or row[0] != "ok":
                raise CorruptData(f"the backup's database fails SQLite's integrity check: {row}")
            db.migrate()
            with db.tx() as s:   # ask the agents for their whole catalogues (``heartbeat``)
                s.execute(update(Item).values(acked_seq=RESTORED))
                # which access list each store agent holds is unknown (it may have taken newer
                # ones since the backup): no grant counts as confirmed before it says again
                s.execute(update(Host).values(store_acl_digest=None, store_acl_sent=None,
                                              store_acl_sent_at=None,
                                              store_acl_confirmed_at=None))
            # every sealed value names this key and opens under it (a value in clear, from a
            # vault older than sealing, is sealed now: what the vault does at start anyway)
            seal_clear_values(db, open_keyring(db, stage / KEY_FILE))
        finally:
            db.dispose()
        if data_dir.exists():
            if _holds_vault(data_dir):
                replaced = data_dir.with_name(f"{data_dir.name}.replaced-{int(time.time())}")
                os.rename(data_dir, replaced)
            else:
                data_dir.rmdir()  # an empty directory (anything else: OSError, refused)
        os.rename(stage, data_dir)
        stage = None
        fsync_dir(data_dir.parent)
    except OSError as e:
        raise classify_os_error(e, f"restore into {data_dir}") from e
    finally:
        if stage is not None:   # not renamed into place: nothing of it is used
            shutil.rmtree(stage, ignore_errors=True)
            if replaced is not None and not data_dir.exists():
                os.rename(replaced, data_dir)   # put the old vault back
                replaced = None
        if lock is not None:
            lock.release()
    return {"data_dir": str(data_dir), "master_key_id": key.kid,
            "backup_created_at": manifest.get("created_at"),
            "replaced": str(replaced) if replaced else None,
            "members": sorted([*files, KEY_FILE])}
