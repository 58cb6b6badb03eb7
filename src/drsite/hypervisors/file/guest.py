"""The guest process of a file VM: ``python -m drsite.hypervisors.file.guest VMDIR``.

Opens the VM (:class:`FileVm`), runs a :class:`GuestRuntime` (control socket, workload, pid
file) and stops cleanly on SIGTERM/SIGINT or the ``shutdown`` command: the workload stops,
logs and disks are flushed, logs are marked clean. SIGKILL leaves the logs open, which the next
open checks (same boot: validated and trusted; another boot: untrusted).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

from drsite.hypervisors.file.runtime import GuestRuntime
from drsite.hypervisors.file.vm import FileVm

log = logging.getLogger("drsite.guest")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m drsite.hypervisors.file.guest VMDIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s guest[%(process)d] %(levelname)s %(message)s")
    vm = FileVm.open(Path(args[0]), role="guest")
    for note in vm.recovery_notes:
        log.warning("recovery: %s", note)
    rt = GuestRuntime(vm)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rt.start()
    log.info("running %s (epoch %s)", vm.config.name, vm.epoch)
    while not stop.wait(0.5) and not rt.stopped.is_set():
        pass
    rt.stop()
    log.info("stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
