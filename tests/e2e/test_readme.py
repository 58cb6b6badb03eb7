"""README's "Using it", run as written (``conftest.readme``: real processes — ``drsite up
--detach``, then every command of the block in a shell with ``set -e``; its last line, ``drsite
down``, at the end of the session, which must leave no process behind).

Then what the commands did is checked through the API: the VM was created on the primary
through its agent, protected, tested, failed over, failed back to the original site, failed
over again (unplanned, the old bug after a failback) and re-protected — one VM, one lineage of
four items, one history — and ``drsite down``/``up`` stop and start its VMs.
"""

from __future__ import annotations

import pytest
from tests.e2e.conftest import ReadmeRun

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)
def test_the_readme_commands_work_as_written(readme: ReadmeRun) -> None:
    out = readme.output
    assert readme.rc == 0, out[-4000:]
    print(f"README's commands ran in {readme.seconds:.0f} s")
    for seen in ("drsite is up", "CreateVm app-01", "EnableProtection app-01",
                 "no data lost", "re-protected: item", "Failback app-01",
                 "UnplannedFailover app-01", "plan changes (dry run: nothing applied)",
                 "RecoveryPlan shop", "open alerts", "StopVm app-01"):
        assert seen in out, seen
    with readme.cluster.client() as c:
        items = c.items(all="true")
        hist = c.item_history(items[0]["id"])
        legs = [(x["source_site"], x["target_site"], x["protection"]) for x in hist["items"]]
        # newest first: re-protected after the unplanned failover, the forward leg that
        # failed over, the reverse leg failed back, the first item
        assert legs == [("secondary", "primary", "protected"),
                        ("primary", "secondary", "reprotected"),
                        ("secondary", "primary", "reprotected"),
                        ("primary", "secondary", "reprotected")], legs
        assert {x["group"] for x in hist["items"]} == {"web", "web-reverse"}  # no growth
        kinds = [f["kind"] for f in hist["failovers"]]
        assert kinds.count("test") >= 2 and "unplanned" in kinds and kinds.count("planned") == 2
        assert all(j["state"] == "succeeded" for j in hist["jobs"]), hist["jobs"]
        vms = [v for v in c.vms(all_vms=True) if v["name"] == "app-01"]
        assert sorted(v["site"] for v in vms if v["present"]) == ["primary", "secondary"]
        assert all(v["power"] == "stopped" for v in vms if v["present"])
        assert [g["name"] for g in c.groups()] == ["web", "web-reverse"]
        assert {(m["source_site"], m["source_network"]) for m in c.network_mappings()} == {
            ("primary", "prod"), ("secondary", "dr")}  # the one back, made at re-protect
