"""Shared CLI plumbing: the client from options/env, tables, JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from drsite.client.api import VaultClient, VaultConfig
from drsite.core.states import JobState
from drsite.replication.report import Health, ItemState

# exit codes: 0 ok, 1 a job ended badly, else the error's own (``DrsiteError.exit_code``: 2 an
# operator must act, 75 try again later), so scripts can tell them apart
EXIT_OK = 0
EXIT_JOB_FAILED = 1

console = Console()
err_console = Console(stderr=True)

VaultOpt = typer.Option(None, "--vault", envvar="DRSITE_VAULT_URL", help="Vault URL (https://…).")
TokenOpt = typer.Option(None, "--token", envvar="DRSITE_TOKEN", help="API token.")
CaOpt = typer.Option(None, "--ca-file", envvar="DRSITE_CA_FILE", help="The vault's CA certificate.")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")


def client(vault: str | None, token: str | None, ca_file: Path | None) -> VaultClient:
    return VaultClient(VaultConfig.from_env(vault, token, ca_file))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, list | dict):
        return json.dumps(v, separators=(",", ":"))[:60]
    return str(v)


def ago(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    d = time.time() - float(ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


def show(rows: Sequence[dict[str, Any]] | dict[str, Any], columns: Iterable[str], *, title: str,
         json_out: bool) -> None:
    """Print rows as a rich table, or as JSON with ``--json``."""
    if json_out:
        print(json.dumps(rows, indent=1, default=str))
        return
    items = [rows] if isinstance(rows, dict) else list(rows)
    t = Table(title=title)
    cols = list(columns)
    for c in cols:
        t.add_column(c)
    for r in items:
        t.add_row(*[_cell(r, c) for c in cols])
    console.print(t)


def _cell(r: dict[str, Any], col: str) -> str:
    v = r.get(col)
    if col.endswith("_at") or col in ("at", "last_heartbeat", "last_point_time"):
        return ago(v)
    if col == "health":
        colors: dict[str, str] = {Health.NORMAL: "green", Health.WARNING: "yellow",
                                  Health.CRITICAL: "red"}
        color = colors.get(str(v), "white")
        return f"[{color}]{v}[/]"
    if col == "state" and v in (JobState.FAILED, ItemState.CRITICAL):
        return f"[red]{v}[/]"
    if col == "rpo_s" and isinstance(v, int | float):
        return f"{v:.0f}s"
    return fmt(v)
