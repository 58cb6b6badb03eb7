"""The ``store_rekey`` command: re-encrypt a cloud store's old objects under its active key
(:mod:`drsite.store.rekey`), run by an agent that holds the store's spec (the vault picks the
source host of an item on that store and sends the full spec in the arguments; they are sealed
at rest and scrubbed when the command ends).

Arguments ``{store: spec, start_after: key|null}``; progress is posted as ``running`` results
carrying the report (its ``last_key`` is the cursor the vault keeps, so a new command resumes
there); the result is the final report. Idempotent: objects already under the active key cost
one header read.

Responsible for: opening the store and reporting. Not responsible for: the pass itself
(``store.rekey``), choosing the host or keeping the cursor (the vault's ``RekeyStore`` job).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from drsite.agent.link import Command, VaultLink
from drsite.core.errors import Conflict, DrsiteError, InvalidInput
from drsite.core.states import CommandStatus
from drsite.store.crypto import EncryptedStore
from drsite.store.factory import StoreSpec, open_store
from drsite.store.rekey import RekeyReport, rekey

log = logging.getLogger(__name__)


def run_rekey(link: VaultLink, cmd: Command, stop: threading.Event) -> dict[str, Any]:
    """Run the pass; returns the final report (partial when ``stop`` was set: the caller then
    reports nothing, and the vault's re-sent command resumes)."""
    raw_spec = cmd.args.get("store")
    if not isinstance(raw_spec, dict) or raw_spec.get("redacted"):
        raise InvalidInput("store_rekey needs the store's full spec",
                           hint="Start the rekey again ('drsite stores rekey STORE').")
    spec = StoreSpec.from_dict(raw_spec)
    store = open_store(spec)
    if not isinstance(store, EncryptedStore):
        raise Conflict(f"store {spec.name} is not encrypted: nothing to re-encrypt")
    start_after = cmd.args.get("start_after")

    def progress(rep: RekeyReport) -> None:
        pct = 100.0 * rep.scanned / rep.total if rep.total else 0.0
        try:
            link.post_result(cmd.command_id, status=CommandStatus.RUNNING,
                             progress=min(99.0, pct), result=rep.to_dict())
        except DrsiteError as e:   # the cursor is an optimisation: the pass goes on
            log.debug("rekey progress of %s not posted: %s", spec.name, e)

    rep = rekey(store, start_after=str(start_after) if start_after else None,
                on_progress=progress, should_stop=stop.is_set)
    log.info("store %s: %d object(s) re-encrypted under key %s, %d already, %d mutable "
             "record(s) left for their owners", spec.name, rep.rewritten, rep.active_key_id,
             rep.already, rep.mutable_old)
    return rep.to_dict()
