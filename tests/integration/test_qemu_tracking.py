"""The bitmap + fleece + NBD cycle on a real qemu-storage-daemon (skips without QEMU unless
DRSITE_TEST_QEMU=1)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drsite.core.errors import TrackingLost
from drsite.core.extents import ExtentList
from drsite.hypervisors.qemu.nbd import NbdClient
from drsite.hypervisors.qemu.tools import StorageDaemon, missing_tools, run_tool
from drsite.hypervisors.qemu.tracking import GRANULARITY, BitmapCycle

MiB = 1 << 20
SIZE = 64 * MiB


def require_qemu() -> None:
    missing = missing_tools()
    if not missing:
        return
    msg = (f"QEMU tools missing: {', '.join(missing)} (apt-get install qemu-utils "
           "qemu-system-common libnbd-bin)")
    if os.environ.get("DRSITE_TEST_QEMU") == "1":
        pytest.fail("DRSITE_TEST_QEMU=1 but " + msg)
    pytest.skip(msg)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[StorageDaemon, BitmapCycle, NbdClient, Path]]:
    require_qemu()
    img = tmp_path / "disk.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)])
    run_tool(["qemu-img", "bitmap", "--add", "--enable", "-g", str(GRANULARITY), str(img), "b0"])
    d = StorageDaemon(tmp_path / "qsd", [
        "--blockdev", f"driver=file,filename={img},node-name=file0",
        "--blockdev", "driver=qcow2,file=file0,node-name=disk0"])
    with d:
        cyc = BitmapCycle(d.qmp, tmp_path / "fleece", tmp_path / "nbd.sock")
        cyc.ensure_nbd_server()
        d.qmp.execute("block-export-add", {"type": "nbd", "id": "w", "node-name": "disk0",
                                           "name": "w", "writable": True})
        with NbdClient.connect_unix(str(tmp_path / "nbd.sock"), "w") as writer:
            yield d, cyc, writer, img


def aligned(pairs: list[tuple[int, int]]) -> ExtentList:
    return ExtentList.of(pairs).align(GRANULARITY, SIZE)


def test_two_cycles_see_exactly_their_writes(
        setup: tuple[StorageDaemon, BitmapCycle, NbdClient, Path]) -> None:
    d, cyc, writer, img = setup
    assert cyc.bitmap_state("disk0", "b0") == "active"
    w1 = [(0, 4096), (5 * MiB + 100, 200_000), (40 * MiB, 64 * 1024)]
    for i, (off, n) in enumerate(w1):
        writer.write(off, bytes([0x10 + i]) * n)
    writer.flush()

    view1 = cyc.seal("disk0", "b0", "b1", "c1")
    assert cyc.bitmap_state("disk0", "b0") == "disabled"
    assert cyc.bitmap_state("disk0", "b1") == "active"
    # guest writes on after the seal, over a sealed region and elsewhere
    w2 = [(5 * MiB, 8192), (50 * MiB, 3 * MiB)]
    for off, n in w2:
        writer.write(off, b"\xee" * n)
    writer.flush()

    with cyc.open_reader(view1) as r:
        assert r.size == SIZE
        dirty = r.dirty_extents("b0")
        assert dirty == aligned(w1)
        frozen = bytearray(SIZE)
        for off, buf in r.read_extents(dirty, inflight=16, request_size=64 * 1024):
            frozen[off:off + len(buf)] = buf
    # the frozen view holds the pre-seal bytes, not w2's
    assert frozen[5 * MiB:5 * MiB + 100] == bytes(100)
    assert frozen[5 * MiB + 100:5 * MiB + 8192] == b"\x11" * (8192 - 100)
    assert frozen[40 * MiB:40 * MiB + 65536] == b"\x12" * 65536
    assert frozen[0:4096] == b"\x10" * 4096
    cyc.release(view1)
    cyc.release(view1)  # idempotent
    assert set(cyc.bitmaps("disk0")) == {"b1"}
    assert not list((cyc.workdir).glob("*.qcow2"))

    view2 = cyc.seal("disk0", "b1", "b2", "c2")
    with cyc.open_reader(view2) as r:
        assert r.dirty_extents("b1") == aligned(w2)
        assert r.read(50 * MiB, 16) == b"\xee" * 16
    cyc.release(view2)
    assert set(cyc.bitmaps("disk0")) == {"b2"}
    assert d.qmp.execute("query-block-jobs") == []

    # the bitmap is persistent: after a clean stop it is in the qcow2 and still recording
    d.stop()
    info = run_tool(["qemu-img", "info", "--output=json", str(img)])
    assert '"name": "b2"' in info


def test_seal_refuses_untracked_bitmap(
        setup: tuple[StorageDaemon, BitmapCycle, NbdClient, Path]) -> None:
    _, cyc, _, _ = setup
    with pytest.raises(TrackingLost):
        cyc.seal("disk0", "nope", "b1", "c1")
    view = cyc.seal("disk0", "b0", "b1", "c1")
    with pytest.raises(TrackingLost):  # b0 is disabled now
        cyc.seal("disk0", "b0", "b9", "c9")
    cyc.release(view)
    assert set(cyc.bitmaps("disk0")) == {"b1"}
