"""Failover commands on an agent: the host's half of the vault's failover jobs.

Recovery-site host (it serves the item's recovery store and holds its hydrated replica):
``failover`` (kind test / planned / unplanned), ``failover_cleanup``, ``failover_commit``,
``failover_cancel``, ``failover_change_point``, ``reprotect_seed`` (the old primary of a
committed failover: its disks become the base of the reverse item in *its own* store).
Primary-site host: ``failover_prepare`` (planned failover: power the VM off, final cycle,
fingerprints of the stopped disks), ``failover_resume_source`` (after a cancel: the new
generation, power the VM on again).

Every command is idempotent by its ``failover_id``: the library (:mod:`drsite.failover.actions`)
keeps a step record per failover under ``<data_dir>/failover/failovers/`` and resumes after the
last step done, so a re-delivered command (agent restart, vault restart) continues or returns
the same result. Work on an item's replica holds the replica's lock (the store server's
hydration and digest requests take the same lock), so hydration never races a failover.

Responsible for: building the failover library's view of an item on this host from the
command's arguments, and running one action. Not responsible for: ordering the halves across
hosts (the vault's jobs) or deciding anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from drsite import failpoints
from drsite.agent import breakglass, pointkeys
from drsite.agent.host import AgentHost
from drsite.agent.link import Command
from drsite.agent.state import ItemEntry
from drsite.core.errors import Conflict, DrsiteError, Fenced, InvalidInput, PermanentError
from drsite.core.model import PowerState, validate_name
from drsite.core.states import FailoverState
from drsite.failover import actions, reprotect
from drsite.failover.synctail import OverlayTail
from drsite.failover.wire import network_map_from_args, vm_spec_from_dict
from drsite.fsutil import atomic_write_json, read_json
from drsite.replication.driver import ItemReplicator
from drsite.replication.report import ItemState
from drsite.sitestore.server import held_marker, replica_lock
from drsite.store.auth import PointAuth
from drsite.store.contract import ObjectStore
from drsite.store.factory import open_store
from drsite.store.generation import GenerationStore
from drsite.store.replica import ReplicaHydrator
from drsite.store.repository import Repository

log = logging.getLogger(__name__)

RECOVERY_KINDS = ("failover", "failover_cleanup", "failover_commit", "failover_cancel",
                  "failover_change_point", "reprotect_seed")
PRIMARY_KINDS = ("failover_prepare", "failover_resume_source", "failover_fence")
KINDS = (*RECOVERY_KINDS, *PRIMARY_KINDS, "run_script")
SCRIPT_OUTPUT_TAIL = 2000


class LiveItem(Protocol):
    """An item this host protects, as the daemon holds it."""

    @property
    def entry(self) -> ItemEntry: ...


class FailoverHost(AgentHost, Protocol):
    """What the failover commands need of the agent daemon (:class:`drsite.agent.daemon.Agent`
    implements it; declared here so that this module does not import the daemon)."""

    def live_item(self, cmd: Command) -> tuple[LiveItem, ItemReplicator]: ...

    def set_generation(self, item_id: str, generation: int) -> None: ...

    def set_failed_over(self, item_id: str, failed_over: bool) -> None: ...

    def fence_item(self, item_id: str, reason: str) -> dict[str, Any]: ...

    def unfence_item(self, item_id: str) -> bool: ...



class FailoverCommands:
    """Runs the failover commands of one agent (called from the item's lane)."""

    def __init__(self, agent: FailoverHost) -> None:
        self.agent = agent
        self.work_dir = agent.data_dir / "failover"
        self._replicas = agent.data_dir / "replicas"

    def handle(self, cmd: Command) -> dict[str, Any]:
        fn = {"failover": self._failover, "failover_cleanup": self._cleanup,
              "failover_commit": self._commit, "failover_cancel": self._cancel,
              "failover_change_point": self._change_point, "reprotect_seed": self._reprotect_seed,
              "failover_prepare": self._prepare,
              "failover_resume_source": self._resume_source,
              "failover_fence": self._fence,
              "run_script": self._run_script}.get(cmd.kind)
        if fn is None:
            raise InvalidInput(f"unknown command kind {cmd.kind!r}",
                               hint="The agent is older than the vault; upgrade it.")
        return fn(cmd)

    # ------------------------------------------------------------------- recovery side

    def _store(self, args: dict[str, Any]) -> tuple[ObjectStore, Path]:
        """The item's recovery store as seen on this host, and the replicas directory."""
        svc = self.agent.store_service
        if args.get("store"):
            replicas = self.agent.data_dir / "replicas"
            return open_store(dict(args["store"])), replicas
        if svc is None:
            raise InvalidInput(f"host {self.agent.identity.host_name} serves no recovery store",
                               hint="Run the failover on the agent of the target site that "
                                    "serves the store (--store-listen).")
        return svc.local_store, svc.replicas_dir

    def _auth(self, item_id: str, raw: object) -> PointAuth | None:
        """The item's point MAC: from the command (kept in a 0600 file), else the key this
        host kept, else the one in its store's access list. With it, every point and
        generation record the failover reads must be authentic."""
        auth = pointkeys.auth_from_args(self.agent.data_dir, item_id, raw)
        svc = self.agent.store_service
        if auth is None and svc is not None:
            auth = svc.acl.point_auth(item_id)
        return auth

    @contextlib.contextmanager
    def _item(self, cmd: Command) -> Iterator[actions.ProtectedItem]:
        a = cmd.args
        try:
            source_site, recovery_site = str(a["source_site"]), str(a["recovery_site"])
            spec = vm_spec_from_dict(dict(a["vm_spec"]))
            vm_id = str(a["vm_id"])
        except KeyError as e:
            raise InvalidInput(f"{cmd.kind} {cmd.item_id}: missing argument {e.args[0]!r}") from None
        item_id = validate_name("item", cmd.item_id or "")
        store, replicas = self._store(a)
        svc = self.agent.store_service
        repo = Repository(store, item_id, auth=self._auth(item_id, a.get("point_key")),
                          map_cache=svc.map_cache if svc is not None and store is svc.local_store
                          else None)
        hv = self.agent.hypervisor
        replica_dir = replicas / item_id
        replica_dir.mkdir(parents=True, exist_ok=True)
        self._replicas = replicas
        sync = svc.sync if svc is not None and not a.get("store") else None
        journal = sync.journal(item_id) if sync is not None and sync.has_journal(item_id) \
            else None
        overlays = svc.overlays.item_dir(item_id) if svc is not None and not a.get("store") \
            else None   # synchronous QEMU VMs (failover.synctail.OverlayTail)
        try:
            with replica_lock(replica_dir):
                yield actions.ProtectedItem(
                    item_id=item_id, vm_id=vm_id, spec=spec,
                    primary=actions.Site(source_site, None, self.work_dir),
                    recovery=actions.Site(recovery_site, hv, self.work_dir),
                    repo=repo, hydrator=ReplicaHydrator(repo, replica_dir),
                    network_map=network_map_from_args(a.get("network_map")),
                    sync_journal=journal,
                    sync_overlay=OverlayTail(overlays) if overlays is not None and
                    overlays.is_dir() else None)
        finally:
            repo.close()

    def _hold(self, item_id: str, held: bool) -> None:
        """Stop (or resume) the store service's hydration of a replica that a real failover
        moves into its VM; called under the replica's lock (see ``held_marker``)."""
        marker = held_marker(self._replicas, item_id)
        if held:
            atomic_write_json(marker, {"held_by": "failover", "at": time.time()})
        else:
            marker.unlink(missing_ok=True)

    @staticmethod
    def _fid(cmd: Command) -> str:
        fid = cmd.args.get("failover_id")
        if not fid:
            raise InvalidInput(f"{cmd.kind} {cmd.item_id}: missing argument 'failover_id'")
        return validate_name("failover", str(fid))

    @staticmethod
    def _result(rec: actions.FailoverResult) -> dict[str, Any]:
        return {"failover": rec.to_dict()}

    def _refuse_breakglass(self, cmd: Command, fid: str) -> None:
        """``Conflict`` while a break-glass failover the vault has not recorded holds the item
        on this host (another failover would start a second VM)."""
        bg = breakglass.active_failover(self.agent.data_dir, cmd.item_id or "")
        if bg is not None and bg != fid:
            raise Conflict(f"item {cmd.item_id} was failed over on this host by break-glass "
                           f"failover {bg}, which the vault has not recorded yet",
                           hint="Wait for this agent's next heartbeat (it reports the failover), "
                                "then commit or cancel that one.")

    def _failover(self, cmd: Command) -> dict[str, Any]:
        a = cmd.args
        kind, fid = str(a.get("kind")), self._fid(cmd)
        if kind != "test":
            self._refuse_breakglass(cmd, fid)
        with self._item(cmd) as pi:
            if kind != "test":
                # again under the replica's lock: a break-glass run (``drsite agent failover``)
                # may have held it and failed the item over while this command waited for it
                self._refuse_breakglass(cmd, fid)
            if kind == "test":
                rec = actions.test_failover(pi, str(a.get("point") or "latest"), failover_id=fid,
                                            vm_name=a.get("vm_name"))
            elif kind == "unplanned":
                self._hold(pi.item_id, True)  # also closes the item's sync journal to writers
                svc = self.agent.store_service
                if svc is not None and svc.sync is not None:
                    svc.sync.disconnect(pi.item_id)
                if svc is not None:
                    svc.overlays.stop_item(pi.item_id)  # nothing writes an overlay read now
                rec = actions.unplanned_failover(pi, str(a.get("point") or "latest"),
                                                 failover_id=fid, replace_vm=a.get("replace_vm"))
            elif kind == "planned":
                try:
                    point_id, prints = str(a["point_id"]), dict(a["fingerprints"])
                except KeyError as e:
                    raise InvalidInput(f"planned failover {fid}: missing {e.args[0]!r} from the "
                                       "source's prepare step") from None
                self._hold(pi.item_id, True)
                rec = actions.planned_failover_recovery_side(
                    pi, failover_id=fid, point_id=point_id,
                    fingerprints={str(k): str(v) for k, v in prints.items()},
                    vm_name=a.get("vm_name"), replace_vm=a.get("replace_vm"))
            else:
                raise InvalidInput(f"unknown failover kind {kind!r}; known: test, planned, unplanned")
        log.info("failover %s (%s) of %s: %s, VM %s, RTO %.2f s", fid, kind, cmd.item_id,
                 rec.state.value, rec.vm_name, rec.rto_s or 0.0)
        return self._result(rec)

    def _cleanup(self, cmd: Command) -> dict[str, Any]:
        fid = self._fid(cmd)
        with self._item(cmd) as pi:
            if actions.load_failover(pi.recovery, fid) is None:  # it never started here
                return {"failover": {"failover_id": fid, "state": FailoverState.CLEANED_UP.value,
                                     "notes": ["nothing had started on the recovery site"]}}
            return self._result(actions.cleanup_test_failover(pi, fid,
                                                              str(cmd.args.get("notes") or "")))

    def _commit(self, cmd: Command) -> dict[str, Any]:
        with self._item(cmd) as pi:
            return self._result(actions.commit(pi, self._fid(cmd)))

    def _cancel(self, cmd: Command) -> dict[str, Any]:
        fid = self._fid(cmd)
        with self._item(cmd) as pi:
            if actions.load_failover(pi.recovery, fid) is None:
                # the recovery side never started (e.g. the source's half failed): nothing to
                # undo here; the generation is unchanged
                return {"failover": {"failover_id": fid, "state": FailoverState.CANCELLED.value,
                                     "generation": max(1, pi.generations.current(pi.item_id)),
                                     "notes": ["nothing had started on the recovery site"]}}
            self._hold(pi.item_id, False)  # the replica is rebuilt (cancel catches it up)
            failpoints.hit("agent.failover-cancel")
            return self._result(actions.cancel(pi, fid, restart_source=False))

    def _change_point(self, cmd: Command) -> dict[str, Any]:
        with self._item(cmd) as pi:
            return self._result(actions.change_point(pi, self._fid(cmd),
                                                     str(cmd.args.get("point") or "latest")))

    # ------------------------------------------------------------------- primary side

    def _prepare(self, cmd: Command) -> dict[str, Any]:
        """Planned failover, primary half: power off, final cycle, fingerprints. Idempotent:
        a re-run after the final cycle returns the recorded point (the VM stays off)."""
        fid = self._fid(cmd)
        agent = self.agent
        item, rep = agent.live_item(cmd)
        rec_path = self.work_dir / "prepared" / f"{fid}.json"
        if rec_path.exists():
            return dict(read_json(rec_path))
        hv = agent.hypervisor
        vm_id = item.entry.vm_id
        t0 = time.monotonic()
        if hv.get_vm(vm_id).power is not PowerState.STOPPED:
            hv.power_off(vm_id, timeout=float(cmd.args.get("shutdown_timeout") or 60.0))
        t_off = time.monotonic() - t0
        point = rep.run_cycle(wait_transient=False)
        t_cycle = time.monotonic() - t0 - t_off
        prints = actions.source_fingerprints(hv, vm_id)
        out = {"point_id": point.point_id, "point": point.to_dict(), "fingerprints": prints,
               "timings": {"source_shutdown": round(t_off, 3), "final_cycle": round(t_cycle, 3)}}
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rec_path, out)
        agent.set_failed_over(cmd.item_id or "", True)
        log.info("planned failover %s of %s: source off, final point %s", fid, cmd.item_id,
                 point.point_id)
        return out

    def _resume_source(self, cmd: Command) -> dict[str, Any]:
        """After a cancelled failover: adopt the new generation (the engine writes again; a
        fenced engine resyncs), optionally power the VM on again."""
        agent = self.agent
        item, rep = agent.live_item(cmd)
        # never go back: a cancel before any promotion leaves the item's own number
        gen = max(int(cmd.args.get("generation") or 0), item.entry.generation)
        agent.set_generation(cmd.item_id or "", gen)
        rep.generation = gen
        err = rep.report.last_error
        resync = bool(err and err.get("code") == Fenced.code) or \
            rep.rec.phase in (ItemState.CRITICAL, ItemState.RESYNC_REQUIRED)
        if resync:
            rep.request_resync("failover cancelled: the source is the primary again")
        agent.set_failed_over(cmd.item_id or "", False)
        powered = False
        # a VM this host fenced while it was running runs again (the failover is undone)
        if agent.unfence_item(cmd.item_id or "") or cmd.args.get("power_on"):
            vm = agent.hypervisor.get_vm(item.entry.vm_id)
            if vm.power is not PowerState.RUNNING:
                agent.hypervisor.power_on(item.entry.vm_id)
                powered = True
        return {"generation": gen, "powered_on": powered, "resync": resync,
                "report": rep.report.to_dict()}

    def _fence(self, cmd: Command) -> dict[str, Any]:
        """Unplanned failover, old primary's half (whenever this host hears of it): the
        recovery site was promoted, so the VM here is powered off and the item stops
        replicating (``Agent.fence_item``); its engine is fenced by the store's generation
        record in any case."""
        reason = f"failover {self._fid(cmd)} promoted site {cmd.args.get('recovery_site')}"
        gen = int(cmd.args.get("generation") or 0)
        with contextlib.suppress(DrsiteError):
            item, _ = self.agent.live_item(cmd)
            if gen and item.entry.generation >= gen:
                # the item came back to this site at that generation or later (a cancel):
                # a stale fence (e.g. re-delivered after an agent restart) changes nothing
                return {"fenced": False, "failover_id": self._fid(cmd),
                        "note": f"stale: the item holds generation {item.entry.generation}"}
        out = self.agent.fence_item(cmd.item_id or "", reason)
        with contextlib.suppress(DrsiteError):
            _, rep = self.agent.live_item(cmd)
            if rep.rec.phase is not ItemState.CRITICAL:
                rep.mark_fenced(f"{reason}: this site must not write the item any more")
        return {**out, "failover_id": self._fid(cmd), "at": time.time()}

    def _reprotect_seed(self, cmd: Command) -> dict[str, Any]:
        """Re-protect, old primary's half: power its VM off and write its disks as the full
        base point of the reverse item into this host's own store (no network), with the
        reverse item's generation record naming the new primary. The recovery VM's agent then
        resyncs against it by checksums."""
        a = cmd.args
        try:
            rev_id = validate_name("item", str(a["rev_item_id"]))
            vm_id, new_primary = str(a["vm_id"]), validate_name("site", str(a["new_primary_site"]))
            generation = int(a["generation"])
        except KeyError as e:
            raise InvalidInput(f"reprotect_seed: missing argument {e.args[0]!r}") from None
        fid = self._fid(cmd)
        svc = self.agent.store_service
        if svc is None:
            raise InvalidInput(f"host {self.agent.identity.host_name} serves no recovery store; "
                               "re-protect writes the reverse item's base into it",
                               hint="Run this host's agent with --store-listen.")
        hv = self.agent.hypervisor
        vm = hv.get_vm(vm_id)
        if vm.power is PowerState.RUNNING:
            hv.power_off(vm_id, timeout=30.0)  # never a VM of the item on both sites
        store = svc.local_store
        auth = self._auth(rev_id, a.get("rev_point_key"))
        repo = Repository(store, rev_id, auth=auth)
        readers = {d.disk_id: hv.open_live_reader(vm_id, d.disk_id) for d in vm.disks}
        t0 = time.monotonic()
        try:
            base, written = reprotect.write_base_point(repo, f"{fid}-base", readers, time.time())
        finally:
            for r in readers.values():
                r.close()
            repo.close()
        GenerationStore(store, auth).ensure(rev_id, new_primary, now=time.time(),
                                            at_least=generation,
                                            reason=f"re-protect of {cmd.item_id}")
        return {"base_point_id": base.point_id, "base_bytes_local": written,
                "disk_bytes": sum(base.disk_sizes.values()), "generation":
                GenerationStore(store, auth).current(rev_id), "seconds": round(time.monotonic() - t0, 3)}

    # ------------------------------------------------------------------- recovery plans

    def _run_script(self, cmd: Command) -> dict[str, Any]:
        """A recovery plan's script action on this host: ``/bin/sh -c`` with the plan's context
        in the environment (``DRSITE_*``), killed (whole process group) after ``timeout_s``.
        A non-zero exit code fails the command (permanent: the plan stops there)."""
        script = str(cmd.args.get("script") or "")
        if not script.strip():
            raise InvalidInput("run_script: empty script")
        timeout = float(cmd.args.get("timeout_s") or 300)
        env = {**os.environ, **{str(k): str(v) for k, v in dict(cmd.args.get("env") or {}).items()
                                if str(k).startswith("DRSITE_")}}
        proc = subprocess.Popen(["/bin/sh", "-c", script], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise PermanentError(f"script timed out after {timeout:.0f} s and was killed",
                                 hint="Raise its timeout_s or make it faster.") from None
        tail = out.decode("utf-8", "replace")[-SCRIPT_OUTPUT_TAIL:].strip()
        if proc.returncode != 0:
            raise PermanentError(f"script failed with exit code {proc.returncode}: {tail[-300:]}",
                                 hint="Fix the script on the plan, then run the plan again.")
        return {"rc": 0, "output": tail}
