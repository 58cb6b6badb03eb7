"""The QEMU HypervisorDriver against real QEMU processes (skips without QEMU unless
DRSITE_TEST_QEMU=1): guest writes through the VM's block layer become exactly the dirty
extents, one transaction seals every disk, replication with the real engine gives replicas
equal to the source at each point, an unclean QEMU stop is detected and repaired by resync,
guest-agent freeze and its crash-consistent fallback, copy-on-write VMs."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from drsite.core.errors import TrackingLost
from drsite.core.extents import ExtentList
from drsite.core.model import (
    Consistency,
    DiskSpec,
    PowerState,
    SealedCycle,
    TrackingState,
    VmSpec,
)
from drsite.fsutil import write_record
from drsite.hypervisors.qemu import runner as runner_mod
from drsite.hypervisors.qemu.driver import QemuHypervisor
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.hypervisors.qemu.tools import missing_tools
from drsite.hypervisors.qemu.tracking import GRANULARITY
from drsite.replication.driver import ItemReplicator, ReplicationSettings
from drsite.replication.planner import ALWAYS
from drsite.replication.target import LocalTarget
from drsite.store.digest import image_digest
from drsite.store.format import PointInfo
from drsite.store.local.backend import LocalObjectStore
from drsite.store.repository import Repository
from tests import dying

MiB = 1 << 20
KiB = 1 << 10


def require_qemu() -> None:
    missing = missing_tools(("qemu-img", "qemu-storage-daemon", "qemu-system-x86_64"))
    if not missing:
        return
    msg = (f"QEMU tools missing: {', '.join(missing)} (apt-get install qemu-utils "
           "qemu-system-common qemu-system-x86)")
    if os.environ.get("DRSITE_TEST_QEMU") == "1":
        pytest.fail("DRSITE_TEST_QEMU=1 but " + msg)
    pytest.skip(msg)


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[QemuHypervisor]:
    require_qemu()
    d = QemuHypervisor(tmp_path / "vms", agent_timeout=0.5)
    try:
        yield d
    finally:
        for vm in d.list_vms():
            d.delete_vm(vm.vm_id)
        d.close()


def make_vm(hv: QemuHypervisor, name: str, sizes: list[int], **kw: bool) -> str:
    spec = VmSpec(name, memory_mib=64,
                  disks=tuple(DiskSpec(f"d{i}", s) for i, s in enumerate(sizes)))
    return hv.create_blank(spec, **kw).vm_id


def hmp_write(hv: QemuHypervisor, vm_id: str, dev: int, off: int, n: int, pattern: int) -> None:
    """A write by the guest's virtio-blk device (HMP qemu-io on the device's BlockBackend;
    qemu-io reports to QEMU's stdout, the monitor answers nothing on success)."""
    with QmpClient.connect(str(VmDir(hv.vm_dir(vm_id)).qmp_socket)) as q:
        out = q.execute("human-monitor-command", {
            "command-line": f'qemu-io -d vd{dev}/virtio-backend "write -P {pattern} {off} {n}"'})
    assert "error" not in out.lower() and "failed" not in out.lower(), out


def aligned(pairs: list[tuple[int, int]], size: int) -> ExtentList:
    return ExtentList.of(pairs).align(GRANULARITY, size)


def read_all(hv: QemuHypervisor, cycle: SealedCycle, disk: str) -> bytes:
    r = hv.open_cycle_reader(cycle, disk)
    try:
        buf = bytearray(r.size)
        r.readinto(0, memoryview(buf))
        return bytes(buf)
    finally:
        r.close()


