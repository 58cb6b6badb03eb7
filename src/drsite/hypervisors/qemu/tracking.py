"""The QEMU change-tracking cycle: persistent dirty bitmaps + fleecing + NBD export.

One cycle on one block node of a running QEMU (a VM or ``qemu-storage-daemon``):

1. :meth:`BitmapCycle.seal` — create a temporary qcow2 fleece overlay whose backing is the node,
   then one QMP ``transaction``: ``block-dirty-bitmap-add`` the next bitmap (persistent),
   ``block-dirty-bitmap-disable`` the current one and ``blockdev-backup sync=none`` from the node
   into the overlay (copy-before-write), so the overlay shows the node frozen at that instant while
   the guest writes on. The overlay is exported over NBD (``block-export-add``) with the disabled
   bitmap.
2. :meth:`BitmapCycle.open_reader` — an :class:`NbdClient` on that export, negotiated with
   ``qemu:dirty-bitmap:CURRENT`` (``dirty_extents`` / ``read_extents``).
3. :meth:`BitmapCycle.release` — ``block-export-del`` (and wait until it is gone: an exported
   bitmap cannot be removed), ``block-job-cancel`` the fleece job, ``blockdev-del`` the overlay,
   delete its file and ``block-dirty-bitmap-remove`` the old bitmap. Idempotent.

Responsible for the QMP choreography and for leaving nothing behind on release. Not responsible
for: choosing names or persisting cycle state (the driver does that), guest freeze, deciding
when tracking is untrusted (see :meth:`BitmapCycle.bitmap_state`), or libvirt.
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drsite.core.errors import Conflict, DrsiteError, NotFound, TrackingLost
from drsite.hypervisors.qemu.nbd import NbdClient, dirty_bitmap_context
from drsite.hypervisors.qemu.qmp import QmpClient
from drsite.hypervisors.qemu.tools import run_tool

# Dirty-bitmap granularity of new bitmaps. 4 KiB, the guests' block size: at 64 KiB every
# scattered 4 KiB write shipped 64 KiB (16x the churn, and a log "covering" most of the disk
# after a few hundred MiB of random writes). Costs QEMU 1 bit per 4 KiB (32 MiB per TiB).
GRANULARITY = 4 * 1024


@dataclass(frozen=True)
class FrozenView:
    """A sealed cycle of one node: ``bitmap`` (disabled, exported) holds the changes up to the
    seal, ``next_bitmap`` records from the seal on; the export shows the node at the seal."""

    node: str
    bitmap: str
    next_bitmap: str
    size: int
    fleece_node: str
    fleece_path: str
    job_id: str
    export_id: str
    export_name: str
    nbd_socket: str

    @property
    def filter_node(self) -> str:
        """Node name of the copy-before-write filter :meth:`BitmapCycle.seal_many` inserts
        above ``node`` while the view lives (writers must go through it)."""
        return "cbw-" + self.fleece_node.removeprefix("fleece-")


class BitmapCycle:
    """Drives the bitmap/fleece cycle for block nodes reachable through one QMP connection.

    ``workdir`` holds the temporary fleece overlays; ``nbd_socket`` is the unix socket of the
    NBD server (started by :meth:`ensure_nbd_server` if not running).
    """

    def __init__(self, qmp: QmpClient, workdir: Path, nbd_socket: Path) -> None:
        self.qmp = qmp
        self.workdir = workdir
        self.nbd_socket = nbd_socket

    # --- queries -------------------------------------------------------------------------------

    def _node(self, node: str) -> dict[str, Any]:
        nodes = self.qmp.execute("query-named-block-nodes", {"flat": True})
        for n in nodes:
            if n.get("node-name") == node:
                return dict(n)
        raise NotFound(f"block node {node} not found")

    def node_size(self, node: str) -> int:
        """Virtual size of ``node`` in bytes."""
        return int(self._node(node)["image"]["virtual-size"])

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        """The dirty bitmaps of ``node`` by name, as QEMU reports them."""
        return {b["name"]: b for b in self._node(node).get("dirty-bitmaps", []) if "name" in b}

    def bitmap_state(self, node: str, name: str) -> str:
        """``"active"``, ``"disabled"``, ``"inconsistent"`` or ``"missing"``."""
        b = self.bitmaps(node).get(name)
        if b is None:
            return "missing"
        if b.get("inconsistent"):
            return "inconsistent"
        return "active" if b.get("recording") else "disabled"

    # --- setup ------------------------------------------------------------------------------------

    def ensure_nbd_server(self) -> None:
        """Start QEMU's NBD server on ``nbd_socket`` unless it already runs there."""
        try:
            self.qmp.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": str(self.nbd_socket)}}})
        except DrsiteError as e:
            if "already running" not in str(e):
                raise

    def start(self, node: str, bitmap: str) -> None:
        """Begin tracking ``node`` with a new persistent, enabled bitmap ``bitmap``.

        Raises ``Conflict`` if a bitmap of that name exists.
        """
        if bitmap in self.bitmaps(node):
            raise Conflict(f"bitmap {bitmap} already exists on {node}")
        self.qmp.execute("block-dirty-bitmap-add", {"node": node, "name": bitmap,
                                                    "persistent": True,
                                                    "granularity": GRANULARITY})

    # --- the cycle ------------------------------------------------------------------------------

    def seal(self, node: str, current: str, next_bitmap: str, cycle_id: str) -> FrozenView:
        """Rotate ``current`` → ``next_bitmap`` and freeze ``node`` at one instant; export it.

        Raises ``TrackingLost`` if ``current`` is missing, disabled or inconsistent (only a
        resync is safe then). On failure everything this call created is removed again.
        """
        state = self.bitmap_state(node, current)
        if state != "active":
            raise TrackingLost(f"bitmap {current} on {node} is {state}")
        size = self.node_size(node)
        self.ensure_nbd_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        view = FrozenView(node=node, bitmap=current, next_bitmap=next_bitmap, size=size,
                          fleece_node=f"fleece-{cycle_id}",
                          fleece_path=str(self.workdir / f"fleece-{cycle_id}.qcow2"),
                          job_id=f"fleece-{cycle_id}", export_id=f"view-{cycle_id}",
                          export_name=f"view-{cycle_id}", nbd_socket=str(self.nbd_socket))
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", view.fleece_path, str(size)])
        try:
            self.qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": view.fleece_node,
                "file": {"driver": "file", "filename": view.fleece_path},
                "backing": node})
            self.qmp.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": node, "name": next_bitmap, "persistent": True,
                          "granularity": GRANULARITY}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": current}},
                {"type": "blockdev-backup",
                 "data": {"device": node, "target": view.fleece_node, "sync": "none",
                          "job-id": view.job_id}},
            ]})
            self.qmp.execute("block-export-add", {
                "type": "nbd", "id": view.export_id, "node-name": view.fleece_node,
                "name": view.export_name, "writable": False, "bitmaps": [current]})
        except BaseException:
            self._teardown(view, remove_bitmap=False)
            # undo the rotation if it happened: the changes stay in `current`
            if self.bitmap_state(node, next_bitmap) != "missing":
                self._quiet("block-dirty-bitmap-remove", {"node": node, "name": next_bitmap})
            if self.bitmap_state(node, current) == "disabled":
                self._quiet("block-dirty-bitmap-enable", {"node": node, "name": current})
            raise
        return view

    def seal_many(self, rotations: list[tuple[str, str, str]], cycle_id: str
                  ) -> list[FrozenView]:
        """:meth:`seal` for several nodes at ONE instant: ``rotations`` are
        ``(node, current, next_bitmap)``; one ``transaction`` rotates every bitmap and starts
        every fleece job, so the views of all disks of a VM show the same instant.

        Raises ``TrackingLost`` if any ``current`` is not active. On failure everything this
        call created is removed again and every ``current`` is recording again.
        """
        for node, current, _ in rotations:
            state = self.bitmap_state(node, current)
            if state != "active":
                raise TrackingLost(f"bitmap {current} on {node} is {state}")
        self.ensure_nbd_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        views = [self.view(node, current, next_bitmap, f"{cycle_id}-{i}", self.node_size(node))
                 for i, (node, current, next_bitmap) in enumerate(rotations)]
        try:
            actions: list[dict[str, Any]] = []
            for v in views:
                run_tool(["qemu-img", "create", "-q", "-f", "qcow2", v.fleece_path, str(v.size)])
                self.qmp.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": v.fleece_node,
                    "file": {"driver": "file", "filename": v.fleece_path}, "backing": v.node})
                actions += [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": v.node, "name": v.next_bitmap, "persistent": True,
                              "granularity": GRANULARITY}},
                    {"type": "block-dirty-bitmap-disable", "data": {"node": v.node,
                                                                    "name": v.bitmap}},
                    {"type": "blockdev-backup",
                     "data": {"device": v.node, "target": v.fleece_node, "sync": "none",
                              "job-id": v.job_id, "filter-node-name": v.filter_node}}]
            self.qmp.execute("transaction", {"actions": actions})
            for v in views:
                self.qmp.execute("block-export-add", {
                    "type": "nbd", "id": v.export_id, "node-name": v.fleece_node,
                    "name": v.export_name, "writable": False, "bitmaps": [v.bitmap]})
        except BaseException:
            for v in views:  # best effort: the caller undoes again by name and keeps its
                with suppress(DrsiteError, OSError):  # "sealing" record while any undo fails
                    self.undo_seal(v)
            raise  # the original error (a timeout), not the undo's
        return views

    def view(self, node: str, current: str, next_bitmap: str, tag: str, size: int
             ) -> FrozenView:
        """The names :meth:`seal_many` uses for one node's view (``tag``: cycle id and disk
        index; fleece node names must stay under 32 characters)."""
        return FrozenView(node=node, bitmap=current, next_bitmap=next_bitmap, size=size,
                          fleece_node=f"fleece-{tag}",
                          fleece_path=str(self.workdir / f"fleece-{tag}.qcow2"),
                          job_id=f"fleece-{tag}", export_id=f"view-{tag}",
                          export_name=f"view-{tag}", nbd_socket=str(self.nbd_socket))

    def discard(self, view: FrozenView) -> None:
        """Remove the view (export, job, overlay) but leave both bitmaps; idempotent."""
        self._teardown(view, remove_bitmap=False)

    def undo_seal(self, view: FrozenView) -> None:
        """Take back a seal that will not be used (failed half-way, or abandoned before its
        cycle was recorded): remove the view, fold ``next_bitmap`` back into ``bitmap`` and
        make ``bitmap`` record again, so no change is lost. Idempotent."""
        self._teardown(view, remove_bitmap=False)
        cur = self.bitmap_state(view.node, view.bitmap)
        if cur == "disabled":  # first: from now on writes land in `bitmap` (and in `next`)
            self._quiet("block-dirty-bitmap-enable", {"node": view.node, "name": view.bitmap})
            cur = "active"
        nxt = self.bitmap_state(view.node, view.next_bitmap)
        if nxt != "missing":
            if cur == "active" and nxt in ("active", "disabled"):
                self.qmp.execute("block-dirty-bitmap-merge", {
                    "node": view.node, "target": view.bitmap, "bitmaps": [view.next_bitmap]})
            self._quiet("block-dirty-bitmap-remove", {"node": view.node,
                                                      "name": view.next_bitmap})

    def carry(self, view: FrozenView) -> None:
        """Give up a sealed cycle whose frozen view is gone (its QEMU process stopped) without
        losing its changes: fold ``bitmap`` into ``next_bitmap`` (which recorded everything
        since the seal), then remove ``bitmap``. If either bitmap is not consistent nothing is
        merged (tracking is lost anyway; the driver reports it). Idempotent."""
        self._teardown(view, remove_bitmap=False)
        cur = self.bitmap_state(view.node, view.bitmap)
        nxt = self.bitmap_state(view.node, view.next_bitmap)
        if cur == "missing":
            return
        if cur in ("active", "disabled") and nxt in ("active", "disabled"):
            self.qmp.execute("block-dirty-bitmap-merge", {
                "node": view.node, "target": view.next_bitmap, "bitmaps": [view.bitmap]})
        self._quiet("block-dirty-bitmap-remove", {"node": view.node, "name": view.bitmap})

    def open_reader(self, view: FrozenView, *, timeout: float = 30.0) -> NbdClient:
        """An NBD client on the frozen view with the cycle's bitmap negotiated:
        ``client.dirty_extents(view.bitmap)`` are the changes, ``read_extents`` their data."""
        return NbdClient.connect_unix(view.nbd_socket, view.export_name,
                                      meta_contexts=[dirty_bitmap_context(view.bitmap)],
                                      timeout=timeout)

    def release(self, view: FrozenView) -> None:
        """Remove the export, the fleece job and overlay, and the old bitmap; idempotent.

        Call only after the cycle's changes are committed on the target: the old bitmap is
        gone afterwards.
        """
        self._teardown(view, remove_bitmap=True)

    # --- helpers -------------------------------------------------------------------------------

    def _teardown(self, view: FrozenView, *, remove_bitmap: bool) -> None:
        exports = {e.get("id") for e in self.qmp.execute("query-block-exports")}
        if view.export_id in exports:
            self.qmp.take_events("BLOCK_EXPORT_DELETED")
            self._quiet("block-export-del", {"id": view.export_id, "mode": "hard"})
            self.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=30,
                                match=lambda d: d.get("id") == view.export_id)
        jobs = {j.get("device") for j in self.qmp.execute("query-block-jobs")}
        if view.job_id in jobs:
            self._quiet("block-job-cancel", {"device": view.job_id, "force": True})
            self.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30,
                                match=lambda d: d.get("device") == view.job_id)
        try:
            self._node(view.fleece_node)
        except NotFound:
            pass
        else:
            self.qmp.execute("blockdev-del", {"node-name": view.fleece_node})
        try:
            os.unlink(view.fleece_path)
        except FileNotFoundError:
            pass
        if remove_bitmap and self.bitmap_state(view.node, view.bitmap) != "missing":
            self.qmp.execute("block-dirty-bitmap-remove", {"node": view.node,
                                                           "name": view.bitmap})

    def _quiet(self, cmd: str, args: dict[str, Any]) -> None:
        try:
            self.qmp.execute(cmd, args)
        except NotFound:
            pass
