"""An item this host protects, as the agent daemon holds it in memory.

Responsible for: the shape shared by the daemon, its command handlers (``protection.py``) and
its heartbeat (``heartbeat.py``). Not responsible for: building or persisting it (the daemon
opens it from ``items.json``, :mod:`drsite.agent.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

from drsite.agent.state import ItemEntry
from drsite.core.errors import DrsiteError
from drsite.replication.driver import ItemReplicator
from drsite.store.repository import Repository


@dataclass
class Item:
    """One protected item: its entry, its engine (None when it cannot be opened: then
    ``error`` says why) and the heartbeat's own view of its points."""

    entry: ItemEntry
    replicator: ItemReplicator | None
    catalog: Repository | None     # the heartbeat thread's own view of the item's points
    error: DrsiteError | None = None
