"""Shared pytest plugins: ``tests.pg`` provides the ``pg_server`` / ``pg_url`` fixtures (a
throw-away PostgreSQL cluster; see tests/pg.py)."""

import pytest

pytest_plugins = ["tests.pg"]


LONGEST = frozenset(f"tests/e2e/test_{m}.py" for m in (
    "groups_cluster", "crash_campaign", "failover_cluster", "liveness_cluster",
    "scrub_drill_cluster", "site_disaster_cluster", "breakglass_cluster"))


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``), a module's tests run in one worker, so its
    module-scoped cluster starts once; the modules that use the README's cluster (a session
    fixture) share one worker, so it starts once too."""
    # the longest modules start first (xdist hands groups out in this order): a 3-minute module
    # started last would set the suite's wall time alone
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONGEST)
    module = {item: item.nodeid.split("::")[0] for item in items}
    readme = {module[item] for item in items if "readme" in getattr(item, "fixturenames", ())}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("readme" if module[item] in readme
                                                else module[item]))
