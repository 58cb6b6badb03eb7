"""Break-glass failover on a store host, with a real local store (points with MACs) and the
file hypervisor: racing the vault's own failover of the same item (the vault came back while
``drsite agent failover`` ran) — both take the item's replica lock, and whichever gets it
second must see the other's failover and refuse: never a second promotion, never a second VM,
never a stuck break-glass record that blocks every later failover; and run by another user
than the agent's (root via sudo), whose files the agent could not read."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from drsite.agent import breakglass
from drsite.agent import failover as agent_failover
from drsite.agent.daemon import Agent
from drsite.agent.failover import FailoverCommands, FailoverHost
from drsite.agent.link import Command
from drsite.agent.recoverybook import BOOK_FILE, RecoveryBook
from drsite.core.errors import Conflict, DrsiteError, InvalidInput
from drsite.core.model import Consistency
from drsite.core.states import FailoverState
from drsite.failover import actions, records
from drsite.failover.wire import BOOK_FORMAT, vm_spec_from_dict
from drsite.hypervisors.file import FileHypervisor
from drsite.sitestore.acl import ACL_FILE, FORMAT, StoreAcl
from drsite.sitestore.server import replica_lock
from drsite.sitestore.syncoverlay import OverlayServer
from drsite.store.auth import PointAuth
from drsite.store.catalog import MapCache
from drsite.store.generation import GenerationStore
from drsite.store.local import LocalObjectStore
from drsite.store.repository import Repository

ITEM = "i-0123456789ab"
MiB = 1 << 20
SPEC = {"name": "web1", "vcpus": 1, "memory_mib": 256, "nics": [],
        "disks": [{"disk_id": "d0", "size": MiB}]}


_HYPERVISORS: list[FileHypervisor] = []


@pytest.fixture(autouse=True)
def _vms_off() -> Iterator[None]:
    """A recovery VM outlives the failover that started it (its guest is a process of its
    own): every VM a test started is stopped when the test ends."""
    yield
    while _HYPERVISORS:
        hv = _HYPERVISORS.pop()
        for vm in hv.list_vms():
            with contextlib.suppress(DrsiteError):
                hv.power_off(vm.vm_id, force=True, timeout=10.0)


def store_host(tmp: Path) -> tuple[Path, Path, FileHypervisor]:
    """A store host's data directory (identity, access list with the item's point key,
    recovery book) and store (two authentic points, generation 1 naming site prim)."""
    data, store = tmp / "agent", tmp / "store"
    data.mkdir()
    store.mkdir()
    (data / "agent.json").write_text(json.dumps(
        {"host_id": "h-sec", "site": "sec", "vault_url": "https://127.0.0.1:1", "host_name": "b"}))
    for f in ("agent.key", "agent.pem", "ca.pem"):
        (data / f).write_text("x")
    key = os.urandom(32)
    StoreAcl(data / ACL_FILE).update({
        "format": FORMAT, "store_host": "h-sec", "hosts": {}, "revoked": {},
        "items": {ITEM: {"writer": "h-prim", "readers": ["h-prim", "h-sec"],
                         "point_key": base64.b64encode(key).decode()}}})
    RecoveryBook(data / BOOK_FILE).update({
        "format": BOOK_FORMAT, "site": "sec", "plans": {},
        "items": {ITEM: {"vm_id": "vm-1", "vm_name": "web1", "vm_spec": SPEC,
                         "source_site": "prim", "recovery_site": "sec", "network_map": []}}})
    repo = Repository(LocalObjectStore(store), ITEM, auth=PointAuth(ITEM, key))
    base = None
    for n in (1, 2):
        w = repo.begin(f"c{n}", base=base, disk_sizes={"d0": MiB},
                       kind="initial" if base is None else "delta")
        w.write("d0", 0, bytes([n]) * 4096)
        base = w.commit(created_at=time.time(), consistency=Consistency.CRASH).point_id
    GenerationStore(repo.store, repo.auth).ensure(ITEM, "prim", now=time.time())
    repo.close()
    hv = FileHypervisor(tmp / "vms")
    _HYPERVISORS.append(hv)
    return data, store, hv


def vault_command(data: Path, store: Path, hv: FileHypervisor) -> FailoverCommands:
    """The agent daemon's failover commands on the same host (what runs a vault's command)."""
    acl = StoreAcl(data / ACL_FILE)
    svc = SimpleNamespace(local_store=LocalObjectStore(store), replicas_dir=data / "replicas",
                          acl=acl, sync=None,  # StoreService.sync: no sync-journal server
                          map_cache=MapCache(),
                          overlays=OverlayServer(data / "sync-overlays", data / "ca.pem",
                                                 data / "cert.pem", data / "key.pem"))
    return FailoverCommands(cast(FailoverHost, SimpleNamespace(
        data_dir=data, hypervisor=hv, store_service=svc,
        identity=SimpleNamespace(host_name="b"))))


def vault_failover(fid: str) -> Command:
    return Command("c-1", "failover", ITEM, {
        "kind": "unplanned", "failover_id": fid, "vm_id": "vm-1", "vm_spec": SPEC,
        "source_site": "prim", "recovery_site": "sec", "network_map": []})


def generation(store: Path, data: Path) -> int:
    auth = StoreAcl(data / ACL_FILE).point_auth(ITEM)
    return GenerationStore(LocalObjectStore(store), auth).current(ITEM)


def live(data: Path) -> list[str]:
    site = actions.Site("sec", None, data / "failover")
    return sorted(r.failover_id for r in records.live_failovers(site, ITEM))


def test_breakglass_waiting_for_the_lock_while_the_vault_fails_over(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vault's failover command gets the replica lock first (break-glass had checked for
    other failovers before it waited): break-glass must refuse, not promote a second time."""
    data, store, hv = store_host(tmp_path)
    cmds = vault_command(data, store, hv)
    real_lock = replica_lock

    @contextlib.contextmanager
    def vault_first(replica_dir: Path) -> Iterator[None]:
        monkeypatch.setattr(breakglass, "replica_lock", real_lock)
        cmds.handle(vault_failover("f-000000000001"))   # held the lock meanwhile
        with real_lock(replica_dir):
            yield

    monkeypatch.setattr(breakglass, "replica_lock", vault_first)
    bg = breakglass.BreakGlass(data, hv, store)
    with pytest.raises(Conflict, match="f-000000000001"):
        bg.failover(ITEM)
    assert generation(store, data) == 2          # one promotion
    assert [v.name for v in hv.list_vms()] == ["web1"]
    assert live(data) == ["f-000000000001"]
    assert breakglass.pending_reports(data) == []
    # nothing of break-glass holds the item: the vault's failover goes on (commit, cancel)
    assert breakglass.active_failover(data, ITEM) is None


