"""The ``drill_probe`` command: is a drill's test VM up, and does its probe pass?

Sent by the vault's Drill job to the recovery host after the plan's test failover started the
test VMs. For one VM (by name): wait until it runs and its guest answers (the driver's
``guest_ready``: QEMU — qemu-guest-agent replies; file VMs — the guest process answers) or the
optional probe script succeeds, up to ``boot_timeout_s``; the probe runs with ``DRSITE_DRILL_*``
in its environment (VM name and id, IP addresses). The result says how long it took; a probe
that never passed or a guest that never answered is a result (``ok: false`` with the reason),
not an error: the drill reports it and still cleans up.

Responsible for: the readiness loop and running the probe. Not responsible for: starting or
removing the VM (test failover and its cleanup) or judging the drill (the vault).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any, Protocol

from drsite.agent.link import Command
from drsite.core.errors import DrsiteError, InvalidInput, VmNotFound
from drsite.core.model import PowerState, validate_name
from drsite.hypervisors.contract import HypervisorDriver

KINDS = ("drill_probe",)
OUTPUT_TAIL = 2000
POLL_S = 0.5


class DrillHost(Protocol):
    hypervisor: HypervisorDriver


def run_probe(script: str, timeout_s: float, env: dict[str, str]) -> tuple[int, str]:
    """``/bin/sh -c script`` with ``env`` added; (exit code, output tail); 124 on timeout (the
    whole process group is killed)."""
    proc = subprocess.Popen(["/bin/sh", "-c", script], env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = 124
    return rc, out.decode("utf-8", "replace")[-OUTPUT_TAIL:].strip()


class DrillCommands:
    def __init__(self, agent: DrillHost) -> None:
        self.agent = agent

    def handle(self, cmd: Command) -> dict[str, Any]:
        if cmd.kind != "drill_probe":
            raise InvalidInput(f"unknown command kind {cmd.kind!r}")
        a = cmd.args
        name = validate_name("VM", str(a.get("vm_name") or ""))
        boot_timeout = float(a.get("boot_timeout_s") or 120.0)
        probe = dict(a.get("probe") or {})
        hv = self.agent.hypervisor
        t0 = time.monotonic()
        out: dict[str, Any] = {"vm_name": name, "running": False, "guest_ready": False,
                               "ready_after_s": None, "probe": None, "ok": False, "reason": ""}
        try:
            vm = hv.find_vm(name)
        except VmNotFound:
            out["reason"] = f"test VM {name} does not exist on this host"
            return {"drill_probe": out}
        out["vm_id"] = vm.vm_id
        env = {"DRSITE_DRILL_VM": name, "DRSITE_DRILL_VM_ID": vm.vm_id,
               "DRSITE_DRILL_IPS": " ".join(str(n.ip) for n in vm.nics if n.ip),
               **{str(k): str(v) for k, v in dict(a.get("env") or {}).items()
                  if str(k).startswith("DRSITE_")}}
        attempts = 0
        last: tuple[int, str] | None = None
        while True:
            elapsed = time.monotonic() - t0
            try:
                running = hv.get_vm(vm.vm_id).power is PowerState.RUNNING
                ready = running and hv.guest_ready(vm.vm_id)
            except DrsiteError as e:
                running, ready = False, False
                out["reason"] = f"asking the hypervisor failed: {e.message}"
            out["running"] = out["running"] or running
            out["guest_ready"] = out["guest_ready"] or ready
            if running and probe.get("script"):
                attempts += 1
                last = run_probe(str(probe["script"]),
                                 min(float(probe.get("timeout_s") or 60.0),
                                     max(1.0, boot_timeout - elapsed)), env)
                if last[0] == 0:
                    out.update(ok=True, ready_after_s=round(time.monotonic() - t0, 3), reason="")
                    break
            elif ready:
                out.update(ok=True, ready_after_s=round(time.monotonic() - t0, 3), reason="")
                break
            if time.monotonic() - t0 >= boot_timeout:
                if not out["running"]:
                    out["reason"] = f"test VM {name} did not run within {boot_timeout:.0f} s"
                elif probe.get("script"):
                    out["reason"] = (f"probe did not pass within {boot_timeout:.0f} s "
                                     f"({attempts} attempt(s), last exit code "
                                     f"{last[0] if last else '-'})")
                else:
                    out["reason"] = (f"the guest of {name} did not answer within "
                                     f"{boot_timeout:.0f} s (no guest agent? give the drill a "
                                     "probe script)")
                break
            time.sleep(POLL_S)
        if probe.get("script"):
            out["probe"] = {"attempts": attempts, "rc": last[0] if last else None,
                            "output": last[1] if last else "", "ok": bool(last and last[0] == 0)}
        return {"drill_probe": out}
