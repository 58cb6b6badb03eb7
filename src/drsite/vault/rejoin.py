"""``drsite vault rejoin``: a fenced old active vault becomes the standby of the active one
(issue 14).

Steps, each idempotent (run it again after any failure): take ``DATA/vault.lock`` exclusively
(the vault must be stopped); with a drsite-run cluster, rewind it onto the active database's
timeline (``pg_rewind``, else a fresh base backup: ``pgcluster.LocalCluster.rejoin``) and start
it streaming from a replication slot; check that the vault's database is now a hot standby;
only then remove the fence marker. The writes the old active made after the promotion are
discarded with its timeline: they were never the pair's.

Responsible for: the order of those steps and refusing to lift the fence early. Not
responsible for: running the vault afterwards (``drsite vault serve --peer ACTIVE_URL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drsite.core.errors import Conflict, InvalidInput, PermanentError
from drsite.vault.db.database import Database
from drsite.vault.masterkey import DataDirLock
from drsite.vault.pairfence import clear_marker, load_marker
from drsite.vault.pgcluster import LocalCluster


def rejoin(data_dir: Path, *, pg: Path | None, pg_port: int, primary_port: int, slot: str,
           db_url: str | None) -> dict[str, Any]:
    """See the module docstring. ``pg``: the vault's drsite-run cluster directory (port
    ``pg_port``), or None when its operator made the database a standby already (then
    ``db_url`` names it)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InvalidInput(f"no vault data directory at {data_dir}")
    try:
        lock = DataDirLock(data_dir, exclusive=True)
    except Conflict:
        raise Conflict(f"the vault on {data_dir} is running",
                       hint="Stop it (it is fenced and writes nothing), then run 'drsite vault "
                            "rejoin' again.") from None
    try:
        how = "external"
        if pg is not None:
            cluster = LocalCluster(Path(pg), pg_port)
            how = cluster.rejoin(primary_port, slot)
            db_url = db_url or cluster.url()
        if db_url is None:
            raise InvalidInput("name the vault's database: --pg (a drsite-run cluster) or --db",
                               hint="Make the database a hot standby of the active one first "
                                    "(pg_rewind or pg_basebackup), then pass --db URL.")
        db = Database(db_url)
        try:
            standby = db.in_recovery()
        finally:
            db.dispose()
        if not standby:
            raise PermanentError("the vault's database still accepts writes: it is not a "
                                 "standby of the active vault's yet, so the fence stays",
                                 hint="Rewind it onto the active database (pg_rewind, or a new "
                                      "pg_basebackup) and start it as a hot standby, or pass "
                                      "--pg for a drsite-run cluster.")
        was = load_marker(data_dir)
        cleared = clear_marker(data_dir)
        return {"how": how, "fence_cleared": cleared,
                "fenced_by": was.to_dict() if was is not None else None}
    finally:
        lock.release()
