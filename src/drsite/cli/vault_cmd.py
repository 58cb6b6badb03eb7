"""``drsite vault …``: run the vault, and its local admin helpers."""

from __future__ import annotations

from pathlib import Path

import typer

from drsite.cli.common import CaOpt, JsonOpt, VaultOpt, client, show

vault = typer.Typer(help="The vault: control plane (API, database, jobs, scheduler, health).",
                    no_args_is_help=True)


@vault.command("serve")
def serve(
    data: Path = typer.Option(Path("drsite-vault"), help="Data directory (CA, DB, admin token)."),
    listen: str = typer.Option("127.0.0.1:8443", help="HOST:PORT to listen on (HTTPS)."),
    db: str | None = typer.Option(None, help="Database URL (default: SQLite in the data "
                                             "directory; postgresql+psycopg://… for PostgreSQL)."),
    heartbeat_interval: float = typer.Option(2.0, help="Seconds between agent heartbeats."),
) -> None:
    """Run the vault in the foreground (Ctrl-C or SIGTERM stops it cleanly), with the web
    dashboard at /ui."""
    from drsite.vault.server import run_vault
    from drsite.web.routes import router as dashboard

    run_vault(data, listen=listen, db_url=db, heartbeat_interval=heartbeat_interval,
              routers=[dashboard])


def _admin_token(data: Path | None, token: str | None) -> str | None:
    if token:
        return token
    if data is not None and (data / "admin.token").exists():
        return (data / "admin.token").read_text().strip()
    return None


@vault.command("registration-key")
def registration_key(
    site: str = typer.Option(..., help="Site the registering host joins."),
    ttl: int = typer.Option(3600, min=60, max=7 * 86400, help="Seconds until the key expires."),
    data: Path | None = typer.Option(None, help="Vault data dir (reads its admin token)."),
    vault: str | None = VaultOpt,
    token: str | None = typer.Option(None, "--token", envvar="DRSITE_TOKEN"),
    ca_file: Path | None = CaOpt, json_out: bool = JsonOpt,
) -> None:
    """Print a one-time registration key for a host of SITE (expires after --ttl)."""
    if ca_file is None and data is not None:
        ca_file = data / "pki" / "ca.pem"
    with client(vault, _admin_token(data, token), ca_file) as c:
        res = c.registration_key(site, ttl)
        if json_out:
            show(res, [], title="", json_out=True)
        else:
            typer.echo(res["key"])
