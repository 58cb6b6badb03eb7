"""``drsite up`` / ``drsite down`` around their processes and VMs: ``down`` stops the VMs
(file VMs' guest processes) and ``up`` starts again the ones it stopped; an ``up`` that fails
half-way stops what it started and has saved its pids; ``down`` without a deployment says
which ``--data`` to give (it used to be a traceback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drsite.cli.main import app
from drsite.core.errors import InvalidInput, NetworkError
from drsite.core.model import DiskSpec, PowerState, VmSpec
from drsite.hypervisors.file.driver import FileHypervisor
from drsite.up import Cluster, down, start_stopped_vms, stop_vms, up


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status").read_text()
    return "State:\tZ" not in status


def test_down_stops_the_vms_and_up_starts_them_again(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "c")
    hv = {s: FileHypervisor(c.root / s / "vms") for s in ("primary", "secondary")}
    run = hv["primary"].create_blank(VmSpec("run", disks=(DiskSpec("d0", 1 << 20),))).vm_id
    idle = hv["primary"].create_blank(VmSpec("idle", disks=(DiskSpec("d0", 1 << 20),))).vm_id
    rec = hv["secondary"].create_blank(VmSpec("rec", disks=(DiskSpec("d0", 1 << 20),))).vm_id
    hv["primary"].power_on(run)
    hv["secondary"].power_on(rec)
    pid = int((hv["primary"].vm_dir(run) / "guest.pid").read_text())
    try:
        assert stop_vms(c, timeout=5) == 2
        assert not alive(pid)
        assert hv["primary"].get_vm(run).power is PowerState.STOPPED
        assert Cluster.load(c.root).stopped_vms == {"primary": [run], "secondary": [rec]}
        start_stopped_vms(c)
        assert hv["primary"].get_vm(run).power is PowerState.RUNNING
        assert hv["secondary"].get_vm(rec).power is PowerState.RUNNING
        assert hv["primary"].get_vm(idle).power is PowerState.STOPPED  # it was not running
        assert Cluster.load(c.root).stopped_vms == {}
    finally:
        for h in hv.values():
            for vm in h.list_vms():
                h.power_off(vm.vm_id, force=True)


def test_down_without_a_deployment_names_the_option(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput) as e:
        Cluster.load(tmp_path / "nothing")
    assert "drsite down --data DIR" in (e.value.hint or "")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["down"])  # main() maps the error to exit code 2
    assert r.exit_code != 0 and isinstance(r.exception, InvalidInput)


@pytest.mark.slow
def test_an_up_that_fails_half_way_leaves_nothing_running(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import drsite.up as up_module

    def agent_fails(*_a: object, **_k: object) -> None:
        raise NetworkError("secondary agent heartbeat: not ready after 60 s")

    started: dict[str, int] = {}
    real_start_vault = up_module.start_vault

    def start_vault(c: Cluster) -> None:
        real_start_vault(c)
        started.update(c.pids)
        # the vault's pid is on disk as soon as it started, whatever happens next
        assert Cluster.load(c.root).pids["vault"] == c.pids["vault"]

    monkeypatch.setattr(up_module, "start_vault", start_vault)
    monkeypatch.setattr(up_module, "start_agent", agent_fails)
    with pytest.raises(NetworkError):
        up(tmp_path / "c")
    assert started and not alive(started["vault"])
    assert Cluster.load((tmp_path / "c").resolve()).pids == {}
    down(Cluster.load((tmp_path / "c").resolve()))  # and down has nothing left to stop
