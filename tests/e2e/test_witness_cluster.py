"""Automatic promotion of the standby vault (issue 14 part 3), real processes: ``drsite up --ha
--witness`` (a vault per site on PostgreSQL streaming replication, the pair's witness, both
agents), then every process of site A's control plane SIGKILLed at once — vault A and every
process of its PostgreSQL — and agent A too. Nobody runs ``drsite vault promote``: vault B
promotes itself within the quiet period (15 s) plus a few seconds, the witness names it, writes
go through B and the secondary agent follows it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from tests.e2e.test_site_disaster_cluster import client, cluster_pids
from tests.hacluster import ha_cluster

from drsite import tlsutil
from drsite.cli.up_cmd import summary
from drsite.up import Cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def ha() -> Iterator[Cluster]:
    with ha_cluster("drsite-witness-", witness=True) as c:
        yield c


def witness_state(c: Cluster) -> dict[str, object]:
    r = httpx.get(c.witness_url + "/witness/state", verify=tlsutil.client_context(c.ca_file),
                  timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


def test_site_a_lost_vault_b_promotes_itself(ha: Cluster) -> None:
    c = ha
    states = c.vault_states()
    said = summary(c, states, data=c.root, detach=True)
    assert f"witness {c.witness_url}  (pid {c.pids['witness']}; the standby promotes itself " \
           f"{c.auto_promote_after:g} s after" in said, said
    old = states[c.vault_url]
    assert old is not None and old["role"] == "active"
    assert states[c.vault_b_url] == {**(states[c.vault_b_url] or {}), "role": "standby"}
    assert witness_state(c)["holder"] == c.vault_url
    with client(c, c.vault_url) as ca:
        ca.create_site("before", "written through A")

    victims = [c.pids["vault"], *cluster_pids(c.pg("primary")), c.pids["agent-primary"]]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    took = None
    while time.monotonic() - t0 < c.auto_promote_after + 30:
        st = c.vault_states().get(c.vault_b_url)
        if st is not None and st.get("role") == "active":
            took = time.monotonic() - t0
            break
        time.sleep(0.5)
    # the quiet period, plus at most one lease (10 s: the candidacy) and a few seconds
    assert took is not None, (c.root / "logs" / "vault-secondary.log").read_text()[-4000:]
    assert c.auto_promote_after - 1 <= took <= c.auto_promote_after + 10 + 8, took
    print(f"\nvault B promoted itself {took:.1f} s after site A was killed")
    st_b = c.vault_states()[c.vault_b_url]
    assert st_b is not None and st_b["epoch"] > old["epoch"] and st_b["timeline"] > old["timeline"]
    w = witness_state(c)
    assert w["holder"] == c.vault_b_url and w["epoch"] == st_b["epoch"], w
    assert c.active_url() == c.vault_b_url
    with client(c, c.vault_b_url) as cb:
        cb.create_site("after", "written through B")
        assert {"before", "after"} <= {s["name"] for s in cb.sites()}

        def secondary_up() -> bool:
            return any(h["name"] == "secondary-host" and h["up"] for h in cb.hosts())

        deadline = time.monotonic() + 60
        while not secondary_up():
            assert time.monotonic() < deadline, "the secondary agent did not follow vault B"
            time.sleep(0.5)
    log_b = (c.root / "logs" / "vault-secondary.log").read_text()
    assert "the witness granted this vault epoch" in log_b and "Traceback" not in log_b
