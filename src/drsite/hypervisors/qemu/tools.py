"""The QEMU tools drsite runs: finding them, running ``qemu-img`` & co (:func:`run_tool`), and
``qemu-storage-daemon`` (:class:`StorageDaemon`).

Responsible for: running a tool and translating its failures into drsite errors; starting a
storage daemon with a QMP monitor on a unix socket inside a directory we own, connecting a
:class:`~drsite.hypervisors.qemu.qmp.QmpClient` to it, and stopping it (``quit``, then SIGKILL
after a grace period). Used for powered-off disks and in tests. Not responsible for what block
nodes or exports the caller configures through QMP, nor for the QEMU processes that hold a VM's
disks (:mod:`.runner`).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from drsite.core.errors import DrsiteError, NetworkError, NotFound, PermanentError
from drsite.hypervisors.qemu.qmp import QmpClient

QEMU_TOOLS = ("qemu-img", "qemu-nbd", "qemu-storage-daemon")


def missing_tools(names: tuple[str, ...] = QEMU_TOOLS) -> list[str]:
    """The names among ``names`` that are not on ``PATH``."""
    return [n for n in names if shutil.which(n) is None]


def run_tool(args: list[str], *, timeout: float = 60.0) -> str:
    """Run a QEMU tool (``qemu-img ...``) and return its stdout.

    Raises ``NotFound`` if the tool is not installed, ``PermanentError`` with its stderr if it
    fails, ``NetworkError`` (transient) if it does not finish within ``timeout`` seconds.
    """
    if shutil.which(args[0]) is None:
        raise NotFound(f"{args[0]} is not installed",
                       hint="Install Debian's qemu-utils and qemu-system-common packages.")
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise NetworkError(f"{args[0]} did not finish in {timeout} s") from e
    if p.returncode != 0:
        raise PermanentError(f"{' '.join(args[:2])} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


class StorageDaemon:
    """One ``qemu-storage-daemon`` process with its QMP monitor at ``workdir/qmp.sock``.

    ``extra_args`` are passed through (``--blockdev ...``, ``--nbd-server ...``). Use as a
    context manager; :attr:`qmp` is the connected client. Not responsible for the block graph.
    """

    def __init__(self, workdir: Path, extra_args: list[str] | None = None, *,
                 start_timeout: float = 10.0) -> None:
        self.workdir = workdir
        self.qmp_path = workdir / "qmp.sock"
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None
        self._log = workdir / "qemu-storage-daemon.log"

    @property
    def qmp(self) -> QmpClient:
        if self._qmp is None:
            raise PermanentError("storage daemon is not running")
        return self._qmp

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> QmpClient:
        """Start the daemon and return a negotiated QMP client. Raises ``NotFound`` if the
        binary is missing, ``PermanentError`` if it exits early (with its log)."""
        exe = shutil.which("qemu-storage-daemon")
        if exe is None:
            raise NotFound("qemu-storage-daemon is not installed",
                           hint="Install Debian's qemu-system-common package.")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.qmp_path.exists():
            self.qmp_path.unlink()
        args = [exe, "--chardev",
                f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=qmp0", *self.extra_args]
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                raise PermanentError(f"qemu-storage-daemon exited with {self._proc.returncode}: "
                                     f"{self._read_log()}")
            if self.qmp_path.exists():
                try:
                    self._qmp = QmpClient.connect(str(self.qmp_path),
                                                  timeout=max(0.5, deadline - time.monotonic()))
                    return self._qmp
                except NetworkError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise
            if time.monotonic() > deadline:
                self.stop()
                raise NetworkError(f"qemu-storage-daemon did not open {self.qmp_path} in time")
            time.sleep(0.02)

    def stop(self, *, grace: float = 5.0) -> None:
        """Ask the daemon to quit, kill it after ``grace`` seconds; idempotent."""
        if self._qmp is not None:
            try:
                self._qmp.execute("quit", timeout=grace)
            except DrsiteError:
                pass
            self._qmp.close()
            self._qmp = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _read_log(self) -> str:
        try:
            return self._log.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> StorageDaemon:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
