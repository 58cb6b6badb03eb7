"""Settings of one vault instance (typed values; the CLI builds them from its options)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from drsite.core.clock import Clock, SystemClock
from drsite.vault.db.database import sqlite_url


def local_minute_of_day(t: float) -> int:
    lt = time.localtime(t)
    return lt.tm_hour * 60 + lt.tm_min


@dataclass
class VaultSettings:
    """What a vault needs to run.

    ``db_url`` None → SQLite file ``DATA/vault.db``. ``master_key_file`` None →
    ``DATA/master.key`` (the key that seals secrets at rest, see ``vault/masterkey.py``).
    ``clock`` and ``minute_of_day`` are injected for tests (resync windows are in local time by
    default). ``background`` runs the job runner, scheduler and health loop in a thread while
    the app is up — in the one vault process on the database that holds the controller lease
    (``vault/controller.py``, period ``lease_s``); tests set it False and call ``tick()``
    themselves. ``listen`` and ``url`` are only shown (who the controller is; a standby vault
    names the active one).
    """

    data_dir: Path
    db_url: str | None = None
    master_key_file: Path | None = None
    heartbeat_interval: float = 2.0
    missed_heartbeats: int = 3
    clock: Clock = field(default_factory=SystemClock)
    minute_of_day: Callable[[float], int] = local_minute_of_day
    background: bool = True
    loop_interval: float = 0.25  # a cycle is queued at most this late (plus one pass)
    health_interval: float = 2.0  # seconds between health passes of the background loop
    # a command delivered but not acknowledged (still "sent") is delivered again after this
    resend_after_s: float = 30.0
    # last resort: a "running" command with no news (progress is posted at least every 10 s)
    # for this many heartbeat intervals is delivered again (agents are idempotent). A command
    # the agent's heartbeat does not hold is re-delivered at once (``commands.deliver``).
    stale_running_heartbeats: int = 30
    retention_every_s: float = 3600.0
    # a cancelled EnableProtection waits this long for the agent to confirm the unprotect
    rollback_timeout_s: float = 600.0
    # an agent's clock may run this far ahead of the vault's when its retention removes points
    retention_skew_s: float = 300.0
    # consistency groups: a clock cut (``vault/barrier_design.md``) instead of the two-phase
    # barrier's prepare round trip; the guest is held ``barrier_cut_margin_s`` plus twice the
    # agent's clock uncertainty, plus the seal
    barrier_clock_cut: bool = True
    barrier_cut_margin_s: float = 0.02
    # the margin when the guest times the cut itself (a driver with ``ScheduledCut``): no
    # call and no thread wake-up in it (the hold is armed ahead, the first write after its
    # instant puts it in effect), only a write in flight at that instant
    barrier_cut_guest_margin_s: float = 0.005
    # the cut is this fraction of the bound ahead of the barrier's start (the command's
    # delivery and the agent's preparation fit in it); a member has until the cut plus half
    # the bound to say it took the cut
    barrier_cut_lead: float = 0.6
    # the controller lease: a controller that stops renewing it is replaced after this long
    lease_s: float = 10.0
    # PostgreSQL ends a session idle inside a transaction for this long; None: lease_s / 2 (at
    # least 2 s), so a stopped vault process cannot hold the lease's share lock past its lease.
    # The in-process test harness sets it long (it stops no process; a loaded test box
    # stalling its own worker must not fail a test of API logic)
    idle_in_tx_limit_s: float | None = None
    listen: str | None = None
    # where agents and operators reach this vault (default https://LISTEN): recorded in the
    # lease, so a standby vault names the active one in its refusals
    url: str | None = None
    # the other vault of a pair (issue 14): an active vault writes only while this peer has
    # not been promoted past it (vault/pairfence.py)
    peer_url: str | None = None
    # the pair's witness (vault/witness.py): with it, an active vault cut off from both its
    # peer and the witness stops writing, and a standby whose peer was silent
    # ``auto_promote_after`` seconds promotes itself if the witness grants it
    witness_url: str | None = None
    witness_token: str | None = None
    auto_promote_after: float | None = None

    @property
    def advertised_url(self) -> str | None:
        if self.url:
            return self.url.rstrip("/")
        return f"https://{self.listen}" if self.listen else None

    @property
    def database_url(self) -> str:
        return self.db_url or sqlite_url(self.data_dir / "vault.db")

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def idle_in_tx_s(self) -> float:
        """PostgreSQL ends a session idle inside a transaction for this long (a stopped process
        must not keep the controller lease's share lock beyond its lease)."""
        if self.idle_in_tx_limit_s is not None:
            return self.idle_in_tx_limit_s
        return max(2.0, self.lease_s / 2.0)

    @property
    def stale_running_s(self) -> float:
        # not below 30 s: three of the agent's progress posts (every 10 s while running)
        return max(30.0, self.stale_running_heartbeats * self.heartbeat_interval)

    @property
    def agent_down_after_s(self) -> float:
        return self.missed_heartbeats * self.heartbeat_interval

    @property
    def store_gone_after_s(self) -> float:
        """A host silent for this long is gone, not late: EnableProtection waiting for its
        source host or its recovery store's host fails then (with what to do), not when the
        host missed a few beats under load (``jobs/protection.py``). Ten times
        ``agent_down_after_s``, at least two minutes."""
        return max(120.0, 10.0 * self.agent_down_after_s)
