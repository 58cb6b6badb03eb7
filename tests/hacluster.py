"""A vault pair deployment for end-to-end tests: ``drsite up --ha`` (each vault on its own
PostgreSQL, site B's a streaming standby) in a temp dir that PostgreSQL's user can reach; on
exit every process is stopped, every file VM powered off and the directory removed."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drsite.hypervisors.file.driver import FileHypervisor
from drsite.up import Cluster, down, up
from tests.pg import require_pg


@contextlib.contextmanager
def ha_cluster(prefix: str, **up_kwargs: Any) -> Iterator[Cluster]:
    """Skips the test unless PostgreSQL tests run here (:func:`tests.pg.require_pg`)."""
    require_pg()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)  # PostgreSQL (user postgres when run as root) must reach its directories
    c: Cluster | None = None
    try:
        c = up(base / "c", ha=True, **up_kwargs)
        yield c
    finally:
        if c is not None:
            down(c)
            for site in ("primary", "secondary"):
                h = FileHypervisor(c.root / site / "vms")
                for vm in h.list_vms():
                    with contextlib.suppress(Exception):
                        h.power_off(vm.vm_id, force=True)
        shutil.rmtree(base, ignore_errors=True)
