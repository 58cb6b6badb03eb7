"""``drsite groups create --consistent``, ``groups update``, ``groups points`` against a real
vault over HTTPS: the flags reach the API, bad input is the codec's error (exit code 2 from ``drsite``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drsite import tlsutil
from drsite.cli.main import app
from drsite.core.errors import InvalidInput, NotFound
from drsite.vault.app import create_app
from drsite.vault.context import Vault
from drsite.vault.settings import VaultSettings


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Vault]]:
    settings = VaultSettings(data_dir=tmp_path / "vault", loop_interval=0.05)
    application = create_app(settings)
    vault: Vault = application.state.vault
    handle = tlsutil.start_in_thread(application, host="127.0.0.1", port=0,
                                     certfile=vault.tls.cert, keyfile=vault.tls.key,
                                     cafile=vault.tls.ca, client_cert="optional")
    try:
        yield handle.url, vault
    finally:
        handle.stop()
        vault.close()


def test_consistent_group_through_the_cli(served: tuple[str, Vault]) -> None:
    url, vault = served
    admin = (vault.settings.data_dir / "admin.token").read_text().strip()
    opts = ["--vault", url, "--token", admin, "--ca-file", str(vault.tls.ca)]
    run = CliRunner().invoke
    for site in ("prim", "sec"):
        assert run(app, ["sites", "create", site, *opts]).exit_code == 0
    assert run(app, ["policies", "create", "p1", "--frequency", "30", *opts]).exit_code == 0
    r = run(app, ["groups", "create", "cg", "--site", "prim", "--target-site", "sec",
                  "--policy", "p1", "--consistent", "--barrier-timeout-ms", "300", "--json",
                  *opts])
    assert r.exit_code == 0, r.output
    made = json.loads(r.output)
    assert made["consistent"] is True and made["barrier_timeout_ms"] == 300
    # errors leave the Typer app as the codec's classes (``main()`` maps them to exit codes)
    r = run(app, ["groups", "update", "cg", "--barrier-timeout-ms", "10", *opts])
    assert isinstance(r.exception, InvalidInput) and r.exception.exit_code == 2
    assert "barrier_timeout_ms" in r.exception.message
    r = run(app, ["groups", "update", "cg", "--no-consistent", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["consistent"] is False, r.output
    r = run(app, ["groups", "points", "cg", "--all", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output) == [], r.output
    r = run(app, ["groups", "points", "nope", *opts])
    assert isinstance(r.exception, NotFound) and r.exception.exit_code == 2


def test_sync_policy_through_the_cli(served: tuple[str, Vault]) -> None:
    url, vault = served
    admin = (vault.settings.data_dir / "admin.token").read_text().strip()
    opts = ["--vault", url, "--token", admin, "--ca-file", str(vault.tls.ca)]
    run = CliRunner().invoke
    r = run(app, ["policies", "create", "zero", "--mode", "sync", "--sync-budget-ms", "20",
                  "--json", *opts])
    assert r.exit_code == 0, r.output
    made = json.loads(r.output)
    assert made["mode"] == "sync" and made["sync_budget_ms"] == 20
    r = run(app, ["policies", "update", "zero", "--sync-budget-ms", "80", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["sync_budget_ms"] == 80, r.output
    assert json.loads(r.output)["mode"] == "sync"  # kept
    r = run(app, ["policies", "update", "zero", "--mode", "semi", *opts])
    assert isinstance(r.exception, InvalidInput) and "mode" in r.exception.message


def test_compression_modes_through_the_cli(served: tuple[str, Vault]) -> None:
    """``--compression auto|zstd|off`` (default auto) reaches the API; a bad value is a clear
    error before any request; the older ``--no-compression`` still means off."""
    url, vault = served
    admin = (vault.settings.data_dir / "admin.token").read_text().strip()
    opts = ["--vault", url, "--token", admin, "--ca-file", str(vault.tls.ca)]
    run = CliRunner().invoke
    r = run(app, ["policies", "create", "c1", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["compression"] == "auto", r.output
    r = run(app, ["policies", "create", "c2", "--compression", "zstd", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["compression"] == "zstd", r.output
    r = run(app, ["policies", "create", "c3", "--no-compression", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["compression"] == "off", r.output
    r = run(app, ["policies", "update", "c2", "--compression", "off", "--json", *opts])
    assert r.exit_code == 0 and json.loads(r.output)["compression"] == "off", r.output
    assert json.loads(r.output)["frequency_s"] == 300  # the others kept
    r = run(app, ["policies", "update", "c2", "--compression", "gzip", *opts])
    assert isinstance(r.exception, InvalidInput)
    assert "compression must be 'auto', 'zstd' or 'off'" in r.exception.message
    r = run(app, ["policies", "create", "--help"])
    assert "auto" in r.output and "zstd" in r.output and "--no-compression" not in r.output
