"""``run_vault``: the vault as a process (what ``drsite vault serve`` calls).

Bootstraps ``data_dir`` (CA in ``DATA/pki``, HTTPS certificate with SANs localhost and
127.0.0.1, database schema via ``alembic upgrade head``, the master key sealing secrets at rest,
first admin token in ``DATA/admin.token`` mode 0600 — printed once, at first start), then serves
the API over HTTPS (client certificates optional at the TLS layer, required by agent routes) with
the job runner, scheduler and health loop running inside, until SIGTERM/SIGINT. The process runs
with umask 077: every file it (or a vault-side plan script) creates is private.

With ``workers`` > 1 (PostgreSQL only) this process bootstraps, then forks that many worker
processes sharing the listening socket (``tlsutil.serve_workers``) and supervises them; every
worker serves the API, and the one holding the controller lease runs the background work
(``vault/controller.py``) — as does one of several ``vault serve`` processes, on one machine or
several, sharing a database.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter

from drsite import tlsutil
from drsite.core.errors import InvalidInput
from drsite.logsetup import configure_logging
from drsite.vault.app import create_app
from drsite.vault.context import ADMIN_TOKEN_FILE, attach, bootstrap
from drsite.vault.db.database import is_sqlite
from drsite.vault.settings import VaultSettings

log = logging.getLogger(__name__)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidInput(f"invalid listen address {listen!r}", hint="Use HOST:PORT, e.g. 127.0.0.1:8443.")
    return host.strip("[]"), int(port)


MAX_WORKERS = 64


def run_vault(data_dir: Path, listen: str = "127.0.0.1:8443", db_url: str | None = None,
              heartbeat_interval: float = 2.0, master_key_file: Path | None = None,
              routers: Sequence[APIRouter] = (), workers: int = 1,
              lease_s: float = 10.0, url: str | None = None,
              peer_url: str | None = None, witness_url: str | None = None,
              witness_token_file: Path | None = None,
              auto_promote_after: float | None = None) -> None:
    """Run a vault in the foreground until it is asked to stop (blocking). ``routers``: more
    routes to serve beside the API (the CLI adds the dashboard). ``workers``: API processes
    (more than one needs PostgreSQL). ``lease_s``: the controller lease period. ``url``: where
    agents reach this vault (default ``https://LISTEN``). ``peer_url``: the other vault of a pair
    (this one, when active, writes only while that one was not promoted past it).
    ``witness_url`` (with ``witness_token_file``): the pair's witness (``vault/witness.py``);
    ``auto_promote_after``: seconds of the peer's silence after which this vault, a standby,
    claims at the witness and promotes itself if granted (above ``lease_s``)."""
    host, port = parse_listen(listen)
    if heartbeat_interval <= 0:
        raise InvalidInput("heartbeat_interval must be > 0")
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidInput(f"workers must be between 1 and {MAX_WORKERS}")
    if not 1.0 <= lease_s <= 600.0:
        raise InvalidInput("the controller lease must be between 1 and 600 seconds")
    if workers > 1 and is_sqlite(db_url or "sqlite"):
        raise InvalidInput("several API workers need PostgreSQL: SQLite has one writer at a time "
                           "and stays the one-process default",
                           hint="Pass --db postgresql+psycopg://USER@HOST/DB, or --workers 1.")
    if peer_url is not None and is_sqlite(db_url or "sqlite"):
        raise InvalidInput("a vault pair (--peer) needs PostgreSQL: each vault runs on its own "
                           "database, the standby's a streaming replica of the active's",
                           hint="Pass --db postgresql+psycopg://… (see README, production "
                                "layout across two sites), or leave --peer out.")
    if peer_url is not None and not peer_url.startswith("https://"):
        raise InvalidInput(f"peer URL {peer_url!r} is not an https:// URL")
    witness_token = _check_witness(peer_url, witness_url, witness_token_file,
                                   auto_promote_after, lease_s)
    os.umask(0o077)
    configure_logging()
    settings = VaultSettings(data_dir=Path(data_dir), db_url=db_url, heartbeat_interval=heartbeat_interval,
                             master_key_file=master_key_file, lease_s=lease_s, listen=listen,
                             url=url, peer_url=peer_url, witness_url=witness_url,
                             witness_token=witness_token, auto_promote_after=auto_promote_after)
    vault = bootstrap(settings)
    if vault.new_admin_token is not None:
        # the first admin token is in DATA/admin.token (0600); it is shown once on an interactive
        # terminal, never written into a log file
        where = settings.data_dir / ADMIN_TOKEN_FILE
        if sys.stdout.isatty():
            sys.stdout.write(f"admin token (saved in {where}, shown once): "
                             f"{vault.new_admin_token}\n")
            sys.stdout.flush()
        else:
            log.info("first admin token created; it is in %s (mode 0600)", where)
    log.info("vault data in %s, database %s", settings.data_dir, _redact(settings.database_url))
    if workers > 1:
        # the supervisor holds nothing open: each worker opens the data and the database itself
        tls = vault.tls
        vault.close()
        tlsutil.serve_workers(lambda: settle_heap(create_app(settings, attach(settings),
                                                             routers=routers)),
                              workers=workers, host=host, port=port, certfile=tls.cert,
                              keyfile=tls.key, cafile=tls.ca, client_cert="optional")
        return
    app = settle_heap(create_app(settings, vault, routers=routers))
    try:
        tlsutil.serve(app, host=host, port=port, certfile=vault.tls.cert, keyfile=vault.tls.key,
                      cafile=vault.tls.ca, client_cert="optional")
    finally:
        vault.close()


T = TypeVar("T")


def settle_heap(app: T) -> T:
    """Move everything the start-up made (modules, mappers, routes, schemas: most of a vault's
    objects, and none of them garbage) out of the garbage collector's reach (``gc.freeze``),
    so that its full collections scan only what requests and jobs create. Measured at 1,000
    items: full collections of 150–320 ms every 7–10 s, each stalling every request of the
    process (the API's p99). Returns ``app``."""
    gc.collect()
    gc.freeze()
    return app


def _check_witness(peer_url: str | None, witness_url: str | None, token_file: Path | None,
                   after_s: float | None, lease_s: float) -> str | None:
    """The witness options, checked before anything starts; the witness token."""
    if witness_url is None:
        if after_s is not None or token_file is not None:
            raise InvalidInput("--auto-promote-after and --witness-token-file need --witness",
                               hint="Pass --witness URL of the pair's witness ('drsite vault "
                                    "witness'), or leave them out.")
        return None
    if peer_url is None:
        raise InvalidInput("a witness (--witness) is for a vault pair: pass --peer too")
    if not witness_url.startswith("https://"):
        raise InvalidInput(f"witness URL {witness_url!r} is not an https:// URL")
    if after_s is not None and after_s <= lease_s:
        raise InvalidInput(f"--auto-promote-after {after_s:g} must be above the controller lease "
                           f"({lease_s:g} s): the old active must have stopped writing before "
                           "the witness lets this vault promote",
                           hint=f"Pass --auto-promote-after {max(lease_s * 1.5, lease_s + 5):g} "
                                "or more, or a shorter --controller-lease.")
    if token_file is None:
        raise InvalidInput("--witness needs --witness-token-file (the witness's "
                           "DIR/witness.token)")
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise InvalidInput(f"cannot read the witness token file {token_file}: {e.strerror}",
                           hint="Copy the witness's DIR/witness.token (0600) to this vault's "
                                "machine.") from e
    if not token:
        raise InvalidInput(f"the witness token file {token_file} is empty")
    return token


def _redact(url: str) -> str:
    """A database URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, where = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{where}" if ":" in cred else f"{scheme}://{user}@{where}"
