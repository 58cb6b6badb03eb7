"""What the agent's command handlers share of the agent daemon.

Each handler module declares the rest of what it needs as a Protocol extending
:class:`AgentHost` (:class:`drsite.agent.daemon.Agent` implements them all), so that no
handler imports the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from drsite.agent.registration import AgentIdentity
from drsite.agent.storeservice import StoreService
from drsite.hypervisors.contract import HypervisorDriver


class AgentHost(Protocol):
    """The agent's data directory, its hypervisor, its identity (certificate and key) and the
    recovery store it serves, if it is a store host."""

    data_dir: Path
    hypervisor: HypervisorDriver
    identity: AgentIdentity

    @property
    def store_service(self) -> StoreService | None: ...
