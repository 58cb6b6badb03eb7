"""The witness of a vault pair (issue 14 part 3): the third voter that lets the standby vault
promote itself when the active one is lost — and only then (docs/control-plane.md, "Witness").

``drsite vault witness --data DIR --listen HOST:PORT`` runs it: a small HTTPS process, its
server certificate issued once by the pair's CA (``--ca-data VAULT_DATA`` at first start; the
CA key is not kept), the vaults authenticated by a shared token (``DIR/witness.token``, 0600,
made at first start; each vault reads it with ``--witness-token-file``). It records one thing,
durably (``DIR/witness.json``, atomic write + fsync at every change): the **holder** (a vault's
URL), its **epoch** (the controller lease's), the holder's lease period, and when the witness
last heard from it.

- **renew** (the active vault, every ``lease_s / 3``: "I am X at epoch E"): the newest epoch
  wins, a tie belongs to the recorded holder (none recorded yet: the first renewal records its
  vault, at whatever epoch — a new pair's active renews at epoch 0 before its first lease).
  X at E > recorded → X is the holder at E; X is the holder at E → heard now; anything else →
  ``fenced`` with the recorded holder and epoch (the vault fences itself: rule 3).
- **claim** (the standby vault, after its peer was silent ``after_s`` seconds): one
  conditional write under a lock — granted only if the claimed epoch is newer than the
  recorded one and the holder has not renewed for ``after_s`` seconds, ``after_s`` above the
  holder's lease period (so the holder, cut off from the witness and its peer, has stopped
  writing: rule 2); with no holder recorded (no active vault ever renewed here: one may be
  writing without this witness), refused. A grant counts as hearing from the new holder, so a
  second claimant within ``after_s`` is refused: two claimants never both win. ``force`` (an
  operator's ``drsite vault promote``) skips the quiet period, never the epoch rule.
- **state**: what is recorded (no secret, no token needed).

Times: the witness's own monotonic clock for "quiet for N seconds". After a restart the
witness cannot tell how long the holder was quiet while it was down, so it counts the holder as
heard at its start: a restart delays a promotion, never hastens one.

Responsible for: the record and its conditional changes. Not responsible for: promoting
anything (the standby does, ``vault/witnesslink.py``), or what a vault writes.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header
from pydantic import BaseModel, Field

from drsite import tlsutil
from drsite.core.errors import AuthError, InvalidInput, PermanentError
from drsite.fsutil import atomic_write_bytes
from drsite.logsetup import configure_logging
from drsite.pki import CA_CERT, CertificateAuthority
from drsite.vault.api import errors

log = logging.getLogger(__name__)

STATE_FILE = "witness.json"
TOKEN_FILE = "witness.token"


@dataclass(frozen=True)
class Record:
    """What the witness holds: the holder (a vault's URL, None before the first renewal), its
    epoch, its lease period, and when it was last heard from (wall clock, for people)."""

    holder: str | None
    epoch: int
    lease_s: float
    heard_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"holder": self.holder, "epoch": self.epoch, "lease_s": self.lease_s,
                "heard_at": self.heard_at}


class WitnessBook:
    """The record and its two conditional changes (see the module docstring). Thread-safe;
    every change is on disk (fsynced) before it is answered."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(data_dir) / STATE_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self.record = self._load()
        self._heard = clock()  # a restart counts as hearing from the holder (see module doc)

    def _load(self) -> Record:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Record(None, 0, 0.0, 0.0)
        except (OSError, ValueError) as e:
            raise PermanentError(f"the witness record {self.path} is unreadable: {e}",
                                 hint="Restore it from a backup, or, only when both vaults are "
                                      "known, remove it (the active vault's next renewal "
                                      "records it again).") from e
        holder = raw.get("holder")
        return Record(str(holder) if holder else None, int(raw.get("epoch", 0)),
                      float(raw.get("lease_s", 0.0)), float(raw.get("heard_at", 0.0)))

    def _save(self, rec: Record) -> None:
        atomic_write_bytes(self.path, json.dumps(rec.to_dict()).encode())
        self.record = rec

    def quiet_s(self) -> float:
        """Seconds since the witness last heard from the holder."""
        return max(0.0, self._clock() - self._heard)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {**self.record.to_dict(), "quiet_s": round(self.quiet_s(), 3)}

    def renew(self, holder: str, epoch: int, lease_s: float) -> dict[str, Any]:
        """The active vault's renewal. ``{"ok": True, ...}`` or ``{"ok": False, "fenced":
        True, "holder", "epoch"}`` (a newer epoch, or the same epoch held by another vault)."""
        with self._lock:
            rec = self.record
            if (rec.holder is None or epoch > rec.epoch
                    or (epoch == rec.epoch and holder == rec.holder)):
                if holder != rec.holder or epoch != rec.epoch:
                    log.warning("witness: holder %s at epoch %d (was %s at epoch %d)", holder,
                                epoch, rec.holder, rec.epoch)
                self._save(Record(holder, epoch, lease_s, time.time()))
                self._heard = self._clock()
                return {"ok": True, "fenced": False, **self.record.to_dict()}
            return {"ok": False, "fenced": True, **rec.to_dict()}

    def claim(self, claimant: str, epoch: int, after_s: float, lease_s: float, *,
              force: bool = False) -> dict[str, Any]:
        """The standby's claim (see the module docstring): ``{"granted": bool, "why", ...}``."""
        with self._lock:
            rec = self.record
            quiet = self.quiet_s()
            why = ""
            if epoch <= rec.epoch:
                why = f"epoch {epoch} is not newer than the recorded epoch {rec.epoch}"
            elif not force and rec.holder is None:
                # no active vault ever renewed here: one may be writing without this witness
                # (configured at one vault only, or a witness whose record was lost)
                why = ("no active vault has renewed at this witness: start both vaults with "
                       "--witness")
            elif not force and rec.holder != claimant:
                if after_s <= rec.lease_s:
                    why = (f"the quiet period {after_s:g} s is not above the holder's lease "
                           f"{rec.lease_s:g} s")
                elif quiet < after_s:
                    why = f"the holder {rec.holder} was heard {quiet:.1f} s ago"
            if why:
                return {"granted": False, "why": why, **rec.to_dict(), "quiet_s": round(quiet, 3)}
            log.warning("witness: %s claims epoch %d (%s): granted (holder was %s at epoch %d, "
                        "quiet %.1f s)", claimant, epoch, "forced" if force else "quiet", rec.holder,
                        rec.epoch, quiet)
            self._save(Record(claimant, epoch, lease_s, time.time()))
            self._heard = self._clock()
            return {"granted": True, "why": "", **self.record.to_dict(), "quiet_s": 0.0}


# ------------------------------------------------------------------------------ the process

class RenewBody(BaseModel):
    holder: str = Field(min_length=1, max_length=2000)
    epoch: int = Field(ge=0)
    lease_s: float = Field(gt=0, le=600)


class ClaimBody(RenewBody):
    after_s: float = Field(gt=0, le=86400)
    force: bool = False


def create_app(book: WitnessBook, token: str) -> FastAPI:
    app = FastAPI(title="drsite vault witness", openapi_url=None, docs_url=None, redoc_url=None)
    errors.install(app)

    def check(authorization: str | None) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise AuthError("the witness token is missing or wrong",
                            hint="Pass the witness's DIR/witness.token with "
                                 "--witness-token-file.")

    @app.get("/witness/state")
    def state() -> dict[str, Any]:
        return book.state()

    @app.post("/witness/renew")
    def renew(body: RenewBody,
              authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        check(authorization)
        return book.renew(body.holder.rstrip("/"), body.epoch, body.lease_s)

    @app.post("/witness/claim")
    def claim(body: ClaimBody,
              authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        check(authorization)
        return book.claim(body.holder.rstrip("/"), body.epoch, body.after_s, body.lease_s,
                          force=body.force)

    return app


def prepare(data_dir: Path, ca_data: Path | None) -> tuple[str, Path, Path, Path]:
    """Make the witness's data directory ready (idempotent): its server certificate from the
    pair's CA (``ca_data``: a vault's data directory, needed at first start only) and its token.
    Returns (token, ca file, cert file, key file)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = data_dir / "pki"
    cert, key, ca_file = pki / "server.pem", pki / "server.key", pki / CA_CERT
    if not (cert.exists() and key.exists() and ca_file.exists()):
        if ca_data is None or not (ca_data / "pki" / CA_CERT).exists():
            raise InvalidInput(f"the witness in {data_dir} has no certificate yet",
                               hint="Start it once with --ca-data VAULT_DATA (the active vault's "
                                    "data directory, on the same machine): the pair's CA "
                                    "issues its server certificate; the CA key is not copied.")
        ca = CertificateAuthority.load_or_create(ca_data / "pki")
        cert_pem, key_pem = ca.issue_server_cert(hostnames=["localhost"], ips=["127.0.0.1"])
        pki.mkdir(mode=0o700, exist_ok=True)
        atomic_write_bytes(key, key_pem)
        os.chmod(key, 0o600)
        atomic_write_bytes(ca_file, ca.ca_pem)
        atomic_write_bytes(cert, cert_pem + ca.ca_pem)
    tok = data_dir / TOKEN_FILE
    if not tok.exists():
        atomic_write_bytes(tok, (secrets.token_urlsafe(32) + "\n").encode())
        os.chmod(tok, 0o600)
    return tok.read_text().strip(), ca_file, cert, key


def run_witness(data_dir: Path, *, host: str, port: int, ca_data: Path | None) -> None:
    """Run the witness in the foreground until SIGTERM/SIGINT (blocking)."""
    os.umask(0o077)
    configure_logging()
    token, ca_file, cert, key = prepare(data_dir, ca_data)
    book = WitnessBook(data_dir)
    log.info("witness in %s: holder %s at epoch %d", data_dir, book.record.holder,
             book.record.epoch)
    # the vaults authenticate with the token; a client certificate is optional (agents' and
    # vaults' certificates both chain to the pair's CA, so a certificate alone says too little)
    tlsutil.serve(create_app(book, token), host=host, port=port, certfile=cert, keyfile=key,
                  cafile=ca_file, client_cert="optional", log_level="warning")