def test_vault_command_waiting_for_the_lock_while_breakglass_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Break-glass had saved its record but not yet started its step record when the vault's
    command checked; break-glass then held the lock and finished: the command must refuse."""
    data, store, hv = store_host(tmp_path)
    cmds = vault_command(data, store, hv)
    real_lock = replica_lock
    out: dict[str, Any] = {}

    @contextlib.contextmanager
    def breakglass_first(replica_dir: Path) -> Iterator[None]:
        monkeypatch.setattr(agent_failover, "replica_lock", real_lock)
        out["bg"] = breakglass.BreakGlass(data, hv, store).failover(ITEM)
        with real_lock(replica_dir):
            yield

    monkeypatch.setattr(agent_failover, "replica_lock", breakglass_first)
    with pytest.raises(Conflict, match="break-glass"):
        cmds.handle(vault_failover("f-000000000002"))
    rec = out["bg"]
    assert rec.state is FailoverState.PENDING_COMMIT and rec.generation == 2
    assert generation(store, data) == 2
    assert [v.name for v in hv.list_vms()] == ["web1"]
    assert live(data) == [rec.failover_id]
    assert [r["failover_id"] for r in breakglass.pending_reports(data)] == [rec.failover_id]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_refused_when_run_as_another_user_than_the_agents(tmp_path: Path) -> None:
    """``sudo drsite agent failover`` for an agent that runs as its own user: the break-glass
    record, the failover's step record and the replica's marker would be root's, 0600 — the
    agent could not read them, so it would never report the failover to the vault (which would
    then schedule the item as if nothing happened) and could not hydrate the replica again."""
    data, store, hv = store_host(tmp_path)
    for root, dirs, files in os.walk(tmp_path):
        for name in [*dirs, *files]:
            os.chown(Path(root) / name, 65534, 65534)
    os.chown(tmp_path, 65534, 65534)
    bg = breakglass.BreakGlass(data, hv, store)
    assert bg.items()[0]["points"] == 2          # listing writes nothing: allowed
    with pytest.raises(InvalidInput, match="user"):
        bg.failover(ITEM)
    assert not (data / "breakglass").exists() and not (data / "failover").exists()


def test_the_recovery_vm_stays_out_of_the_inventory_until_the_run_saved_its_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon heartbeat while ``drsite agent failover`` runs (the vault answers: --force, or
    it came back) must not show the vault the recovery VM before the failover's report: the
    vault would see a new VM of its site (a group there may auto-protect it, and the item's
    re-protect then finds the VM taken). While the run holds its lock the VM is left out of
    the daemon's inventory; once the record is saved, the VM and the report go together."""
    data, store, hv = store_host(tmp_path)
    daemon = SimpleNamespace(hypervisor=hv, data_dir=data, _book=RecoveryBook(data / BOOK_FILE))

    def inventory() -> list[str]:
        return [v["name"] for v in Agent._inventory(cast(Agent, daemon))]

    seen: dict[str, Any] = {}
    real_start = actions._start_vm

    def start_and_look(*args: Any, **kw: Any) -> None:
        real_start(*args, **kw)
        seen["on the hypervisor"] = [v.name for v in hv.list_vms()]
        seen["inventory"] = inventory()
        seen["reports"] = breakglass.pending_reports(data)

    monkeypatch.setattr(actions, "_start_vm", start_and_look)
    rec = breakglass.BreakGlass(data, hv, store).failover(ITEM)
    assert seen == {"on the hypervisor": ["web1"], "inventory": [], "reports": []}
    assert inventory() == ["web1"]
    assert [r["failover_id"] for r in breakglass.pending_reports(data)] == [rec.failover_id]


def test_a_vm_in_the_way_is_refused_before_the_promotion(tmp_path: Path) -> None:
    """A VM of the item's name already on the recovery host (one left by an earlier failback,
    or someone's): break-glass refuses (it would not start that VM's disks) — and must do so
    before it promotes: a promotion fences the old primary's engine (replication stops while
    its VM runs on, unknown to the vault) for a failover that starts no VM, and its step record
    would hold the item against every later failover."""
    data, store, hv = store_host(tmp_path)
    img = tmp_path / "stale-d0.img"
    img.write_bytes(b"\0" * 4096)
    stale = hv.create_vm(vm_spec_from_dict(SPEC), {"d0": str(img)})
    with pytest.raises(Conflict, match="already exists"):
        breakglass.BreakGlass(data, hv, store).failover(ITEM)
    assert generation(store, data) == 1
    assert live(data) == []
    assert breakglass.active_failover(data, ITEM) is None
    hv.delete_vm(stale.vm_id)             # cleared away: break-glass goes through
    rec = breakglass.BreakGlass(data, hv, store).failover(ITEM)
    assert rec.state is FailoverState.PENDING_COMMIT and generation(store, data) == 2
