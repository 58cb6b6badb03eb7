"""A QEMU seal whose transaction QEMU applied but whose reply never came (the QMP client then
closes its connection, so nothing can be undone in that session): the seal raises the
original error and keeps its ``sealing`` record, so the next session's reconcile folds the
bitmaps back — before, the record was cleared, the current bitmap stayed disabled and the
next seal found tracking lost (a full resync). A fake QMP stands in for QEMU; the real
seal and reconcile run against QEMU in ``tests/integration/test_qemu_driver.py``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from drsite.core.errors import NetworkError
from drsite.fsutil import read_record, write_record
from drsite.hypervisors.qemu import driver as drv
from drsite.hypervisors.qemu.layout import QemuDisk, VmDir
from drsite.hypervisors.qemu.tracking import BitmapCycle


class AppliedThenSilentQmp:
    """Applies the seal's transaction, then times out: the connection is closed."""

    def __init__(self) -> None:
        self.closed = False
        self.bitmaps: dict[str, dict[str, bool]] = {"drv0": {"drsite-e-0": True}}
        self.nodes = {"drv0"}
        self.jobs: set[str] = set()

    def take_events(self, *_: Any) -> list[Any]:
        return []

    def execute(self, cmd: str, args: dict[str, Any] | None = None, **_: Any) -> Any:
        if self.closed:
            raise NetworkError("QMP: connection is closed")
        args = args or {}
        if cmd == "query-named-block-nodes":
            return [{"node-name": n, "image": {"virtual-size": 1 << 20},
                     "dirty-bitmaps": [{"name": b, "recording": r}
                                       for b, r in self.bitmaps.get(n, {}).items()]}
                    for n in self.nodes]
        if cmd == "nbd-server-start":
            return {}
        if cmd == "blockdev-add":
            self.nodes.add(args["node-name"])
            return {}
        if cmd == "transaction":
            for a in args["actions"]:
                d = a["data"]
                if a["type"] == "block-dirty-bitmap-add":
                    self.bitmaps[d["node"]][d["name"]] = True
                elif a["type"] == "block-dirty-bitmap-disable":
                    self.bitmaps[d["node"]][d["name"]] = False
                elif a["type"] == "blockdev-backup":
                    self.jobs.add(d["job-id"])
            self.closed = True
            raise NetworkError("QMP: no answer within 10 s")
        raise AssertionError(f"unexpected QMP command {cmd}")


class Cfg:
    name = "vm1"
    vm_id = "v1"
    disks = (QemuDisk("d0", 1 << 20, "drv0"),)


class Runner:
    token = "t"
    kind = "daemon"


def test_a_seal_whose_reply_never_came_keeps_its_record(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    paths = VmDir(tmp_path)
    q = AppliedThenSilentQmp()
    write_record(paths.tracking, {"epoch": "e" * 32, "bitmap": "drsite-e-0", "gen": 0,
                                  "base_released": True, "sealing": None, "notes": []})
    hv = drv.QemuHypervisor.__new__(drv.QemuHypervisor)

    @contextmanager
    def session(*_: Any, **__: Any) -> Iterator[tuple[BitmapCycle, Runner]]:
        yield BitmapCycle(q, tmp_path / "fleece", tmp_path / "nbd.sock"), Runner()  # type: ignore[arg-type]

    monkeypatch.setattr(hv, "_locate", lambda vm_id: (paths, Cfg), raising=False)
    monkeypatch.setattr(hv, "_session", session, raising=False)
    monkeypatch.setattr(hv, "_bitmap_problems", lambda *_: ([], {}), raising=False)
    monkeypatch.setattr(hv, "_sync_mark", lambda *_: None, raising=False)
    monkeypatch.setattr("drsite.hypervisors.qemu.tracking.run_tool", lambda argv: None)
    with pytest.raises(NetworkError, match="no answer"):  # the original error, not the undo's
        hv._seal("v1", app_consistent=False)
    tr = read_record(paths.tracking)
    assert tr is not None and tr["sealing"] is not None  # the reconcile's to undo
    assert tr["sealing"]["next"] in q.bitmaps["drv0"]