def test_guest_writes_are_exactly_the_dirty_extents(hv: QemuHypervisor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    size = 16 * MiB
    vm = make_vm(hv, "exact", [size, size])
    hv.start_tracking(vm)
    hv.power_on(vm)
    calls: list[tuple[str, object]] = []
    real_execute = QmpClient.execute

    def spy(self: QmpClient, command: str, arguments: dict[str, object] | None = None,
            **kw: float) -> object:
        calls.append((command, arguments))
        return real_execute(self, command, arguments, **kw)

    monkeypatch.setattr(QmpClient, "execute", spy)
    hv.release(hv.seal(vm))  # the epoch's base (whole disks)
    monkeypatch.undo()
    tx = [a for c, a in calls if c == "transaction"]
    assert len(tx) == 1, "every disk of the VM is sealed in one transaction"
    acts = tx[0]["actions"]  # type: ignore[index]
    assert sorted(x["data"]["device"] for x in acts if x["type"] == "blockdev-backup") \
        == ["drv0", "drv1"]
    w0 = [(0, 4096), (5 * MiB + 512, 200 * KiB), (15 * MiB, 64 * KiB)]
    w1 = [(3 * MiB + 1024, 1024)]
    for off, n in w0:
        hmp_write(hv, vm, 0, off, n, 0x5A)
    for off, n in w1:
        hmp_write(hv, vm, 1, off, n, 0x6B)
    c1 = hv.seal(vm)
    assert c1.trusted and c1.consistency is Consistency.CRASH
    assert c1.changed["d0"] == aligned(w0, size)
    assert c1.changed["d1"] == aligned(w1, size)
    # writes after the seal, on both disks, reach neither view (one instant for all disks)
    hmp_write(hv, vm, 0, 0, 4096, 0x01)
    hmp_write(hv, vm, 1, 3 * MiB, 8192, 0x02)
    v0, v1 = read_all(hv, c1, "d0"), read_all(hv, c1, "d1")
    assert v0[:4096] == b"\x5a" * 4096 and v0[5 * MiB:5 * MiB + 512] == bytes(512)
    assert v1[3 * MiB:3 * MiB + 1024] == bytes(1024)
    assert v1[3 * MiB + 1024:3 * MiB + 2048] == b"\x6b" * 1024
    hv.release(c1)
    c2 = hv.seal(vm)  # the second cycle sees only its own writes
    assert c2.changed["d0"] == aligned([(0, 4096)], size)
    assert c2.changed["d1"] == aligned([(3 * MiB, 8192)], size)
    hv.release(c2)
    assert hv.tracking_status(vm).pending_bytes == {"d0": 0, "d1": 0}
    hv.power_off(vm)


def test_clean_stop_with_pending_cycle_carries_its_changes(hv: QemuHypervisor) -> None:
    size = 8 * MiB
    vm = make_vm(hv, "carry", [size])
    hv.start_tracking(vm)
    hv.power_on(vm)
    hv.release(hv.seal(vm))
    hv.write(vm, "d0", MiB, b"a" * 100)
    c = hv.seal(vm)
    hv.write(vm, "d0", 4 * MiB, b"b" * 100)
    hv.power_off(vm)  # QEMU quits cleanly: the frozen view is gone, the bitmaps are stored
    assert hv.pending_cycle(vm) is None
    hv.power_on(vm)
    st = hv.tracking_status(vm)
    assert st.state is TrackingState.ACTIVE, st.reason
    c2 = hv.seal(vm)
    assert c2.cycle_id != c.cycle_id and c2.trusted
    assert c2.changed["d0"] == aligned([(MiB, 100), (4 * MiB, 100)], size)
    hv.release(c2)
    hv.power_off(vm)


def test_seal_of_stopped_vm_uses_storage_daemon(hv: QemuHypervisor) -> None:
    vm = make_vm(hv, "offline", [4 * MiB])
    hv.start_tracking(vm)
    hv.write(vm, "d0", 0, b"x" * 10)  # stopped: through the storage daemon's block layer
    c = hv.seal(vm, app_consistent=True)
    runner = hv.runner(vm)
    assert runner is not None and runner.kind == "daemon"
    assert c.consistency is Consistency.CRASH and "not shut down cleanly" in c.note
    assert read_all(hv, c, "d0")[:10] == b"x" * 10
    hv.release(c)
    hv.power_on(vm)  # the daemon gives the disks back to the VM
    runner = hv.runner(vm)
    assert runner is not None and runner.kind == "vm"
    hv.power_off(vm)  # prelaunch: nothing to shut down, a clean stop
    c2 = hv.seal(vm, app_consistent=True)
    assert c2.consistency is Consistency.APP, c2.note
    hv.release(c2)


class _Killed(BaseException):
    """Stands in for the agent dying (not an Exception: nothing may catch it)."""


def test_a_runner_started_by_an_agent_killed_before_qemu_answered_is_found_again(
        hv: QemuHypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent is killed while it waits for a new storage daemon's QMP socket: the daemon
    (detached) lives on. The restarted agent must find it from runner.json and use it — a
    second daemon on the same disks fails on the image locks, and the first one leaked for ever
    (a CI run left one behind)."""

    vm = make_vm(hv, "killed-start", [4 * MiB])

    def killed(*a: object, **k: object) -> None:
        raise _Killed()

    monkeypatch.setattr(runner_mod, "wait_for_monitor", killed)
    with pytest.raises(_Killed):
        hv.write(vm, "d0", 0, b"y" * 10)   # stopped: starts a storage daemon
    monkeypatch.undo()
    r = hv.runner(vm)
    assert r is not None and r.kind == "daemon", "the started daemon is not recorded"
    assert runner_mod.process_token(r.pid) == r.token
    sock = hv._locate(vm)[0].qmp_socket   # the agent restarts later: QEMU is up by then
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, "the daemon never opened its QMP socket"
        time.sleep(0.02)
    restarted = QemuHypervisor(hv.root, agent_timeout=0.5)   # the agent after its restart
    try:
        restarted.write(vm, "d0", 0, b"z" * 10)   # through the same daemon
        assert restarted.runner(vm) == r
        restarted.delete_vm(vm)
    finally:
        restarted.close()
    assert runner_mod.process_token(r.pid) is None, "the daemon outlived its VM"


def _processes_naming(path: Path) -> list[str]:
    """Command lines of the live processes that name ``path`` (a QEMU process holding a disk,
    or a runner's start gate), zombies left out."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if str(path) in cmd and stat[stat.rfind(")") + 2:][:1] not in ("Z", "X"):
            out.append(f"{d.name}: {cmd[:160]}")
    return out


def _none_naming(path: Path, timeout: float = 5.0) -> list[str]:
    """``_processes_naming(path)`` once it is empty, or what is left after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (left := _processes_naming(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


_WRITE_ONCE = """
import sys
from pathlib import Path
from drsite.hypervisors.qemu.driver import QemuHypervisor
QemuHypervisor(Path(sys.argv[1]), agent_timeout=0.5).write(sys.argv[2], "d0", 0, b"x" * 10)
"""


@pytest.mark.parametrize("failpoint", ["qemu.runner-spawned", "qemu.runner-recorded"])
def test_a_driver_killed_while_it_starts_a_runner_leaves_no_unrecorded_qemu(
        hv: QemuHypervisor, failpoint: str) -> None:
    """A driver process is SIGKILLed right after it started a storage daemon, before
    (``runner-spawned``) or just after (``runner-recorded``) runner.json names it: the
    sync-rotation campaign's test killed the primary's agent just as it started one, and the
    daemon ran on unrecorded, holding the disks (the restarted agent's daemon was refused by
    the image locks, delete_vm stopped nothing). No QEMU process may hold the disks unless
    recorded: here none is left, a restarted driver starts its own, delete_vm leaves nothing."""
    import subprocess
    import sys

    vm = make_vm(hv, "killed-spawn", [4 * MiB])
    disk = VmDir(hv.vm_dir(vm)).qcow2("d0")
    env = {**os.environ, "DRSITE_FAILPOINTS": f"{failpoint}=kill"}
    p = subprocess.run([sys.executable, "-c", _WRITE_ONCE, str(hv.root), vm], env=env,
                       capture_output=True, timeout=120)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    assert _none_naming(disk) == [], "QEMU runs though its driver died before letting it"
    restarted = QemuHypervisor(hv.root, agent_timeout=0.5)   # the agent after its restart
    try:
        restarted.write(vm, "d0", 0, b"z" * 10)
        r = restarted.runner(vm)
        assert r is not None and r.kind == "daemon"
        restarted.delete_vm(vm)
    finally:
        restarted.close()
    assert _none_naming(disk) == [], "a QEMU process outlived its VM"


def test_a_runner_whose_record_cannot_be_written_does_not_run(
        hv: QemuHypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing runner.json fails after the storage daemon was started (the VM directory was
    deleted meanwhile, the disk is full): the daemon must not run on — nothing would ever
    know of it and it would hold the disks for ever."""
    from drsite.core.errors import NotFound

    vm = make_vm(hv, "unrecorded", [4 * MiB])
    paths = VmDir(hv.vm_dir(vm))

    def gone(path: Path, data: dict[str, object]) -> None:
        raise NotFound(f"writing {path}: the VM directory is gone")

    monkeypatch.setattr(runner_mod, "write_record", gone)
    with pytest.raises(NotFound):
        hv.write(vm, "d0", 0, b"y" * 10)
    monkeypatch.undo()
    assert _none_naming(paths.qcow2("d0")) == [], "an unrecorded QEMU process holds the disk"
    assert hv.runner(vm) is None
    hv.write(vm, "d0", 0, b"y" * 10)   # the disks are free: the next daemon starts


@pytest.mark.slow
def test_unclean_qemu_stop_is_tracking_lost_then_new_epoch(hv: QemuHypervisor) -> None:
    size = 8 * MiB
    vm = make_vm(hv, "killed", [size, size])
    hv.start_tracking(vm)
    hv.power_on(vm)
    hv.release(hv.seal(vm))
    hv.write(vm, "d0", 0, b"1" * 5000)
    pending = hv.seal(vm)
    hv.write(vm, "d1", MiB, b"2" * 5000)
    hv.kill(vm)  # SIGKILL mid-cycle: the view is gone; the bitmap made at the seal never
    assert hv.pending_cycle(vm) is None  # reached the qcow2
    hv.power_on(vm)
    st = hv.tracking_status(vm)
    assert st.state is TrackingState.UNTRUSTED and "missing" in st.reason, st
    with pytest.raises(TrackingLost):
        hv.seal(vm)
    # the engine's remedy: a new epoch, whose first seal covers whole disks
    epoch = hv.start_tracking(vm)
    assert epoch != pending.epoch
    base = hv.seal(vm)
    assert base.changed["d0"].to_pairs() == [(0, size)]
    hv.release(base)
    hv.power_off(vm)  # clean: the recording bitmap is stored in the qcow2 ...
    hv.power_on(vm)
    assert hv.tracking_status(vm).state is TrackingState.ACTIVE
    hv.write(vm, "d0", 2 * MiB, b"3" * 100)
    hv.kill(vm)  # ... and comes back in-use ("inconsistent") after an unclean stop
    st = hv.tracking_status(vm)
    assert st.state is TrackingState.UNTRUSTED and "inconsistent" in st.reason, st
    hv.start_tracking(vm)
    assert hv.tracking_status(vm).state is TrackingState.ACTIVE


class FakeGuestAgent:
    """A qemu-guest-agent stand-in on the VM's agent socket, recording the commands."""

    def __init__(self, path: Path, *, fail_freeze: bool = False) -> None:
        self.commands: list[str] = []
        self.fail_freeze = fail_freeze
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rb")
                for line in f:
                    msg = json.loads(line)
                    cmd = msg["execute"]
                    self.commands.append(cmd)
                    if cmd == "guest-shutdown":
                        continue  # the real agent does not answer this one either
                    if cmd == "guest-sync-delimited":
                        reply = b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode()
                    elif cmd == "guest-fsfreeze-freeze" and self.fail_freeze:
                        reply = json.dumps({"error": {"class": "GenericError",
                                                      "desc": "fsfreeze busy"}}).encode()
                    else:
                        reply = json.dumps({"return": 2}).encode()
                    conn.sendall(reply + b"\n")

    def close(self) -> None:
        self.srv.close()


def test_app_consistent_with_guest_agent_and_fallback(hv: QemuHypervisor) -> None:
    vm = make_vm(hv, "appc", [4 * MiB], guest_agent=False)
    hv.start_tracking(vm)
    hv.power_on(vm)
    c = hv.seal(vm, app_consistent=True)  # no agent at all
    assert c.consistency is Consistency.CRASH and "no guest agent" in c.note
    hv.release(c)
    agent = FakeGuestAgent(VmDir(hv.vm_dir(vm)).qga_socket)
    try:
        c = hv.seal(vm, app_consistent=True)
        assert c.consistency is Consistency.APP, c.note
        assert "froze 2" in c.note
        freeze = agent.commands.index("guest-fsfreeze-freeze")
        assert agent.commands[freeze + 1:] == ["guest-fsfreeze-thaw"]
        hv.release(c)
        agent.fail_freeze = True
        c = hv.seal(vm, app_consistent=True)
        assert c.consistency is Consistency.CRASH and "fsfreeze failed" in c.note
        hv.release(c)
    finally:
        agent.close()
    hv.power_off(vm)


def test_agent_socket_without_agent_falls_back(hv: QemuHypervisor) -> None:
    vm = make_vm(hv, "silent", [4 * MiB])  # QEMU listens on the port; nobody answers inside
    hv.start_tracking(vm)
    hv.power_on(vm)
    c = hv.seal(vm, app_consistent=True)
    assert c.consistency is Consistency.CRASH and "did not answer" in c.note
    hv.release(c)
    hv.power_off(vm)


def test_agent_kind_and_failover_protocol(tmp_path: Path) -> None:
    require_qemu()
    from drsite.agent.process import HYPERVISOR_KINDS, make_hypervisor
    from drsite.hypervisors.contract import HypervisorDriver

    assert "qemu" in HYPERVISOR_KINDS
    made = make_hypervisor("qemu", tmp_path / "vms")
    assert isinstance(made, QemuHypervisor)
    fh: HypervisorDriver = made  # mypy: find_vm and create_vm_cow are in the contract
    vm = made.create_blank(VmSpec("byname", memory_mib=64, disks=(DiskSpec("d0", MiB),)))
    assert fh.find_vm("byname").vm_id == vm.vm_id
    made.delete_vm(vm.vm_id)


def test_create_vm_from_raw_and_cow(hv: QemuHypervisor, tmp_path: Path) -> None:
    size = 8 * MiB
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    base = tmp_path / "base.raw"
    base.write_bytes(data)
    before = image_digest(base)
    cow = hv.create_vm_cow(VmSpec("cow", memory_mib=64), {"d0": base})
    assert cow.disks[0].size == size
    hv.start_tracking(cow.vm_id)
    hv.power_on(cow.vm_id)
    hv.write(cow.vm_id, "d0", 4096, b"z" * 4096)
    r = hv.open_live_reader(cow.vm_id, "d0")
    buf = bytearray(3 * 4096)
    r.readinto(0, memoryview(buf))
    assert bytes(buf) == data[:4096] + b"z" * 4096 + data[8192:12288]
    r.close()
    hv.delete_vm(cow.vm_id)
    assert image_digest(base) == before and base.exists()

    img = tmp_path / "move.raw"
    img.write_bytes(data[:size // 2])  # smaller than the disk: zero-extended
    made = hv.create_vm(VmSpec("moved", memory_mib=64, disks=(DiskSpec("d0", size),)),
                        {"d0": str(img)})
    assert not img.exists()  # moved, not copied
    r = hv.open_live_reader(made.vm_id, "d0")
    assert image_digest(r) == image_digest_bytes(data[:size // 2] + bytes(size // 2))
    r.close()


def image_digest_bytes(b: bytes) -> str:
    class R:
        size = len(b)

        def readinto(self, off: int, buf: memoryview) -> None:
            buf[:] = b[off:off + len(buf)]

    return image_digest(R())


@pytest.mark.slow
def test_engine_replica_equals_source_at_each_point(hv: QemuHypervisor, tmp_path: Path) -> None:
    size = 16 * MiB
    vm = make_vm(hv, "repl", [size, size])
    hv.power_on(vm)
    rng = np.random.default_rng(7)
    for d in ("d0", "d1"):
        for i in range(0, size, 2 * MiB):
            hv.write(vm, d, i, rng.integers(0, 256, 256 * KiB, dtype=np.uint8).tobytes())
    repo = Repository(LocalObjectStore(tmp_path / "store"), "item-repl")
    settings = ReplicationSettings(frequency_s=5, app_consistent_every_s=None,
                                   resync_window=ALWAYS, io_size=256 * KiB,
                                   save_every_bytes=1 * MiB)
    item = ItemReplicator(item_id="item-repl", vm_id=vm, driver=hv, target=LocalTarget(repo),
                          state_dir=tmp_path / "state", settings=settings)
    checked: list[str] = []

    def compare(cycle: SealedCycle, point: PointInfo) -> None:
        for d in ("d0", "d1"):
            r = hv.open_cycle_reader(cycle, d)
            try:
                assert image_digest(repo.reader(point.point_id, d)) == image_digest(r), d
            finally:
                r.close()
        checked.append(point.point_id)

    item.before_release = compare
    stop = threading.Event()

    def guest() -> None:  # the guest writes on while cycles are sealed and shipped
        g = np.random.default_rng(8)
        while not stop.is_set():
            off = int(g.integers(0, size // 4096 - 16)) * 4096
            hv.write(vm, "d0" if g.integers(2) else "d1", off,
                     g.integers(0, 256, 16 * KiB, dtype=np.uint8).tobytes())

    t = threading.Thread(target=guest)
    t.start()
    try:
        item.run_initial()
        for _ in range(2):
            item.run_cycle()
    finally:
        stop.set()
        t.join()
    # unclean stop of QEMU with a sealed cycle, then the engine repairs by checksums
    hv.write(vm, "d1", 3 * MiB, b"k" * 70_000)
    hv.seal(vm)
    hv.kill(vm)
    hv.power_on(vm)
    hv.write(vm, "d0", 9 * MiB, b"after" * 1000)
    assert hv.tracking_status(vm).state is TrackingState.UNTRUSTED
    item.step()  # sees untrusted tracking: marks the item for resync
    assert item.report.state.value == "resync_required", item.report
    sent_before = item.report.bytes_sent
    point = item.run_resync()
    assert item.report.bytes_sent - sent_before < size // 2  # only differences travel
    for d in ("d0", "d1"):
        r = hv.open_live_reader(vm, d)  # nobody writes now: live == the resync's instant
        try:
            assert image_digest(repo.reader(point.point_id, d)) == image_digest(r), d
        finally:
            r.close()
    assert len(checked) == 4  # initial, two deltas, the resync
    item.run_cycle()
    assert len(checked) == 5
    hv.power_off(vm)


def test_kill_then_power_on_waits_for_every_thread_of_the_killed_qemu(
        hv: QemuHypervisor) -> None:
    """The flake of the test above: ``seal; kill; power_on`` failed with QEMU's ``Failed to get
    "write" lock``. A SIGKILLed QEMU's main thread is a zombie at once, while its last thread
    still tears the KVM VM down (RCU grace periods) with the disks open, tens of milliseconds;
    kill() took the zombie for gone whenever that outlasted wait_gone's 50 ms reaping slice.
    Here the killed runner is a process stopped in that state (``tests/dying.py``): recorded
    in runner.json, our child as power_on's runner is, main thread exited, d0's lock held."""
    vm = make_vm(hv, "dying", [4 * MiB])
    paths = VmDir(hv.vm_dir(vm))
    proc, tok = dying.start(paths.qcow2("d0"))
    runner_mod._children[proc.pid] = proc
    try:
        write_record(paths.runner, {"kind": "vm", "pid": proc.pid, "token": tok})
        hv.kill(vm)
        assert not dying.locked(paths.qcow2("d0")), "kill() returned while the old QEMU held d0"
        hv.power_on(vm)
        assert hv.get_vm(vm).power is PowerState.RUNNING
    finally:
        runner_mod._children.pop(proc.pid, None)
        dying.finish(proc)


def test_power_on_waits_for_an_exiting_runner_that_still_holds_the_disks(
        hv: QemuHypervisor) -> None:
    """A runner on its way out (a storage daemon told to quit, a killed QEMU) whose last
    thread still has the disks open when power_on comes: power_on waits until it is gone
    (quit_runner: its monitor no longer answers, so wait, SIGKILL after 10 s), then starts the
    VM; before, it started QEMU at once, which failed on the image lock."""
    vm = make_vm(hv, "exiting", [4 * MiB])
    paths = VmDir(hv.vm_dir(vm))
    proc, tok = dying.start(paths.qcow2("d0"))
    runner_mod._children[proc.pid] = proc
    ends = threading.Timer(1.0, dying.release, (proc,))  # its last thread exits after 1 s
    try:
        write_record(paths.runner, {"kind": "daemon", "pid": proc.pid, "token": tok})
        ends.start()
        hv.power_on(vm)
        assert proc.poll() is not None, "power_on started QEMU before the old runner was gone"
        assert hv.get_vm(vm).power is PowerState.RUNNING
    finally:
        ends.cancel()
        ends.join()
        runner_mod._children.pop(proc.pid, None)
        dying.finish(proc)


def test_seal_interrupted_before_its_record_is_undone(hv: QemuHypervisor,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver that dies between the QMP transaction and writing cycle.json: the next driver
    folds the half-made rotation back, so the next cycle still has every write."""
    import drsite.hypervisors.qemu.driver as drv
    from drsite.hypervisors.qemu.tracking import BitmapCycle

    size = 4 * MiB
    vm = make_vm(hv, "halfseal", [size, size])
    hv.start_tracking(vm)
    hv.power_on(vm)
    hv.release(hv.seal(vm))
    hv.write(vm, "d0", 70_000, b"w" * 10)
    real_write = drv.write_record  # type: ignore[attr-defined]

    class Crash(BaseException):
        pass

    crashed: list[bool] = []

    def crashing_write(path: Path, data: dict[str, object]) -> None:
        if path.name == "cycle.json" or crashed:  # the process is gone: nothing more lands
            crashed.append(True)
            raise Crash()
        real_write(path, data)

    monkeypatch.setattr(drv, "write_record", crashing_write)
    monkeypatch.setattr(BitmapCycle, "undo_seal", lambda self, view: None)  # died: no undo
    with pytest.raises(Crash):
        hv.seal(vm)
    monkeypatch.undo()
    hmp_write(hv, vm, 1, 0, 10, 0x76)  # the guest writes on (through the fleece filter)
    fresh = QemuHypervisor(hv.root)
    assert fresh.pending_cycle(vm) is None
    c = fresh.seal(vm)
    assert c.changed["d0"] == aligned([(70_000, 10)], size)
    assert c.changed["d1"] == aligned([(0, 10)], size)
    fresh.release(c)
    assert not list((hv.vm_dir(vm) / "fleece").glob("*"))
    hv.power_off(vm)


@pytest.mark.slow
def test_graceful_power_off_falls_back_to_quit(tmp_path: Path) -> None:
    """CPUs running but no OS to honour ACPI: after the timeout the stop is forced (QMP quit,
    so the bitmaps are stored) and recorded as not clean."""
    require_qemu()
    hv = QemuHypervisor(tmp_path / "vms", start_cpus=True, agent_timeout=0.3)
    vm = make_vm(hv, "noos", [MiB])
    try:
        hv.start_tracking(vm)
        hv.power_on(vm)
        hv.power_off(vm, timeout=0.5)
        assert hv.get_vm(vm).power.value == "stopped"
        stop = json.loads((hv.vm_dir(vm) / "stop.json").read_text())
        assert stop["clean"] is False
        assert hv.tracking_status(vm).state is TrackingState.ACTIVE  # quit stored the bitmap
        vm2 = make_vm(hv, "withagent", [MiB], guest_agent=False)
        hv.power_on(vm2)
        agent = FakeGuestAgent(VmDir(hv.vm_dir(vm2)).qga_socket)
        try:
            hv.power_off(vm2, timeout=0.3)  # asked through the agent first
        finally:
            agent.close()
        assert "guest-shutdown" in agent.commands
    finally:
        for v in hv.list_vms():
            hv.delete_vm(v.vm_id)


@pytest.mark.slow
def test_engine_survives_sigkill_of_qemu_while_shipping(hv: QemuHypervisor,
                                                         tmp_path: Path) -> None:
    """QEMU dies while the engine reads a delta cycle's frozen view: the reads fail
    (transient), the view and the bitmaps are gone, so the engine's next try finds tracking
    lost and resyncs by checksums; the point equals the disks, and cycles go on."""
    from drsite.core.clock import FakeClock
    from drsite.replication.report import ItemReport

    size = 8 * MiB
    vm = make_vm(hv, "midship", [size, size])
    hv.power_on(vm)
    repo = Repository(LocalObjectStore(tmp_path / "store"), "item-k")
    settings = ReplicationSettings(frequency_s=5, app_consistent_every_s=None,
                                   resync_window=ALWAYS, io_size=64 * KiB,
                                   save_every_bytes=256 * KiB)
    killed: list[bool] = []

    def progress(rep: ItemReport) -> None:
        if rep.step == "delta cycle" and rep.bytes_done > 0 and not killed:
            killed.append(True)
            hv.kill(vm)

    item = ItemReplicator(item_id="item-k", vm_id=vm, driver=hv, target=LocalTarget(repo),
                          state_dir=tmp_path / "state", settings=settings, clock=FakeClock(),
                          on_progress=progress)
    item.run_initial()
    rng = np.random.default_rng(3)
    for i in range(32):
        hv.write(vm, f"d{i % 2}", i * 200 * KiB, rng.bytes(20 * KiB))
    point = item.run_cycle()
    assert killed and point.kind == "resync", point
    assert item.report.resyncs == 1
    for d in ("d0", "d1"):
        r = hv.open_live_reader(vm, d)
        try:
            assert image_digest(repo.reader(point.point_id, d)) == image_digest(r), d
        finally:
            r.close()
    hv.power_on(vm)
    hv.write(vm, "d1", 5 * MiB, b"later" * 100)
    p2 = item.run_cycle()
    assert p2.kind == "delta"
    r = hv.open_live_reader(vm, "d1")
    try:
        assert image_digest(repo.reader(p2.point_id, "d1")) == image_digest(r)
    finally:
        r.close()
    hv.power_off(vm)
