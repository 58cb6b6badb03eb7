"""Synchronous mode of QEMU VMs against real QEMU (skips without QEMU unless
DRSITE_TEST_QEMU=1): the primary's active mirror (``hypervisors/qemu/syncmirror.py``) into the
recovery site's overlay export (``sitestore/syncoverlay.py``, NBD over TLS with the vault's
CA, only the writer's certificate authorized), the overlay applied over a point's image
(``failover/synctail.py``), the fallback when the recovery site stops answering
(``syncwatch``), and a certificate the overlay's access list does not name."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import Forbidden, InvalidInput
from drsite.core.model import DiskSpec, VmSpec
from drsite.failover.synctail import OverlayTail
from drsite.hypervisors.contract import SyncMirrorHost
from drsite.hypervisors.qemu import syncwatch
from drsite.hypervisors.qemu.driver import QemuHypervisor, _vm_lock
from drsite.hypervisors.qemu.layout import VmDir
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.sitestore.acl import StoreAcl
from drsite.sitestore.server import held_marker
from drsite.sitestore.syncoverlay import OverlayServer, writer_dn
from drsite.sitestore.testing import (
    RunningSiteStore,
    TestCerts,
    issue_agent_cert,
    make_test_certs,
)
from tests.blackhole import Proxy
from tests.integration.test_qemu_driver import require_qemu
from tests.integration.test_store_authz import acl_doc

MiB = 1 << 20
ITEM = "item-sync-q"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    require_qemu()
    return make_test_certs(tmp_path_factory.mktemp("pki"))


def dn(cert: Path) -> str:
    return writer_dn(__import__("ssl").PEM_cert_to_DER_cert(cert.read_text()))


def guest_write(hv: QemuHypervisor, vm_id: str, off: int, n: int, pattern: int) -> float:
    """A write by the guest's virtio-blk device (HMP qemu-io on its BlockBackend); returns
    when the guest sees it complete, with the seconds it took."""
    paths = VmDir(hv.vm_dir(vm_id))
    with _vm_lock(paths), QmpClient.connect(str(paths.qmp_socket), timeout=60) as q:
        t0 = time.monotonic()
        out = q.execute("human-monitor-command", {
            "command-line": f'qemu-io -d vd0/virtio-backend "write -P {pattern} {off} {n}"'},
            timeout=60)
        took = time.monotonic() - t0
    assert "error" not in str(out).lower() and "failed" not in str(out).lower(), out
    return took


def sync_vm(tmp: Path, certs: TestCerts, *, budget_ms: int = 400, size: int = 8 * MiB,
            cert: Path | None = None, key: Path | None = None
            ) -> tuple[QemuHypervisor, str, OverlayServer, dict[str, Any]]:
    hv = QemuHypervisor(tmp / "vms")
    vm_id = hv.create_blank(VmSpec("sq", disks=(DiskSpec("d0", size),)), guest_agent=False).vm_id
    hv.start_tracking(vm_id)
    hv.power_on(vm_id)
    ov = OverlayServer(tmp / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
    prov = ov.provision(ITEM, hv.sync_disks(vm_id), dn(certs.client_cert))
    conf = {"item_id": ITEM, "host": "127.0.0.1", "port": prov["port"], "budget_ms": budget_ms,
            "ca_file": str(certs.ca_file), "cert_file": str(cert or certs.client_cert),
            "key_file": str(key or certs.client_key), "stream": prov["stream"],
            "exports": prov["exports"]}
    hv.set_sync(vm_id, conf)
    return hv, vm_id, ov, conf


def point_image(hv: QemuHypervisor, cycle: Any, out: Path) -> Path:
    r = hv.open_cycle_reader(cycle, "d0")
    try:
        buf = bytearray(r.size)
        r.readinto(0, memoryview(buf))
    finally:
        r.close()
    out.write_bytes(buf)
    return out


def test_overlay_plus_point_holds_every_acknowledged_write(tmp_path: Path,
                                                           certs: TestCerts) -> None:
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs)
    try:
        assert isinstance(hv, SyncMirrorHost)
        assert (hv.sync_status(vm_id) or {})["state"] == "starting"
        guest_write(hv, vm_id, 0, 64 * 1024, 1)          # before the seal: in the point
        c1 = hv.seal(vm_id)
        assert c1.sync_mark == {"stream": conf["stream"], "seq": 0}
        st = hv.sync_status(vm_id) or {}
        assert st["state"] == "in_sync" and st["stream"] == conf["stream"], st
        img = point_image(hv, c1, tmp_path / "point.img")
        want = bytearray(img.read_bytes())
        hv.release(c1)

        def write(off: int, n: int, pattern: int) -> None:
            guest_write(hv, vm_id, off, n, pattern)
            want[off:off + n] = bytes([pattern]) * n

        # after the seal: only the overlay has them (sector-sized, overlapping, a rewrite)
        write(4096, 4096, 2)
        write(1 * MiB + 512, 512, 3)
        write(3 * MiB, 128 * 1024, 4)
        write(3 * MiB + 8192, 4096, 5)
        c2 = hv.seal(vm_id)                               # a later seal of the same run
        assert c2.sync_mark == {"stream": conf["stream"], "seq": 1}
        hv.release(c2)
        write(7 * MiB, 4096, 6)
        hv.kill(vm_id)                                    # the primary dies (SIGKILL)
        ov.stop_item(ITEM)
        tail = OverlayTail(ov.item_dir(ITEM))
        cov = tail.coverage(conf["stream"], 0)
        assert cov.ok, cov
        assert img.read_bytes() != want                    # the point alone misses them
        n, nbytes = tail.apply(conf["stream"], 0, {"d0": img})
        assert n == 1 and 4096 + 512 + 128 * 1024 + 4096 <= nbytes <= 256 * 1024
        assert img.read_bytes() == want
        tail.apply(conf["stream"], 0, {"d0": img})        # idempotent
        assert img.read_bytes() == want
        assert not tail.coverage("0" * 32, 0).ok
        assert not tail.coverage(None, None).ok
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def test_silent_recovery_site_falls_back_within_the_budget(tmp_path: Path,
                                                           certs: TestCerts) -> None:
    budget_ms = 300
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs, budget_ms=budget_ms)
    try:
        hv.release(hv.seal(vm_id))
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        quick = guest_write(hv, vm_id, 0, 4096, 1)
        daemon = json.loads((ov.item_dir(ITEM) / "daemon.json").read_text())
        os.kill(int(daemon["pid"]), signal.SIGSTOP)       # the recovery site hangs
        try:
            took = guest_write(hv, vm_id, 8192, 4096, 2)
            # the watchdog probes every budget/4 and yanks after a budget without an answer
            assert took < budget_ms / 1000 * 1.25 + 1.0, (took, quick)
            st = hv.sync_status(vm_id) or {}
            assert st["state"] == "suspended", st
            assert "latency budget" in st["reason"], st
            assert guest_write(hv, vm_id, 16384, 4096, 3) < 1.0   # asynchronous from here
            assert hv.seal(vm_id).sync_mark is None           # no run: an async point
        finally:
            os.kill(int(daemon["pid"]), signal.SIGCONT)
        hv.release(hv.pending_cycle(vm_id))  # type: ignore[arg-type]
        # back in sync: a new overlay, begun at the next seal
        prov = ov.provision(ITEM, hv.sync_disks(vm_id), dn(certs.client_cert))
        hv.set_sync(vm_id, {**conf, "port": prov["port"], "stream": prov["stream"],
                            "exports": prov["exports"]})
        c = hv.seal(vm_id)
        assert c.sync_mark == {"stream": prov["stream"], "seq": 0}
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        hv.release(c)
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def test_a_certificate_the_overlay_does_not_authorize_is_refused(tmp_path: Path,
                                                                 certs: TestCerts) -> None:
    # the secondary's own certificate: same CA, but not the item's writer
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs, cert=certs.server_cert, key=certs.server_key)
    try:
        c = hv.seal(vm_id)
        assert c.sync_mark is None
        st = hv.sync_status(vm_id) or {}
        assert st["state"] == "suspended" and "did not answer" in st["reason"], st
        hv.release(c)
        run = ov.runs(ITEM)[-1]
        assert run["stream"] == conf["stream"]
        log = (ov.item_dir(ITEM) / "qsd.log").read_text()
        assert "authz" in log.lower() or "denied" in log.lower() or "not allowed" in log.lower(), log
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def test_a_write_during_the_stall_is_acknowledged_on_the_primary(tmp_path: Path,
                                                                 certs: TestCerts) -> None:
    """A write in flight when the mirror is cut loose completes for the guest (QEMU 7.2's
    write-blocking mirror fails the job, not the guest's write), and the dirty bitmap has it:
    the next point ships it."""
    hv, vm_id, ov, _ = sync_vm(tmp_path, certs, budget_ms=200)
    try:
        hv.release(hv.seal(vm_id))
        daemon = json.loads((ov.item_dir(ITEM) / "daemon.json").read_text())
        os.kill(int(daemon["pid"]), signal.SIGSTOP)
        done = threading.Event()
        try:
            threading.Thread(target=lambda: (guest_write(hv, vm_id, 2 * MiB, 4096, 9),
                                             done.set()), daemon=True).start()
            assert done.wait(5.0)
        finally:
            os.kill(int(daemon["pid"]), signal.SIGCONT)
        c = hv.seal(vm_id)
        assert any(s <= 2 * MiB < s + n for s, n in c.changed["d0"].to_pairs()), c.changed
        hv.release(c)
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def test_the_store_provisions_overlays_for_the_items_writer_only(tmp_path: Path,
                                                                 certs: TestCerts) -> None:
    """``POST items/{item}/sync-overlay`` over the store's mTLS: the writer gets a run whose
    export its own certificate passes (the mirror runs); another host of the same CA is
    refused by the access list; a malformed body and an item held by a failover too."""
    other = issue_agent_cert(certs.ca, tmp_path / "pki-other", "host-other", site="site-c")
    acl = StoreAcl(tmp_path / "agent" / "store-acl.json")
    acl.update(acl_doc(certs, other[0]))
    ov = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
    site = RunningSiteStore(tmp_path / "site", certs=certs, acl=acl, overlays=ov)
    hv = QemuHypervisor(tmp_path / "vms")
    vm_id = hv.create_blank(VmSpec("sq", disks=(DiskSpec("d0", 4 * MiB),)),
                            guest_agent=False).vm_id
    try:
        with site.client() as writer, site.client(*other) as stranger:
            with pytest.raises(Forbidden):
                stranger.sync_overlay("item-a", {"d0": 4 * MiB})
            with pytest.raises(InvalidInput):
                writer.sync_overlay("item-a", {"d0": -1})
            prov = writer.sync_overlay("item-a", hv.sync_disks(vm_id))
            held_marker(site.replicas, "item-b").parent.mkdir(parents=True, exist_ok=True)
            held_marker(site.replicas, "item-b").write_text("{}")
            with site.client(*other) as b_writer, pytest.raises(Forbidden):
                b_writer.sync_overlay("item-b", {"d0": 4 * MiB})
        hv.start_tracking(vm_id)
        hv.power_on(vm_id)
        hv.set_sync(vm_id, {"item_id": "item-a", "host": "127.0.0.1", "port": prov["port"],
                            "budget_ms": 500, "ca_file": str(certs.ca_file),
                            "cert_file": str(certs.client_cert),
                            "key_file": str(certs.client_key), "stream": prov["stream"],
                            "exports": prov["exports"]})
        c = hv.seal(vm_id)
        assert c.sync_mark == {"stream": prov["stream"], "seq": 0}
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        hv.release(c)
        with pytest.raises(InvalidInput):   # the exports must match the VM's disks
            hv.set_sync(vm_id, {"item_id": "item-a", "host": "127.0.0.1", "port": 1,
                                "budget_ms": 500, "ca_file": "x", "cert_file": "x",
                                "key_file": "x", "stream": "s", "exports": {"d9": "e"}})
    finally:
        hv.delete_vm(vm_id)
        site.stop()
        ov.stop()


def test_unwritten_runs_go_only_when_a_later_run_was_written(tmp_path: Path,
                                                             certs: TestCerts) -> None:
    """An overlay nobody wrote before a written one never began (dropped at the next
    provisioning); an empty one after the newest written run may be running (kept)."""
    ov = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
    try:
        who = dn(certs.client_cert)
        a = ov.provision(ITEM, {"d0": MiB}, who)["stream"]
        b = ov.provision(ITEM, {"d0": MiB}, who)["stream"]
        assert [r["stream"] for r in ov.runs(ITEM)] == [a, b]   # nothing written: all kept
        ov.stop_item(ITEM)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 512",
                        str(ov.run_dir(ITEM, b) / "d0.qcow2")], check=True, capture_output=True)
        c = ov.provision(ITEM, {"d0": MiB}, who)["stream"]
        assert [r["stream"] for r in ov.runs(ITEM)] == [b, c]   # a dropped, b written, c new
        d = ov.provision(ITEM, {"d0": MiB}, who)["stream"]
        assert [r["stream"] for r in ov.runs(ITEM)] == [b, c, d]   # c may be running: kept
    finally:
        ov.stop()


def test_black_holed_link_falls_back_within_the_budget(tmp_path: Path, certs: TestCerts) -> None:
    """The link to the recovery site drops every byte, no RST, no FIN (``tests.blackhole``):
    the watchdog's own probe goes the same way, so the guest's write waits about the
    budget, then the mirror is cut loose."""
    budget_ms = 300
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs, budget_ms=budget_ms)
    proxy = Proxy(int(conf["port"]))
    try:
        hv.set_sync(vm_id, {**conf, "port": proxy.port})
        hv.release(hv.seal(vm_id))
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        guest_write(hv, vm_id, 0, 4096, 1)
        proxy.hold()
        took = guest_write(hv, vm_id, 8192, 4096, 2)
        assert took < budget_ms / 1000 * 1.25 + 1.0, took
        st = hv.sync_status(vm_id) or {}
        assert st["state"] == "suspended" and "latency budget" in st["reason"], st
    finally:
        proxy.close()
        hv.delete_vm(vm_id)
        ov.stop()


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of ``fd`` of process ``pid`` (``pidfd_getfd``, Linux 5.6; our own child)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        n = int(libc.syscall(438, pidfd, fd, 0))   # SYS_pidfd_getfd on every Linux arch
        if n < 0:
            pytest.skip(f"pidfd_getfd refused: {os.strerror(ctypes.get_errno())}")
        return n
    finally:
        os.close(pidfd)


def test_the_overlay_daemon_answers_without_nagle(tmp_path: Path, certs: TestCerts) -> None:
    """The daemon's accepted connections have TCP_NODELAY (QEMU 7.2's NBD server does not set
    it; the listener we pass down does): else a reply waits behind the previous one until the
    client's delayed ACK, ~40 ms per batch of pipelined mirrored writes."""
    ov = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
    try:
        prov = ov.provision(ITEM, {"d0": MiB}, dn(certs.client_cert))
        client = syncwatch.connect({"host": "127.0.0.1", "port": prov["port"],
                                    "ca_file": str(certs.ca_file),
                                    "cert_file": str(certs.client_cert),
                                    "key_file": str(certs.client_key),
                                    "exports": [prov["exports"]["d0"]]}, 10.0)
        try:
            syncwatch.flush(client, 1)
            pid = int(json.loads((ov.item_dir(ITEM) / "daemon.json").read_text())["pid"])
            mine = client.getsockname()
            found = []
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        continue
                    s = socket.socket(fileno=_pidfd_getfd(pid, int(fd)))
                    try:
                        if s.family == socket.AF_INET and s.getpeername() == mine:
                            found.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    finally:
                        s.close()
            assert found and all(found), found
        finally:
            client.close()
    finally:
        ov.stop()


