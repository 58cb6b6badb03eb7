"""The vault's CA kept in its database (table ``vault_ca``, the key sealed under the master
key), so that a standby vault — its database a streaming replica of the active's — serves the
agents with the same CA after a promotion (issue 14).

:func:`sync_ca` at every vault start: an active vault whose database has no CA yet publishes
its own (``DATA/pki``, created if missing); a data directory without a CA takes the
database's (a standby, or a second vault process elsewhere); a data directory whose CA is not
the database's is refused — agents registered with one would not trust the other.

Responsible for: which CA a vault process serves with. Not responsible for: issuing
certificates (``pki``), the server certificate (each vault makes its own from the CA).
"""

from __future__ import annotations

from pathlib import Path

from drsite.core.errors import PermanentError
from drsite.pki import CA_CERT, CertificateAuthority
from drsite.vault.db.database import Database
from drsite.vault.db.models import VaultCa

ROW = "ca"


def _mismatch(pki_dir: Path) -> PermanentError:
    return PermanentError(
        f"the CA in {pki_dir} is not the CA in the vault's database: agents registered with "
        "one would not trust a vault serving the other",
        hint="Give this vault the data directory it ran with, or a new empty one (the CA is "
             "then taken from the database).")


def sync_ca(db: Database, pki_dir: Path, now: float, *, writable: bool) -> CertificateAuthority:
    """The CA this vault serves with (see the module docstring). ``writable`` False (a
    standby) never writes the database: a database without a CA is then refused."""
    with db.read() as s:
        row = s.get(VaultCa, ROW)
        held = (row.cert.encode(), row.key.encode()) if row is not None else None
    if held is None:
        if not writable:
            raise PermanentError(
                "the vault's database holds no CA yet, so this standby vault cannot take over "
                "the agents' CA",
                hint="Start the active vault (drsite vault serve) once on the primary "
                     "database; it stores its CA there.")
        ca = CertificateAuthority.load_or_create(pki_dir)
        with db.tx() as s:
            if s.get(VaultCa, ROW) is None:
                s.add(VaultCa(name=ROW, cert=ca.ca_pem.decode(), key=ca.key_pem().decode(),
                              created_at=now))
        with db.read() as s:  # another process may have published first
            row = s.get(VaultCa, ROW)
            if row is None or row.cert.encode() != ca.ca_pem:
                raise _mismatch(pki_dir)
        return ca
    cert_pem, key_pem = held
    if (pki_dir / CA_CERT).exists():
        ca = CertificateAuthority.load_or_create(pki_dir)
        if ca.ca_pem != cert_pem:
            raise _mismatch(pki_dir)
        return ca
    return CertificateAuthority.install(pki_dir, cert_pem, key_pem)
