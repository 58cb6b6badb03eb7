"""Synchronous mode of a file VM against a real sync-journal server over mTLS (in-process
guest): every acknowledged write is in the journal, a point + the journal after its seal is
the live disk, a black-holed or dead recovery agent never blocks a write longer than the
budget, and the next seal brings the mirror back."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import Forbidden, InvalidInput, NetworkError
from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.contract import SyncMirrorHost
from drsite.hypervisors.file import FileHypervisor
from drsite.hypervisors.file.syncmirror import ACK_SPIN_MAX_S
from drsite.pki import CertIdentity
from drsite.sitestore import syncserver
from drsite.sitestore.acl import Op
from drsite.sitestore.server import held_marker
from drsite.sitestore.syncserver import NEXT_SPIN_S, SyncServer
from drsite.sitestore.testing import OpenAcl, TestCerts, make_test_certs
from drsite.store.auth import PointAuth
from drsite.tlsutil import client_context, server_context
from drsite.tracking import syncwire as W
from drsite.tracking.syncjournal import encode_writes, replay
from tests.blackhole import Proxy

MiB = 1 << 20
ITEM = "item-sync-1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_test_certs(tmp_path_factory.mktemp("pki"))


def _server(tmp: Path, certs: TestCerts, acl: Any = None) -> SyncServer:
    ctx = server_context(certs.server_cert, certs.server_key, certs.ca_file,
                         client_cert="required")
    s = SyncServer(tmp / "journals", tmp / "replicas", ctx, acl or OpenAcl())
    s.start()
    return s


def _config(certs: TestCerts, port: int, budget_ms: int = 200) -> dict[str, Any]:
    return {"item_id": ITEM, "host": "127.0.0.1", "port": port, "budget_ms": budget_ms,
            "ca_file": str(certs.ca_file), "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key)}


def _running(hv: FileHypervisor) -> tuple[str, Any]:
    vm_id = hv.create_blank(VmSpec("vm1", disks=(DiskSpec("d0", 4 * MiB),
                                                 DiskSpec("d1", 4 * MiB)))).vm_id
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    c = hv.seal(vm_id)
    hv.release(c)
    return vm_id, rt


def _wait_state(hv: FileHypervisor, vm_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        st = hv.sync_status(vm_id)
        if st is not None and st["state"] == state:
            return st
        time.sleep(0.02)
    raise AssertionError(f"mirror never reached {state}: {st}")


def _start_sync(hv: FileHypervisor, vm_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """Put the running VM in synchronous mode and seal (a run begins at a seal); its mirror's
    status once in sync."""
    hv.set_sync(vm_id, config)
    hv.release(hv.seal(vm_id))
    return _wait_state(hv, vm_id, "in_sync")


def _sealed_in_sync(hv: FileHypervisor, vm_id: str, config: dict[str, Any]) -> Any:
    """Put the running VM in synchronous mode and seal; the cycle (not released: its point is
    what the journal's writes replay onto), once the mirror is in sync."""
    hv.set_sync(vm_id, config)
    cycle = hv.seal(vm_id)
    _wait_state(hv, vm_id, "in_sync")
    return cycle


def _block(seq: int) -> bytes:
    return seq.to_bytes(8, "little") * 512


def _snapshot(hv: FileHypervisor, cycle: Any, out: Path) -> dict[str, Path]:
    """The point of ``cycle`` as raw images (what the recovery site's replica holds)."""
    images = {}
    out.mkdir(parents=True, exist_ok=True)
    for d, size in cycle.disk_sizes.items():
        r = hv.open_cycle_reader(cycle, d)
        try:
            buf = bytearray(size)
            r.readinto(0, memoryview(buf))
        finally:
            r.close()
        (out / f"{d}.img").write_bytes(bytes(buf))
        images[d] = out / f"{d}.img"
    return images


def test_point_plus_journal_is_every_acknowledged_write(tmp_path: Path, certs: TestCerts) -> None:
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    assert isinstance(hv, SyncMirrorHost)
    vm_id, rt = _running(hv)
    try:
        hv.set_sync(vm_id, _config(certs, srv.port))
        assert (os.stat(hv.vm_dir(vm_id) / "sync.json").st_mode & 0o777) == 0o600
        assert hv.sync_status(vm_id)["state"] == "starting"  # type: ignore[index]
        rt.vm.write("d0", 0, _block(1), tag=1)  # before any seal: asynchronous
        cycle = hv.seal(vm_id)
        assert cycle.sync_mark is not None and cycle.sync_mark["seq"] == 1
        _wait_state(hv, vm_id, "in_sync")
        for i in range(2, 200):
            rt.vm.write_many([("d0", (i % 900) * 4096, _block(i)),
                              ("d1", (i % 700) * 4096, _block(i + 10_000))], tag=i)
        # acknowledged = in the journal, durable: no wait needed
        j = srv.journal(ITEM)
        assert j.last == cycle.sync_mark["seq"] + 198
        assert j.coverage(cycle.sync_mark["stream"], cycle.sync_mark["seq"]).ok
        images = _snapshot(hv, cycle, tmp_path / "point")
        n, nbytes = replay(j, int(cycle.sync_mark["seq"]), images)
        assert n == 198 and nbytes == 198 * 2 * 4096
        for d in ("d0", "d1"):
            live = rt.vm.read(d, 0, 4 * MiB)
            assert images[d].read_bytes() == live, d
        hv.release(cycle)
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "in_sync" and st["acked"] == st["seq"]
    finally:
        rt.stop()
        srv.stop()


def test_black_holed_recovery_agent_costs_at_most_the_budget(tmp_path: Path,
                                                             certs: TestCerts) -> None:
    srv = _server(tmp_path, certs)
    proxy = Proxy(srv.port)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    budget_ms = 150
    try:
        hv.set_sync(vm_id, _config(certs, proxy.port, budget_ms))
        c1 = hv.seal(vm_id)
        hv.release(c1)
        _wait_state(hv, vm_id, "in_sync")
        rt.vm.write("d0", 0, _block(1), tag=1)
        proxy.hold()  # a partition: no RST, no FIN
        t0 = time.monotonic()
        rt.vm.write("d0", 4096, _block(2), tag=2)
        first = time.monotonic() - t0
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "suspended"
        assert "latency budget of 150 ms" in st["reason"]
        assert budget_ms / 1000 * 0.9 <= first < budget_ms / 1000 + 0.5
        t0 = time.monotonic()
        for i in range(3, 103):  # suspended: asynchronous, no waiting at all
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        assert time.monotonic() - t0 < 1.0
        # the gap is in the change log as always (the next cycle ships it)
        proxy.release()
        c2 = hv.seal(vm_id)
        assert c2.changed["d0"].total >= 101 * 4096
        st = _wait_state(hv, vm_id, "in_sync")
        assert st["base"] == c2.sync_mark["seq"]  # type: ignore[index]
        rt.vm.write("d0", 0, _block(500), tag=500)
        j = srv.journal(ITEM)
        assert j.coverage(c2.sync_mark["stream"], c2.sync_mark["seq"]).ok  # type: ignore[index]
        assert not j.coverage(c1.sync_mark["stream"], c1.sync_mark["seq"]).ok  # type: ignore[index]
        hv.release(c2)
    finally:
        rt.stop()
        proxy.close()
        srv.stop()


def test_dead_recovery_agent_suspends_at_once_and_a_seal_retries(tmp_path: Path,
                                                                certs: TestCerts) -> None:
    srv = _server(tmp_path, certs)
    port = srv.port
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        _start_sync(hv, vm_id, _config(certs, port, 1000))
        srv.stop()  # the connection is closed: the mirror learns at once
        t0 = time.monotonic()
        for i in range(20):
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        assert time.monotonic() - t0 < 1.5
        st = _wait_state(hv, vm_id, "suspended")
        assert st["fallbacks"] == 1
        hv.release(hv.seal(vm_id))  # nobody listens: the new run fails, writes don't wait
        t0 = time.monotonic()
        rt.vm.write("d0", 0, _block(99), tag=99)
        assert time.monotonic() - t0 < 1.5
        _wait_state(hv, vm_id, "suspended")
    finally:
        rt.stop()


def test_no_write_is_acknowledged_once_a_failover_holds_the_item(tmp_path: Path,
                                                                  certs: TestCerts) -> None:
    """Break-glass runs in another process: it cannot close the server's connection, only
    write the held marker and then read the journal. Every write acknowledged after the marker
    would be missing from what it read, so none is: the mirror suspends, and everything
    acknowledged before the marker is in the journal."""
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        _start_sync(hv, vm_id, _config(certs, srv.port, 1000))
        for i in range(1, 30):
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        acked = hv.sync_status(vm_id)["acked"]  # type: ignore[index]
        (tmp_path / "replicas").mkdir(exist_ok=True)
        held_marker(tmp_path / "replicas", ITEM).write_text("{}")
        rt.vm.write("d0", 0, _block(99), tag=99)   # not acknowledged by the journal
        st = _wait_state(hv, vm_id, "suspended")
        assert st["acked"] == acked, st
        assert srv.journal(ITEM).last is not None and srv.journal(ITEM).last >= acked
    finally:
        rt.stop()
        srv.stop()


def test_drop_removes_a_journal_in_use_crash_safely_and_a_new_run_starts_afresh(
        tmp_path: Path, certs: TestCerts) -> None:
    """Deleting a journal (unprotect, commit, asynchronous mode) closes its connection, the
    mirror suspends and its next seal begins a new journal; a removal a crash interrupted
    (renamed aside, not yet removed) is finished by the next sweep."""
    ctx = server_context(certs.server_cert, certs.server_key, certs.ca_file,
                         client_cert="required")
    srv = SyncServer(tmp_path / "journals", tmp_path / "replicas", ctx, OpenAcl(),
                     latest_point=lambda item: "p000000000005")
    srv.start()
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        _start_sync(hv, vm_id, _config(certs, srv.port, 1000))
        rt.vm.write("d0", 0, _block(1), tag=1)
        state = (tmp_path / "journals" / ITEM / "journal.json").read_text()
        assert '"after_point":"p000000000005"' in state.replace(" ", "")
        assert srv.journal_items() == [ITEM]
        assert srv.drop(ITEM) and not srv.drop(ITEM)
        assert srv.journal_items() == [] and not (tmp_path / "journals" / ITEM).exists()
        assert [p.name for p in (tmp_path / "journals").iterdir()] == []
        rt.vm.write("d0", 0, _block(2), tag=2)  # the connection is gone: no ack, suspended
        _wait_state(hv, vm_id, "suspended")
        hv.release(hv.seal(vm_id))               # a new run, in a new journal
        _wait_state(hv, vm_id, "in_sync")
        rt.vm.write("d0", 4096, _block(3), tag=3)
        assert srv.journal(ITEM).last == hv.sync_status(vm_id)["acked"]  # type: ignore[index]
        # a crash after the rename: the sweep (at start and every pass) removes it
        aside = tmp_path / "journals" / ".dropped-item-x-0000"
        (aside / "sub").mkdir(parents=True)
        (aside / "seg-0000000000000000.j").write_bytes(b"x" * 100)
        assert srv.sweep() == 1 and not aside.exists()
        assert srv.journal_items() == [ITEM]
    finally:
        rt.stop()
        srv.stop()


def _count_sends(mirror: Any) -> list[int]:
    """Record the thread of every send on the mirror's connection (a list of thread ids)."""
    sock = mirror._sock
    assert sock is not None
    threads: list[int] = []
    send = sock.sendall

    def sendall(data: bytes) -> None:
        threads.append(threading.get_ident())
        send(data)

    sock.sendall = sendall
    return threads


def test_writers_send_their_own_batches_and_no_acknowledged_write_is_lost(
        tmp_path: Path, certs: TestCerts) -> None:
    """The write path has no I/O thread: at queue depth 1 the writer's own thread sends its
    batch and reads its ack; at depth 16 the writers that queued while a batch was on the
    wire go together in the next one (fewer sends than batches). Across QD1 → QD16 → QD1
    every acknowledged batch is in the journal: the point + the journal is the live disk."""
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        cycle = _sealed_in_sync(hv, vm_id, _config(certs, srv.port, 5000))
        mirror = rt.vm.mirror
        sends = _count_sends(mirror)
        for i in range(1, 51):
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        assert sends == [threading.get_ident()] * 50   # one send per write, on the writer
        assert mirror.acked == mirror.seq

        def writer(k: int) -> None:
            for i in range(40):
                rt.vm.write("d1", ((k * 40 + i) % 1000) * 4096, _block(k * 1000 + i))

        del sends[:]
        early = mirror.early_sends
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(sends) < 16 * 40, "no batch was shared at queue depth 16"
        # a writer sends from submit (under the I/O lock) only when alone in the write path:
        # at depth 16 that is the ramp up and down, not the steady state
        assert mirror.early_sends - early < 16 * 40 // 4, mirror.early_sends - early
        assert len(set(sends)) > 1                    # leaders are the writers themselves
        for i in range(51, 71):
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "in_sync" and st["acked"] == st["seq"]
        j = srv.journal(ITEM)
        assert j.last == st["acked"]
        images = _snapshot(hv, cycle, tmp_path / "point")
        n, _ = replay(j, int(cycle.sync_mark["seq"]), images)  # type: ignore[index]
        assert n == 50 + 16 * 40 + 20
        for d in ("d0", "d1"):
            assert images[d].read_bytes() == rt.vm.read(d, 0, 4 * MiB), d
        hv.release(cycle)
    finally:
        rt.stop()
        srv.stop()


def test_a_hung_peer_bounds_every_concurrent_writer_by_the_budget(tmp_path: Path,
                                                                 certs: TestCerts) -> None:
    """Queue depth 8 against a black hole: the leader (blocked reading its ack) and the
    writers waiting behind it all return within the budget; the mirror suspends once, and the
    next seal brings it back."""
    srv = _server(tmp_path, certs)
    proxy = Proxy(srv.port)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    budget_ms = 200
    try:
        _start_sync(hv, vm_id, _config(certs, proxy.port, budget_ms))
        rt.vm.write("d0", 0, _block(1), tag=1)
        proxy.hold()
        took: list[float] = []

        def writer(k: int) -> None:
            t0 = time.monotonic()
            rt.vm.write("d0", (k + 1) * 4096, _block(k))
            took.append(time.monotonic() - t0)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(took) == 8 and max(took) < budget_ms / 1000 + 0.5, took
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "suspended" and st["fallbacks"] == 1, st
        assert "latency budget of 200 ms" in st["reason"]
        proxy.release()
        hv.release(hv.seal(vm_id))
        _wait_state(hv, vm_id, "in_sync")
        rt.vm.write("d0", 0, _block(2), tag=2)
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "in_sync" and st["acked"] == st["seq"]
    finally:
        rt.stop()
        proxy.close()
        srv.stop()


def test_an_idle_connection_the_recovery_agent_closes_suspends_without_a_write(
        tmp_path: Path, certs: TestCerts) -> None:
    """Nobody writes, so nobody reads the connection: the run's watcher sees the hang-up and
    the mirror suspends at once (the report and the alert do not wait for the next write)."""
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        _start_sync(hv, vm_id, _config(certs, srv.port, 1000))
        srv.disconnect(ITEM)
        st = _wait_state(hv, vm_id, "suspended", timeout=5)
        assert "closed the connection" in st["reason"] and st["fallbacks"] == 1
        t0 = time.monotonic()
        rt.vm.write("d0", 0, _block(1), tag=1)   # asynchronous: no wait
        assert time.monotonic() - t0 < 0.5
    finally:
        rt.stop()
        srv.stop()


class _DenyAcl(OpenAcl):
    def authorize(self, ident: CertIdentity, op: Op, item_id: str | None, what: str) -> None:
        raise Forbidden(f"{ident.common_name} may not {op} {what}")

    def point_auth(self, item_id: str) -> PointAuth | None:
        return None


def test_a_caller_the_access_list_refuses_gets_no_journal(tmp_path: Path,
                                                         certs: TestCerts) -> None:
    srv = _server(tmp_path, certs, _DenyAcl())
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        hv.set_sync(vm_id, _config(certs, srv.port))
        hv.release(hv.seal(vm_id))
        st = _wait_state(hv, vm_id, "suspended")
        assert "refused" in st["reason"] and "may not put" in st["reason"]
        assert not (tmp_path / "journals" / ITEM / "journal.json").exists()
    finally:
        rt.stop()
        srv.stop()


def test_sync_config_survives_a_guest_restart_and_is_removed(tmp_path: Path,
                                                             certs: TestCerts) -> None:
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        before = _start_sync(hv, vm_id, _config(certs, srv.port))
        rt.stop()
        rt = hv.guest(vm_id)  # a new guest reads sync.json: a new stream, from its next seal
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "starting" and st["stream"] != before["stream"]
        hv.release(hv.seal(vm_id))
        _wait_state(hv, vm_id, "in_sync")
        hv.set_sync(vm_id, None)
        assert hv.sync_status(vm_id) is None
        assert not (hv.vm_dir(vm_id) / "sync.json").exists()
        with pytest.raises(InvalidInput):
            hv.set_sync(vm_id, {**_config(certs, srv.port), "budget_ms": 0})
    finally:
        rt.stop()
        srv.stop()


def _raw_client(certs: TestCerts, port: int) -> Any:
    ctx = client_context(certs.ca_file, certs.client_cert, certs.client_key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_server_refuses_bad_hellos_and_frames_and_keeps_the_journal(tmp_path: Path,
                                                                   certs: TestCerts) -> None:
    srv = _server(tmp_path, certs)
    try:
        # a hello without its fields: refused with a drsite error, nothing begun
        s = _raw_client(certs, srv.port)
        s.sendall(W.json_frame({"item_id": ITEM}))
        reply = W.read_json(W.FrameReader(s))
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_input"
        s.close()
        assert not (tmp_path / "journals" / ITEM / "journal.json").exists()
        # a good run, then an entry that does not follow: the connection ends, the journal
        # keeps what was acknowledged
        stream = "0" * 31 + "1"
        s = _raw_client(certs, srv.port)
        s.sendall(W.json_frame({"item_id": ITEM, "stream": stream, "base": 10}))
        r = W.FrameReader(s)
        assert W.read_json(r)["ok"] is True
        s.sendall(W.entry_frame(11, encode_writes([("d0", 0, b"a" * 4096)])))
        kind, body = r.read()
        assert kind == W.T_ACK and W.seq_of(body) == 11
        s.sendall(W.entry_frame(13, encode_writes([("d0", 0, b"b" * 4096)])))
        with pytest.raises((NetworkError, OSError)):
            r.read()
        s.close()
        j = srv.journal(ITEM)
        assert j.last == 11 and j.coverage(stream, 10).ok
        # not TLS at all: the handshake fails, the server goes on
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        raw.settimeout(5)
        with pytest.raises(OSError):  # closed by the server (or reset): no answer
            if raw.recv(100) == b"":
                raise ConnectionResetError("closed")
        raw.close()
        s = _raw_client(certs, srv.port)
        s.sendall(W.json_frame({"item_id": "../x", "stream": stream, "base": 0}))
        assert W.read_json(W.FrameReader(s))["ok"] is False
        s.close()
    finally:
        srv.stop()


def test_a_batch_goes_before_its_local_writes_and_a_crash_between_loses_no_acknowledged_write(
        tmp_path: Path, certs: TestCerts, monkeypatch: pytest.MonkeyPatch) -> None:
    """At queue depth 1 the writer sends its batch before the batch's local writes (the
    recovery site's flush overlaps them) and returns once both are done. A crash between the
    two — the journal holds the batch, the disk does not — loses no acknowledged write: the
    point + the journal (a failover to latest) has every one, and the unacknowledged batch
    too, which a guest may see either way. A local write that fails after its batch was sent
    ends the run (the journal may hold what the disk does not); the next seal begins anew."""
    from drsite.hypervisors.file import vm as vm_module

    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        cycle = _sealed_in_sync(hv, vm_id, _config(certs, srv.port, 5000))
        mirror = rt.vm.mirror
        sock = mirror._sock
        on_disk_at_send: list[bool] = []
        send = sock.sendall

        def sendall(data: bytes) -> None:   # under the I/O lock, before the local writes
            seq = W.seq_of(memoryview(data)[5:])
            on_disk_at_send.append(rt.vm.read("d0", seq * 4096, 4096) == _block(seq))
            send(data)

        sock.sendall = sendall
        base = mirror.seq
        for i in range(base + 1, base + 31):
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
            assert rt.vm.read("d0", i * 4096, 4096) == _block(i)   # both done on return
        assert on_disk_at_send == [False] * 30 and mirror.early_sends == 30
        acked = mirror.acked
        assert acked == base + 30 and srv.journal(ITEM).last == acked

        # the crash window: the batch is in the journal, its local write has not happened
        entered, go = threading.Event(), threading.Event()
        real = vm_module.pwrite_all

        def stalled(fd: int, data: Any, offset: int) -> None:
            if offset == 900 * 4096:
                entered.set()
                go.wait(30)
                raise OSError(5, "Input/output error (the guest dies here)")
            real(fd, data, offset)

        monkeypatch.setattr(vm_module, "pwrite_all", stalled)
        failed: list[BaseException] = []

        def doomed() -> None:
            try:
                rt.vm.write("d0", 900 * 4096, _block(900), tag=900)
            except Exception as e:   # the write's error, checked below
                failed.append(e)

        t = threading.Thread(target=doomed)
        t.start()
        assert entered.wait(10)
        j = srv.journal(ITEM)
        deadline = time.monotonic() + 10
        while j.last != acked + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert j.last == acked + 1                        # durable there, not yet here
        assert rt.vm.read("d0", 900 * 4096, 4096) != _block(900)
        assert mirror.acked == acked or mirror.acked == acked + 1
        go.set()
        t.join(10)
        assert len(failed) == 1 and "Input/output error" in str(failed[0])
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "suspended", st
        assert f"local write of batch {acked + 1} failed" in st["reason"]

        # failover to latest from the journal as the crash left it: every acknowledged write
        images = _snapshot(hv, cycle, tmp_path / "point")
        n, _ = replay(j, int(cycle.sync_mark["seq"]), images)  # type: ignore[index]
        assert n == 31
        img = images["d0"].read_bytes()
        for i in range(base + 1, base + 31):
            assert img[i * 4096:(i + 1) * 4096] == _block(i), i
        assert img[900 * 4096:901 * 4096] == _block(900)   # unacknowledged: allowed

        monkeypatch.setattr(vm_module, "pwrite_all", real)
        hv.release(cycle)
        c2 = hv.seal(vm_id)                                 # a new run from here
        _wait_state(hv, vm_id, "in_sync")
        for i in range(1, 11):
            rt.vm.write("d1", i * 4096, _block(i + 2000), tag=i)
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "in_sync" and st["acked"] == st["seq"]
        images = _snapshot(hv, c2, tmp_path / "point2")
        replay(j, int(c2.sync_mark["seq"]), images)  # type: ignore[index]
        for d in ("d0", "d1"):
            assert images[d].read_bytes() == rt.vm.read(d, 0, 4 * MiB), d
        hv.release(c2)
    finally:
        rt.stop()
        srv.stop()


def test_spinning_only_while_the_answer_is_due_within_microseconds(
        tmp_path: Path, certs: TestCerts, monkeypatch: pytest.MonkeyPatch) -> None:
    """At queue depth 1 the writer busy-waits for its ack and the recovery side's connection
    for the writer's next entry (a wake-up from an idle CPU costs as much as the wait). Each
    stops on its own when its answer is slow: writes 30 ms apart cost the recovery side no
    spinning, and a recovery side 3 ms slow costs the writer none after a few writes. Every
    write is still acknowledged."""
    spins: dict[str, int] = {"writer": 0, "server": 0}
    spin = W.FrameReader.spin

    def counting(self: W.FrameReader, until: float, stop: Any = None) -> bool:
        who = "server" if threading.current_thread().name == "sync-conn" else "writer"
        spins[who] += 1
        return spin(self, until, stop)

    monkeypatch.setattr(W.FrameReader, "spin", counting)
    # no rest after missed spins: on a loaded box two gaps in a row can pass any window
    monkeypatch.setattr(syncserver, "SPIN_REST", 0)
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        _start_sync(hv, vm_id, _config(certs, srv.port, 5000))
        mirror = rt.vm.mirror
        # bounds far above this box's round trips, loaded or not: every answer is "due soon"
        mirror.ack_spin_max_s, srv.next_spin_s = 0.5, 0.2
        for i in range(1, 41):   # back to back
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        # every write; the server after every ack (the first entry follows the hello; the
        # spin after the 40th ack may have begun)
        assert spins["writer"] == 40 and spins["server"] in (39, 40), spins
        assert 0 < mirror.ack_rtt_s <= mirror.ack_spin_max_s
        mirror.ack_spin_max_s, srv.next_spin_s = ACK_SPIN_MAX_S, NEXT_SPIN_S

        spins.update(writer=0, server=0)
        for i in range(41, 51):  # a writer with pauses: the server stops spinning at once
            time.sleep(0.03)
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        assert spins["server"] <= 1, spins

        spins.update(writer=0, server=0)
        append = srv.journal(ITEM).append

        def slow_append(seq: int, payload: Any, **kw: Any) -> None:
            time.sleep(0.003)
            append(seq, payload, **kw)

        monkeypatch.setattr(srv.journal(ITEM), "append", slow_append)
        for i in range(51, 81):  # a slow recovery side: the writer stops spinning
            rt.vm.write("d0", i * 4096, _block(i), tag=i)
        assert spins["writer"] <= 8, spins
        assert mirror.ack_rtt_s > mirror.ack_spin_max_s
        st = hv.sync_status(vm_id)
        assert st is not None and st["state"] == "in_sync" and st["acked"] == st["seq"]
        assert srv.journal(ITEM).last == st["acked"]
    finally:
        rt.stop()
        srv.stop()


def test_a_spinning_writer_keeps_the_budget(tmp_path: Path, certs: TestCerts,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A recovery side that stops answering while the writer spins for its ack: the spin ends
    at the write's deadline (the budget), not at the spin's own bound, and the mirror
    suspends."""
    srv = _server(tmp_path, certs)
    hv = FileHypervisor(tmp_path / "vms")
    vm_id, rt = _running(hv)
    try:
        _start_sync(hv, vm_id, _config(certs, srv.port, 5))
        mirror = rt.vm.mirror
        rt.vm.write("d0", 0, _block(1), tag=1)
        mirror.ack_spin_max_s = 1.0   # a spin bound far past the 5 ms budget
        append = srv.journal(ITEM).append

        def stalled(seq: int, payload: Any, **kw: Any) -> None:
            time.sleep(0.3)
            append(seq, payload, **kw)

        monkeypatch.setattr(srv.journal(ITEM), "append", stalled)
        t0 = time.monotonic()
        rt.vm.write("d0", 4096, _block(2), tag=2)
        took = time.monotonic() - t0
        # the budget (5 ms) and a loaded box's slack; without the cap: the stall (0.3 s)
        assert took < 0.25, took
        st = _wait_state(hv, vm_id, "suspended")
        assert "latency budget" in st["reason"]
    finally:
        rt.stop()
        srv.stop()