def test_the_overlay_maps_writes_zeroes_and_discards_as_the_source_sees_them(
        tmp_path: Path, certs: TestCerts) -> None:
    """The overlay's allocation map is what failover applies: a 4 KiB write, a sector write,
    a write-zeroes and a discard by the guest after the point's seal; point + overlay equals
    the source as a later seal of the run sees it, and nothing else is applied (the runway
    of zeros the overlay's clusters were allocated in is not)."""
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs)
    ovl = ov.run_dir(ITEM, conf["stream"]) / "d0.qcow2"
    provisioned = ovl.stat().st_size
    try:
        guest_write(hv, vm_id, 0, 8 * MiB, 7)                   # the point: all 7s
        c1 = hv.seal(vm_id)
        assert c1.sync_mark == {"stream": conf["stream"], "seq": 0}
        img = point_image(hv, c1, tmp_path / "point.img")
        hv.release(c1)
        paths = VmDir(hv.vm_dir(vm_id))
        with _vm_lock(paths), QmpClient.connect(str(paths.qmp_socket), timeout=60) as q:
            for cmd in ("write -P 1 4096 4096", "write -P 2 1049088 512",
                        "write -z 2097152 65536", "write -z 3149824 4096",
                        "discard 4194304 65536", "discard 5246976 4096"):
                out = q.execute("human-monitor-command", {
                    "command-line": f'qemu-io -d vd0/virtio-backend "{cmd}"'}, timeout=60)
                assert "error" not in str(out).lower() and "fail" not in str(out).lower(), out
        c2 = hv.seal(vm_id)                                      # the source, frozen
        assert c2.sync_mark == {"stream": conf["stream"], "seq": 1}
        source = point_image(hv, c2, tmp_path / "source.img").read_bytes()
        hv.release(c2)
        hv.kill(vm_id)
        ov.stop_item(ITEM)
        # the runway of written zeros past the new image's end took the allocated clusters
        assert provisioned >= 8 * MiB and ovl.stat().st_size == provisioned
        mapped = json.loads(subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", str(ovl)],
            check=True, capture_output=True, text=True).stdout)
        present = [(e["start"], e["length"]) for e in mapped if e.get("present")]
        # the writes and write-zeroes exactly (512-byte subclusters), nothing else; the
        # discards are not there: the source's nodes ignore discards (QEMU's default,
        # discard=ignore), so the source keeps the data and so must point + overlay
        assert present == [(4096, 4096), (1049088, 512), (2097152, 65536),
                           (3149824, 4096)], present
        assert img.read_bytes() != source
        OverlayTail(ov.item_dir(ITEM)).apply(conf["stream"], 0, {"d0": img})
        assert img.read_bytes() == source
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def _daemons_of(ov: OverlayServer, item: str) -> list[int]:
    return ov._orphans(item)   # every qemu-storage-daemon serving the item's QMP socket


