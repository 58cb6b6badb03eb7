"""Wiring for a standalone replication of file VMs to a recovery store on this host.

Used by ``drsite replicate`` (and its crash tests) before a vault exists to drive agents: the
hypervisor root, the store directory, the replica directory and the engine's state directory
are all the facts a restarted process needs to resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from drsite.hypervisors.file.driver import FileHypervisor
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.target import LocalTarget
from drsite.store.local.backend import LocalObjectStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository


@dataclass(frozen=True)
class LocalPaths:
    vms: Path          # the file hypervisor's root on the protected host
    store: Path        # the recovery store
    replicas: Path | None  # where hydrated replicas live (None: store only)
    state: Path        # the engine's item records


def open_item(paths: LocalPaths, vm_name: str, settings: ReplicationSettings) -> ItemReplicator:
    hv = FileHypervisor(paths.vms)
    vm = hv.find_vm(vm_name)
    item_id = f"item-{vm.name}"
    repo = Repository(LocalObjectStore(paths.store), item_id)
    hydrator = ReplicaHydrator(repo, paths.replicas / item_id) if paths.replicas else None
    return ItemReplicator(item_id=item_id, vm_id=vm.vm_id, driver=hv,
                          target=LocalTarget(repo, hydrator), state_dir=paths.state,
                          settings=settings)
