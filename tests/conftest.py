"""Shared pytest plugins: ``tests.pg`` provides the ``pg_server`` / ``pg_url`` fixtures (a
throw-away PostgreSQL cluster; see tests/pg.py)."""

import gc
import json
from collections import Counter
from pathlib import Path

import pytest

pytest_plugins = ["tests.pg"]


# seconds each group (a module, or "readme") took in a full run (tests/group_seconds.py writes
# it from a run's JUnit XML): the groups are handed to the workers longest first, so a 4-minute
# module does not start last and set the suite's wall time alone
GROUP_SECONDS = Path(__file__).with_name("group_seconds.json")
UNKNOWN_TEST_SECONDS = 2.0  # a group the table does not know yet: this much per test


def group_of(module: str, readme_modules: set[str]) -> str:
    return "readme" if module in readme_modules else module


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what the imports and the collection made (about 260,000 objects, none garbage)
    out of the garbage collector's reach, in every worker: its full collections, which hold
    the GIL throughout, then scan only what the tests make. On a loaded 2-core CI box a full
    collection of the whole heap stalled a worker for seconds — past PostgreSQL's
    idle-in-transaction timeout (5 s) in the middle of a test's transaction (the vault does the
    same at start-up: ``server.settle_heap``)."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``), a module's tests run in one worker, so its
    module-scoped cluster starts once; the modules that use the README's cluster (a session
    fixture) share one worker, so it starts once too."""
    module = {item: item.nodeid.split("::")[0] for item in items}
    readme = {module[item] for item in items if "readme" in getattr(item, "fixturenames", ())}
    group = {item: group_of(module[item], readme) for item in items}
    known: dict[str, float] = json.loads(GROUP_SECONDS.read_text()) if GROUP_SECONDS.exists() else {}
    tests = Counter(group.values())
    seconds = {g: known.get(g, UNKNOWN_TEST_SECONDS * n) for g, n in tests.items()}
    # xdist hands out the groups in this order when run with --no-loadscope-reorder (the
    # Makefile's test target: its default reorders them by their number of tests)
    items.sort(key=lambda item: -seconds[group[item]])
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the cloud test servers this process started (Azurite, SeaweedFS, moto): an xdist
    worker may end with ``os._exit``, which skips their ``atexit`` stop, and they outlived the
    run."""
    from drsite.store.testing.servers import stop_shared_servers

    stop_shared_servers()
