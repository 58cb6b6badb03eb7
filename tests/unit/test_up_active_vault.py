"""``drsite up``'s choice of the vault its admin writes go to (``Cluster.active_url``): the only
vault, or the one of a pair whose ``/vault/state`` says active. The real pair is exercised by
tests/e2e/test_site_disaster_cluster.py (the store role granted through vault B after its
promotion); here the vaults' answers are played, to cover every case."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import drsite.up as up_mod
from drsite.client.api import VaultConfig
from drsite.core.errors import NetworkError, TransientError
from drsite.up import Cluster

A, B = "https://127.0.0.1:1001", "https://127.0.0.1:1002"


def pair(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path, vault_url=A, ha=True, vault_b_url=B, admin_token="t")


def play(monkeypatch: pytest.MonkeyPatch, states: dict[str, dict[str, Any] | None]) -> list[str]:
    """Vaults answering ``GET /vault/state`` with ``states[url]`` (None: unreachable); returns
    the URLs asked, in order."""
    asked: list[str] = []

    class FakeClient:
        def __init__(self, cfg: VaultConfig) -> None:
            self.url = cfg.url

        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                     tb: TracebackType | None) -> None:
            return None

        def vault_state(self) -> dict[str, Any]:
            asked.append(self.url)
            st = states[self.url]
            if st is None:
                raise NetworkError(f"cannot reach {self.url}")
            return st

    monkeypatch.setattr(up_mod, "VaultClient", FakeClient)
    return asked


def test_without_a_pair_the_one_vault_is_not_even_asked(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    asked = play(monkeypatch, {})
    assert Cluster(tmp_path, vault_url=A).active_url() == A
    assert asked == []


@pytest.mark.parametrize(("a", "b", "want"), [
    ({"role": "active", "timeline": 1, "epoch": 1}, {"role": "standby"}, A),
    # after a promotion: A fenced, B active on a new timeline
    ({"role": "fenced", "timeline": None, "epoch": 1}, {"role": "active", "timeline": 2,
                                                        "epoch": 2}, B),
    # site A unreachable
    (None, {"role": "active", "timeline": 2, "epoch": 2}, B),
    # both say active for a moment (a forced promotion): the newest timeline and epoch
    ({"role": "active", "timeline": 1, "epoch": 5}, {"role": "active", "timeline": 2,
                                                      "epoch": 1}, B),
    ({"role": "active", "timeline": 2, "epoch": 3}, {"role": "active", "timeline": 2,
                                                      "epoch": 2}, A),
])
def test_the_pairs_active_vault_is_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          a: dict[str, Any] | None, b: dict[str, Any] | None,
                                          want: str) -> None:
    asked = play(monkeypatch, {A: a, B: b})
    assert pair(tmp_path).active_url() == want
    assert asked == [A, B]


@pytest.mark.parametrize("b", [None, {"role": "standby", "timeline": None, "epoch": 1}])
def test_no_active_vault_is_a_transient_error_naming_promote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, b: dict[str, Any] | None) -> None:
    play(monkeypatch, {A: {"role": "fenced", "timeline": None, "epoch": 1}, B: b})
    with pytest.raises(TransientError) as e:
        pair(tmp_path).active_url()
    assert A in e.value.message and B in e.value.message
    assert "drsite vault promote" in e.value.hint


def test_drsite_env_points_at_the_active_vault_of_a_pair(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """After a promotion, ``drsite env`` names vault B (it named vault A whatever happened);
    with neither answering, vault A."""
    c = pair(tmp_path)
    play(monkeypatch, {A: {"role": "fenced", "timeline": 1, "epoch": 1},
                       B: {"role": "active", "timeline": 2, "epoch": 2}})
    assert c.env_lines()[0] == f"export DRSITE_VAULT_URL={B}"
    play(monkeypatch, {A: None, B: None})
    assert c.env_lines()[0] == f"export DRSITE_VAULT_URL={A}"

