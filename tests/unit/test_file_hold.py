"""Group-barrier write holds of the file VM (in-process guest): writes wait without failing,
the hold ends at its bound whatever the caller does, and a seal under the hold is an instant
with no write after the hold in it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from drsite.core.errors import Conflict, InvalidInput
from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.contract import ScheduledCut, WriteHolder
from drsite.hypervisors.file import FileHypervisor

MiB = 1 << 20


@pytest.fixture()
def hv(tmp_path: Path) -> FileHypervisor:
    return FileHypervisor(tmp_path / "vms")


def running(hv: FileHypervisor) -> tuple[str, object]:
    vm_id = hv.create_blank(VmSpec("vm1", disks=(DiskSpec("d0", 4 * MiB),))).vm_id
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    c = hv.seal(vm_id)  # the epoch's full base
    hv.release(c)
    return vm_id, rt


def _writer(rt: object, n: int, out: list[tuple[int, float]]) -> threading.Thread:
    def run() -> None:
        for i in range(n):
            rt.vm.write("d0", i * 4096, i.to_bytes(8, "little") * 512, tag=i)  # type: ignore[attr-defined]
            out.append((i, time.monotonic()))
    return threading.Thread(target=run, daemon=True)


def test_driver_is_a_write_holder(hv: FileHypervisor) -> None:
    assert isinstance(hv, WriteHolder)


def test_writes_wait_during_the_hold_and_the_seal_holds_none_of_them(hv: FileHypervisor) -> None:
    vm_id, rt = running(hv)
    rt.vm.write("d0", 0, b"a" * 4096, tag=0)  # type: ignore[attr-defined]
    info = hv.hold(vm_id, "b1", timeout_s=5.0)
    assert info["barrier_id"] == "b1"
    done: list[tuple[int, float]] = []
    t = _writer(rt, 1, done)
    t.start()
    time.sleep(0.2)
    assert done == []  # held: waiting, not failed
    cycle, barrier = hv.seal_held(vm_id, "b1")
    assert barrier["held"] is True and 0.15 < float(barrier["paused_s"]) < 5.0  # type: ignore[arg-type]
    t.join(5)
    assert [i for i, _ in done] == [0]  # released by the seal
    # the held write is not in the frozen view, the one before the hold is
    r = hv.open_cycle_reader(cycle, "d0")
    buf = bytearray(8)
    r.readinto(0, memoryview(buf))
    r.close()
    assert bytes(buf) == b"a" * 8
    assert hv.cycle_record(cycle)["barrier"] == {"id": "b1", "held": True}
    hv.release(cycle)
    rt.stop()  # type: ignore[attr-defined]


def test_the_hold_ends_at_its_bound_and_a_late_seal_is_per_vm(hv: FileHypervisor) -> None:
    vm_id, rt = running(hv)
    hv.hold(vm_id, "b2", timeout_s=0.3)
    done: list[tuple[int, float]] = []
    t0 = time.monotonic()
    t = _writer(rt, 3, done)
    t.start()
    t.join(5)
    assert len(done) == 3
    waited = done[0][1] - t0
    assert 0.2 < waited < 1.5, waited  # bound 0.3 s (slack for a loaded machine)
    cycle, barrier = hv.seal_held(vm_id, "b2")
    assert barrier["held"] is False
    assert "per-VM point" in cycle.note
    hv.release(cycle)
    assert rt.vm.hold_pauses and rt.vm.hold_pauses[-1] < 1.5  # type: ignore[attr-defined]
    rt.stop()  # type: ignore[attr-defined]


def test_hold_is_idempotent_exclusive_and_bounded(hv: FileHypervisor) -> None:
    vm_id, rt = running(hv)
    a = hv.hold(vm_id, "b3", timeout_s=5.0)
    assert hv.hold(vm_id, "b3", timeout_s=5.0)["held_at"] == pytest.approx(a["held_at"], abs=0.01)
    with pytest.raises(Conflict):
        hv.hold(vm_id, "other", timeout_s=5.0)
    assert hv.unhold(vm_id, "b3") is True
    assert hv.unhold(vm_id, "b3") is False
    rt.vm.write("d0", 0, b"x", tag=1)  # type: ignore[attr-defined]  # not held any more
    with pytest.raises(InvalidInput):
        hv.hold(vm_id, "b4", timeout_s=0)
    with pytest.raises(InvalidInput):
        hv.hold(vm_id, "b4", timeout_s=61)
    rt.stop()  # type: ignore[attr-defined]


def test_hold_then_guest_stop_releases_nothing_blocked(hv: FileHypervisor) -> None:
    vm_id, rt = running(hv)
    hv.hold(vm_id, "b5", timeout_s=30.0)
    rt.stop()  # type: ignore[attr-defined]  # a clean stop with a hold does not hang
    assert rt.stopped.is_set()  # type: ignore[attr-defined]


def _hook(hv: FileHypervisor, vm_id: str, name: str, body: str) -> Path:
    d = hv.vm_dir(vm_id) / "hooks"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


def test_app_consistent_hold_runs_freeze_then_thaw(hv: FileHypervisor, tmp_path: Path) -> None:
    vm_id, rt = running(hv)
    marks = tmp_path / "marks"
    _hook(hv, vm_id, "freeze", f"echo freeze >> {marks}")
    _hook(hv, vm_id, "thaw", f"echo thaw >> {marks}")
    hv.hold(vm_id, "app1", timeout_s=5.0, app_consistent=True)
    assert marks.read_text().split() == ["freeze"]
    cycle, barrier = hv.seal_held(vm_id, "app1", app_consistent=True)
    assert barrier["held"] is True and cycle.consistency.value == "app"
    assert marks.read_text().split() == ["freeze", "thaw"]
    hv.release(cycle)
    rt.stop()  # type: ignore[attr-defined]


def test_a_failing_freeze_hook_gives_a_crash_consistent_member(hv: FileHypervisor) -> None:
    vm_id, rt = running(hv)
    _hook(hv, vm_id, "freeze", "echo no >&2; exit 3")
    hv.hold(vm_id, "app2", timeout_s=5.0, app_consistent=True)
    cycle, barrier = hv.seal_held(vm_id, "app2", app_consistent=True)
    assert barrier["held"] is True  # still a consistent cut, only not app-consistent
    assert cycle.consistency.value == "crash" and "freeze hook exited 3" in cycle.note
    hv.release(cycle)
    rt.stop()  # type: ignore[attr-defined]


def test_the_guest_times_a_cut_itself(hv: FileHypervisor) -> None:
    """``cut_seal`` (``contract.ScheduledCut``): the guest holds at ``hold_at`` and seals at
    ``seal_at`` on the caller's monotonic clock, so the pause is that window plus the seal's
    instant, not the caller's round trips; it reports when the hold was in place and when
    the seal began, which the caller proves its cut with."""
    vm_id, rt = running(hv)
    assert isinstance(hv, ScheduledCut)
    done: list[tuple[int, float]] = []
    t0 = time.monotonic()
    hold_at, seal_at = t0 + 0.2, t0 + 0.23
    w = threading.Thread(target=lambda: (time.sleep(0.21), _writer(rt, 1, done).run()),
                         daemon=True)
    w.start()
    cycle, b = hv.cut_seal(vm_id, "c1", hold_at=hold_at, hold_by=t0 + 0.215, seal_at=seal_at,
                           timeout_s=2.0)
    w.join(5)
    assert cycle is not None and b["held"] is True, b
    held, sealed = float(b["held_local"]), float(b["sealed_local"])  # type: ignore[arg-type]
    assert hold_at <= held <= t0 + 0.215 and seal_at <= sealed
    assert float(b["paused_s"]) < 0.2  # type: ignore[arg-type]
    assert done and done[0][1] >= sealed  # the write issued in the window waited for the seal
    assert hv.cycle_record(cycle)["barrier"] == {"id": "c1", "held": True}
    hv.release(cycle)
    # hold_by already past: nothing held, nothing sealed
    now = time.monotonic()
    cycle, b = hv.cut_seal(vm_id, "c2", hold_at=now - 0.1, hold_by=now - 0.05,
                           seal_at=now + 0.05, timeout_s=2.0)
    assert cycle is None and "not surely before the cut" in str(b["missed"])
    assert hv.pending_cycle(vm_id) is None and hv.guest_status(vm_id)["held_by"] is None  # type: ignore[index]
    # another clock (another host or time namespace) is refused
    with pytest.raises(InvalidInput):
        rt.vm.cut("c3", hold_at=now, hold_by=now + 0.1, seal_at=now + 0.2,  # type: ignore[attr-defined]
                  timeout_s=2.0, clock_id="clk-elsewhere")
    rt.stop()  # type: ignore[attr-defined]


def test_a_release_cleans_up_with_writes_flowing(hv: FileHypervisor,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A release holds the I/O lock only to stop copy-before-write and unlink ``cycle.json``;
    the directory's fsync and the files' removal follow with writes flowing (a slow fsync
    on a busy disk held every write behind it), while a seal waits for them."""
    import drsite.hypervisors.file.vm as vmmod

    vm_id, rt = running(hv)
    cycle = hv.seal(vm_id)
    syncing, go = threading.Event(), threading.Event()
    real = vmmod.fsync_dir

    def slow_fsync(path: Path) -> None:
        syncing.set()
        assert go.wait(5)
        real(path)

    monkeypatch.setattr(vmmod, "fsync_dir", slow_fsync)
    rel = threading.Thread(target=lambda: rt.vm.release(cycle.cycle_id), daemon=True)  # type: ignore[attr-defined]
    rel.start()
    assert syncing.wait(5)
    t0 = time.monotonic()
    rt.vm.write("d0", 0, b"r" * 4096, tag=1)  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 1.0     # not behind the release's fsync
    assert hv.pending_cycle(vm_id) is None  # cycle.json is gone already
    sealed: list[dict[str, object]] = []
    s = threading.Thread(target=lambda: sealed.append(rt.vm.seal()), daemon=True)  # type: ignore[attr-defined]
    s.start()
    time.sleep(0.2)
    assert sealed == []                    # a seal waits for the release's clean-up
    go.set()
    rel.join(5)
    s.join(5)
    assert len(sealed) == 1
    monkeypatch.setattr(vmmod, "fsync_dir", real)
    rt.vm.release(sealed[0]["cycle_id"])  # type: ignore[attr-defined]
    rt.stop()  # type: ignore[attr-defined]


