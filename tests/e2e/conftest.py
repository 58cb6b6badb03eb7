"""The cluster of README's "Using it", shared by the end-to-end tests that need a deployment of
their own (``test_readme.py``, the dashboard's ``test_web_ui.py``): one cluster instead of one
per module keeps the suite's time down.

The ``readme`` fixture runs the block of commands under "## Using it" as written — a bash
script, ``set -e``, in a fresh directory, with the ``drsite`` of this environment first on the
PATH — all but its last line (``drsite down``), which runs when the session ends, and then no
process of the cluster may be left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from drsite.up import Cluster

REPO = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)


def readme_block() -> list[str]:
    """The lines of the README's "Using it" shell block."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it"):]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "README's 'Using it' has no ```sh block"
    return m.group(1).rstrip("\n").split("\n")


def shell_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRSITE_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", COLUMNS="200", HOME=str(cwd),
               PYTHONUNBUFFERED="1")
    return env


def run_script(lines: list[str], cwd: Path, log: Path, timeout: float) -> int:
    script = "set -e -o pipefail\nset -x\n" + "\n".join(lines) + "\n"
    with open(log, "ab") as out:
        proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=shell_env(cwd), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return proc.returncode


def processes_of(root: Path) -> list[tuple[int, str]]:
    """(pid, command line) of live processes that name ``root`` (agents, vault, VM guests,
    QEMU)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd:
            out.append((int(p.name), cmd[:200]))
    return out


@dataclass
class ReadmeRun:
    cwd: Path
    rc: int
    log: Path
    seconds: float

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def cluster(self) -> Cluster:
        return Cluster.load(self.cwd / "drsite-up")


@pytest.fixture(scope="session")
def readme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeRun]:
    cwd = tmp_path_factory.mktemp("readme")
    lines = readme_block()
    assert lines[-1].startswith("drsite down --data drsite-up"), lines[-1]
    log = cwd / "readme.log"
    t0 = time.monotonic()
    rc = run_script(lines[:-1], cwd, log, timeout=900)
    run = ReadmeRun(cwd, rc, log, time.monotonic() - t0)
    try:
        yield run
    finally:
        # the README's last line, as written, then nothing of the cluster may be running
        down_rc = run_script(["eval \"$(drsite env --data drsite-up)\"", lines[-1]], cwd,
                             log, timeout=180)
        left = [] if not (cwd / "drsite-up").exists() else processes_of(cwd / "drsite-up")
        for pid, _cmd in left:  # never leave them behind, whatever the assertion says
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert down_rc == 0, run.output[-3000:]
        assert left == [], left