def test_drop_stops_the_daemon_and_removes_the_files_also_after_a_crash(
        tmp_path: Path, certs: TestCerts) -> None:
    """An item whose sync state ended: ``drop`` stops its daemon — one an earlier agent
    process started (``daemon.json``) and one it never recorded — and removes its directory;
    a crash after the daemon stopped, or after the rename, is finished by the next ``drop``
    or ``sweep``; a VM still mirroring into it only suspends."""
    hv, vm_id, ov, _conf = sync_vm(tmp_path, certs, budget_ms=2000)  # a loaded box: no watchdog cut
    try:
        c = hv.seal(vm_id)
        hv.release(c)
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        guest_write(hv, vm_id, 0, 4096, 7)
        assert len(_daemons_of(ov, ITEM)) == 1
        # a later agent process: knows the daemon only by daemon.json
        ov2 = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert,
                            certs.server_key)
        assert ov2.items() == [ITEM]
        assert ov2.drop(ITEM)
        assert _daemons_of(ov, ITEM) == [] and not ov.item_dir(ITEM).exists()
        assert ov2.items() == [] and not ov2.drop(ITEM)   # idempotent
        assert not [p for p in (tmp_path / "overlays").iterdir()]
        guest_write(hv, vm_id, 4096, 4096, 8)   # the guest's write still completes
        assert until_state(hv, vm_id, "suspended")
        # an unrecorded daemon (agent killed before daemon.json) and a crash after the stop
        ov.provision(ITEM, {"d0": MiB}, dn(certs.client_cert))
        (ov.item_dir(ITEM) / "daemon.json").unlink()
        ov3 = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert,
                            certs.server_key)
        ov3.stop_item(ITEM)                      # "daemon stopped", then the crash
        assert _daemons_of(ov, ITEM) == [] and ov.item_dir(ITEM).is_dir()
        assert ov3.drop(ITEM) and not ov.item_dir(ITEM).exists()
        # a crash after the rename: sweep (at start) finishes it
        ov.provision(ITEM, {"d0": MiB}, dn(certs.client_cert))
        ov.stop_item(ITEM)
        aside = tmp_path / "overlays" / f".dropped-{ITEM}-x"
        os.replace(ov.item_dir(ITEM), aside)
        assert ov3.items() == [] and ov3.sweep() == 1 and not aside.exists()
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


