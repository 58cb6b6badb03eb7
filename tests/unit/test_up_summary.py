"""``drsite up``'s summary: with a pair (``--ha``) each vault's role is the one it answers with
(``Cluster.vault_states``), never assumed — it used to call vault B "standby" whatever it was,
also on an ``up`` after a promotion. The real pair: tests/e2e/test_site_disaster_cluster.py
checks the summary after ``up --ha`` and after the promotion and rejoin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drsite.cli.up_cmd import summary
from drsite.up import Cluster

A, B = "https://127.0.0.1:1001", "https://127.0.0.1:1002"
PIDS = {"vault": 11, "vault-secondary": 12, "agent-primary": 13, "agent-secondary": 14}


def pair(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path, vault_url=A, ha=True, vault_b_url=B, admin_token="t",
                   pids=dict(PIDS), pg_ports={"primary": 5001, "secondary": 5002})


def text(c: Cluster, states: dict[str, dict[str, Any] | None]) -> str:
    return summary(c, states, data=c.root, detach=True)


ACTIVE = {"role": "active", "timeline": 1, "epoch": 1}
STANDBY = {"role": "standby", "timeline": None, "epoch": 1}


def test_a_fresh_pair_a_active_b_standby(tmp_path: Path) -> None:
    out = text(pair(tmp_path), {A: ACTIVE, B: STANDBY})
    assert f"vault A {A}  (pid 11, active)\n" in out
    assert f"vault B {B}  (pid 12, standby; 'drsite vault promote --vault {B}' if the active " \
           "site is lost)\n" in out
    assert f"Dashboard: {A}/ui" in out


@pytest.mark.parametrize(("a", "a_says"), [
    ({"role": "fenced", "timeline": 1, "epoch": 1},
     "fenced: its peer was promoted; 'drsite vault rejoin' makes it a standby"),
    (STANDBY, f"standby; 'drsite vault promote --vault {A}' if the active site is lost"),
    (None, "not answering"),
])
def test_after_a_promotion_b_is_shown_active(tmp_path: Path, a: dict[str, Any] | None,
                                             a_says: str) -> None:
    out = text(pair(tmp_path), {A: a, B: {"role": "active", "timeline": 2, "epoch": 2}})
    assert f"vault A {A}  (pid 11, {a_says})\n" in out
    assert f"vault B {B}  (pid 12, active)\n" in out
    assert "standby" not in out.split(f"vault B {B}")[1].split("\n")[0]
    assert f"Dashboard: {B}/ui" in out   # the vault that takes writes


def test_no_vault_answering_says_so_and_names_a_for_the_dashboard(tmp_path: Path) -> None:
    out = text(pair(tmp_path), {A: None, B: None})
    assert f"vault A {A}  (pid 11, not answering)" in out
    assert f"vault B {B}  (pid 12, not answering)" in out
    assert f"Dashboard: {A}/ui" in out


def test_without_a_pair_one_vault_line_and_nothing_asked(tmp_path: Path) -> None:
    c = Cluster(tmp_path, vault_url=A, pids=dict(PIDS))
    assert c.vault_states() == {}   # not asked: no vault is contacted without a pair
    out = text(c, {})
    assert out.startswith(f"vault   {A}  (pid 11)\nagents  ")
    assert "vault B" not in out and "pg " not in out


def test_a_pair_with_a_witness_names_it_and_the_promotion_delay(tmp_path: Path) -> None:
    c = pair(tmp_path)
    c.witness, c.witness_port = True, 1003
    c.pids["witness"] = 15
    out = text(c, {A: ACTIVE, B: STANDBY})
    assert "witness https://127.0.0.1:1003  (pid 15; the standby promotes itself 15 s after " \
           "the active site went silent, if the witness agrees)" in out
    assert "witness https" not in text(pair(tmp_path), {A: ACTIVE, B: STANDBY})