def test_a_cut_holds_from_its_instant_even_when_its_thread_wakes_late(
        hv: FileHypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cut's hold is armed ahead: the first write at or after ``hold_at`` puts it in
    effect, so a guest thread that wakes 80 ms late (a busy host) neither misses the cut nor
    lets a write through; and no write completes between the hold's reported start and the
    seal (the property the claim rests on)."""
    import drsite.hypervisors.file.vm as vmmod

    vm_id, rt = running(hv)
    real = vmmod._sleep_until
    calls: list[float] = []

    def late_sleep(t: float) -> None:
        calls.append(t)
        real(t + (0.08 if len(calls) == 1 else 0.0))  # the hold's wake-up comes late

    monkeypatch.setattr(vmmod, "_sleep_until", late_sleep)
    ends: list[tuple[float, float]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            start = time.monotonic()
            rt.vm.write("d0", (i % 64) * 4096, b"w" * 4096, tag=i)  # type: ignore[attr-defined]
            ends.append((start, time.monotonic()))
            i += 1
            time.sleep(0.001)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    t0 = time.monotonic()
    hold_at = t0 + 0.1
    cycle, b = hv.cut_seal(vm_id, "c4", hold_at=hold_at, hold_by=hold_at + 0.02,
                           seal_at=hold_at + 0.15, timeout_s=2.0)
    time.sleep(0.05)
    stop.set()
    w.join(5)
    assert cycle is not None and b["held"] is True, b
    held, sealed = float(b["held_local"]), float(b["sealed_local"])  # type: ignore[arg-type]
    assert hold_at <= held < hold_at + 0.02   # in effect from its instant, not the wake-up
    # a write issued after the hold's start completes only after the seal's instant
    assert not [(a, e) for a, e in ends if a > held and e < sealed], "a write inside the hold"
    assert any(e < held for _, e in ends) and any(a > held for a, _ in ends)
    hv.release(cycle)
    rt.stop()  # type: ignore[attr-defined]