_PROVISION = """
import sys
from pathlib import Path
from drsite.sitestore.syncoverlay import OverlayServer
root, ca, cert, key, item, writer = sys.argv[1:]
OverlayServer(Path(root), Path(ca), Path(cert), Path(key)).provision(item, {"d0": 1 << 20}, writer)
"""


@pytest.mark.parametrize("failpoint", ["overlay.daemon-spawned", "overlay.daemon-recorded"])
def test_an_agent_killed_while_it_starts_the_overlay_daemon_leaves_none_unrecorded(
        tmp_path: Path, certs: TestCerts, failpoint: str) -> None:
    """The agent is SIGKILLed right after it started an item's qemu-storage-daemon, before
    (``daemon-spawned``) or just after (``daemon-recorded``) daemon.json names it. The
    daemon runs behind the runners' gate, so none runs at all (before the gate: one ran on
    unrecorded until the item's next stop swept it by its QMP path); the next agent process
    provisions the item and its drop leaves nothing."""
    item = f"item-killed-{failpoint.rsplit('-', 1)[1]}"
    env = {**os.environ, "DRSITE_FAILPOINTS": f"{failpoint}=kill"}
    p = subprocess.run([sys.executable, "-c", _PROVISION, str(tmp_path / "overlays"),
                        str(certs.ca_file), str(certs.server_cert), str(certs.server_key), item,
                        dn(certs.client_cert)], env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    ov = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
    deadline = time.monotonic() + 5
    while _daemons_of(ov, item) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _daemons_of(ov, item) == [], "a daemon runs though its agent died before letting it"
    try:
        prov = ov.provision(item, {"d0": MiB}, dn(certs.client_cert))   # the restarted agent
        assert prov["port"] and len(_daemons_of(ov, item)) == 1
        assert ov.drop(item) and _daemons_of(ov, item) == []
    finally:
        ov.stop()


def until_state(hv: QemuHypervisor, vm_id: str, state: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (hv.sync_status(vm_id) or {}).get("state") == state:
            return True
        time.sleep(0.1)
    return False


def test_rotation_switches_layers_under_the_live_mirror_and_retires_the_old_ones(
        tmp_path: Path, certs: TestCerts) -> None:
    """A long run's overlay gets a new layer under the export (the mirror stays in sync);
    point + every layer in order = the disks; the older layers go only once the point before
    the latest was committed after the switch, and point + the layers left = the disks."""
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs, budget_ms=2000)  # a loaded box: no watchdog cut
    stream = conf["stream"]
    rd = ov.run_dir(ITEM, stream)
    try:
        c0 = hv.seal(vm_id)
        img0 = point_image(hv, c0, tmp_path / "p0.img")
        want = bytearray(img0.read_bytes())
        hv.release(c0)

        def write(off: int, n: int, pattern: int) -> None:
            guest_write(hv, vm_id, off, n, pattern)
            want[off:off + n] = bytes([pattern]) * n

        write(0, 64 * 1024, 1)                       # layer 0
        # the files' sizes bound what the daemon says was written (rotate asks it only past)
        assert ov.top_size_bound(ITEM) >= ov.top_bytes(ITEM) > 0
        assert ov.rotate(ITEM, lambda _i: None) is None            # under the threshold
        assert ov.rotate(ITEM, lambda _i: "p000000000001", force=True) == 1
        rec = json.loads((rd / "run.json").read_text())
        assert rec["layers"] == [0, 1] and rec["switched"] == {"1": "p000000000001"}
        write(512, 512, 2)                           # layer 1: over a sector of layer 0's
        write(5 * MiB, 4096, 3)
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        c1 = hv.seal(vm_id)                          # sealed after the switch
        assert c1.sync_mark == {"stream": stream, "seq": 1}
        img1 = point_image(hv, c1, tmp_path / "p1.img")
        hv.release(c1)
        # not proven: the point before the latest was committed before the switch
        assert ov.retire(ITEM, "p000000000002", "p000000000001") == 0
        assert ov.rotate(ITEM, lambda _i: "p000000000002", force=True) == 2
        write(6 * MiB, 4096, 4)                      # layer 2
        assert ov.retire(ITEM, "p000000000003", "p000000000002") == 1   # layer 0 goes
        rec = json.loads((rd / "run.json").read_text())
        assert rec["layers"] == [1, 2] and not (rd / "d0.qcow2").exists()
        write(7 * MiB, 4096, 5)                      # still mirrored, into layer 2
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        hv.kill(vm_id)
        ov.stop_item(ITEM)
        tail = OverlayTail(ov.item_dir(ITEM))
        tail.apply(stream, 1, {"d0": img1})          # the point sealed after layer 1's switch
        assert img1.read_bytes() == want
        assert img0.read_bytes() != want             # the first point alone misses them
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def test_every_layer_in_order_over_the_first_point(tmp_path: Path, certs: TestCerts) -> None:
    """Before any retirement, the point the run began at + layers 0, 1, 2 in order = the
    disks, also where a later layer rewrote a sector of an earlier one."""
    hv, vm_id, ov, conf = sync_vm(tmp_path, certs, budget_ms=2000)  # a loaded box: no watchdog cut
    try:
        c0 = hv.seal(vm_id)
        img0 = point_image(hv, c0, tmp_path / "p0.img")
        want = bytearray(img0.read_bytes())
        hv.release(c0)
        for layer, (off, n) in enumerate([(0, 8192), (4096, 512), (4096 + 512, 4096)]):
            guest_write(hv, vm_id, off, n, 10 + layer)
            want[off:off + n] = bytes([10 + layer]) * n
            guest_write(hv, vm_id, 2 * MiB + layer * 4096, 4096, 20 + layer)
            want[2 * MiB + layer * 4096:2 * MiB + (layer + 1) * 4096] = bytes([20 + layer]) * 4096
            if layer < 2:
                assert ov.rotate(ITEM, lambda _i: None, force=True) == layer + 1
        assert (hv.sync_status(vm_id) or {})["state"] == "in_sync"
        hv.kill(vm_id)
        ov.stop_item(ITEM)
        tail = OverlayTail(ov.item_dir(ITEM))
        n, nbytes = tail.apply(conf["stream"], 0, {"d0": img0})
        assert n == 1 and nbytes >= 8192 + 512 + 4096 + 3 * 4096
        assert img0.read_bytes() == want
        tail.apply(conf["stream"], 0, {"d0": img0})   # idempotent
        assert img0.read_bytes() == want
    finally:
        hv.delete_vm(vm_id)
        ov.stop()


def test_a_run_the_latest_point_outlived_goes(tmp_path: Path, certs: TestCerts) -> None:
    """A run goes once a committed point marked it (it began) and a newer latest point is
    not of it (the item went asynchronous); a run no point marked (not begun: it may begin
    at the next seal) and the run the latest point names stay."""
    ov = OverlayServer(tmp_path / "overlays", certs.ca_file, certs.server_cert, certs.server_key)
    try:
        who = dn(certs.client_cert)
        a = ov.provision(ITEM, {"d0": MiB}, who)["stream"]
        assert ov.drop_outlived(ITEM, "p000000000005", None) == 0      # never marked: kept
        ov.note_marked(ITEM, a, "p000000000003")
        ov.note_marked(ITEM, a, "p000000000004")                       # the first one counts
        assert ov.drop_outlived(ITEM, "p000000000003", a) == 0         # the latest is of it
        assert ov.drop_outlived(ITEM, "p000000000004", a) == 0
        b = ov.provision(ITEM, {"d0": MiB}, who)["stream"]
        assert ov.drop_outlived(ITEM, "p000000000005", None) == 1      # asynchronous now
        assert [r["stream"] for r in ov.runs(ITEM)] == [b]
        assert not ov.run_dir(ITEM, a).exists()
    finally:
        ov.stop()


def test_a_site_silent_between_the_probe_and_the_run_start_is_cut_off(
        tmp_path: Path, certs: TestCerts, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlay's daemon stops (SIGSTOP: the kernel still accepts the connection, nobody
    answers the TLS handshake) right after the seal's probe: the run start's ``blockdev-add``
    would wait in QEMU's main loop for ever; our copy of the connection is shut down after
    ``ADD_GUARD_S``, the add fails, the seal completes asynchronously with the reason, and
    QEMU answers again."""
    from drsite.hypervisors.qemu import syncmirror
    hv, vm_id, ov, _conf = sync_vm(tmp_path, certs, budget_ms=200)
    daemon = json.loads((ov.item_dir(ITEM) / "daemon.json").read_text())
    real_probe = syncmirror.probe

    def probe_then_stop(conf: dict[str, Any], timeout: float) -> str | None:
        why = real_probe(conf, timeout)
        os.kill(int(daemon["pid"]), signal.SIGSTOP)
        return why

    monkeypatch.setattr(syncmirror, "probe", probe_then_stop)
    try:
        t0 = time.monotonic()
        c = hv.seal(vm_id)
        took = time.monotonic() - t0
        assert c.sync_mark is None, c.sync_mark
        assert "sync mirror not begun" in c.note and "handshake" in c.note, c.note
        assert took < syncmirror.ADD_GUARD_S + 5.0, took
        st = hv.sync_status(vm_id) or {}
        assert st["state"] == "suspended" and "handshake" in st["reason"], st
        guest_write(hv, vm_id, 0, 4096, 9)            # QEMU's main loop runs again
        hv.release(c)
        print(f"seal with a silent site: {took:.2f} s")
    finally:
        os.kill(int(daemon["pid"]), signal.SIGCONT)
        hv.delete_vm(vm_id)
        ov.stop()
