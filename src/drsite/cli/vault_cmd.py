"""``drsite vault …``: run the vault, and its local admin helpers."""

from __future__ import annotations

from pathlib import Path

import typer

from drsite.cli.common import Conn, JsonOpt, client, show, vault_command

MasterKeyOpt = typer.Option(None, "--master-key-file", envvar="DRSITE_MASTER_KEY_FILE",
                            help="File holding the master key that seals the vault's secrets "
                                 "(default: DATA/master.key; mode 0600).")

vault = typer.Typer(help="The vault: control plane (API, database, jobs, scheduler, health).",
                    no_args_is_help=True)


@vault.command("serve")
def serve(
    data: Path = typer.Option(Path("drsite-vault"), help="Data directory (CA, DB, admin token)."),
    listen: str = typer.Option("127.0.0.1:8443", help="HOST:PORT to listen on (HTTPS)."),
    db: str | None = typer.Option(None, help="Database URL (default: SQLite in the data "
                                             "directory; postgresql+psycopg://… for PostgreSQL)."),
    heartbeat_interval: float = typer.Option(2.0, help="Seconds between agent heartbeats."),
    master_key_file: Path | None = MasterKeyOpt,
    workers: int = typer.Option(1, min=1, max=64,
                                help="API worker processes sharing the listen address (more "
                                     "than one needs PostgreSQL). One process of all those on "
                                     "the database is the controller (jobs, scheduler, health)."),
    controller_lease: float = typer.Option(10.0, min=1.0, max=600.0,
                                           help="Seconds a controller that stopped renewing its "
                                                "lease keeps it before another vault process "
                                                "takes over."),
    url: str | None = typer.Option(None, help="URL agents and operators reach this vault at "
                                              "(default https://LISTEN); a standby vault names "
                                              "the active one's in its refusals."),
    peer: str | None = typer.Option(None, help="URL of the other vault of a pair: while "
                                               "active, this vault writes only as long as that "
                                               "one was not promoted past it (fenced otherwise, "
                                               "until 'drsite vault rejoin')."),
    witness: str | None = typer.Option(None, help="URL of the pair's witness ('drsite vault "
                                                  "witness'): while active, this vault writes "
                                                  "only while it reaches its peer or the "
                                                  "witness within the controller lease."),
    witness_token_file: Path | None = typer.Option(None, help="The witness's token file "
                                                              "(its DIR/witness.token)."),
    auto_promote_after: float | None = typer.Option(
        None, help="Seconds (above --controller-lease) after which this vault, a standby whose "
                   "peer stopped answering, claims at the witness and promotes itself if "
                   "granted. Default: never (manual 'drsite vault promote')."),
) -> None:
    """Run the vault in the foreground (Ctrl-C or SIGTERM stops it cleanly), with the web
    dashboard at /ui. On a hot-standby PostgreSQL database it runs as the standby vault of a
    pair: reads only, until 'drsite vault promote'."""
    from drsite.vault.server import run_vault
    from drsite.web.routes import router as dashboard

    run_vault(data, listen=listen, db_url=db, heartbeat_interval=heartbeat_interval,
              master_key_file=master_key_file, routers=[dashboard], workers=workers,
              lease_s=controller_lease, url=url, peer_url=peer, witness_url=witness,
              witness_token_file=witness_token_file, auto_promote_after=auto_promote_after)


@vault.command("witness")
def witness(
    data: Path = typer.Option(Path("drsite-witness"), help="The witness's data directory (its "
                                                          "record, token and certificate)."),
    listen: str = typer.Option("127.0.0.1:8444", help="HOST:PORT to listen on (HTTPS)."),
    ca_data: Path | None = typer.Option(None, help="A vault's data directory (on this machine), "
                                                   "at first start only: the pair's CA issues "
                                                   "the witness's server certificate."),
) -> None:
    """Run the witness of a vault pair (a third place): it records which vault holds the pair
    at which epoch, takes the active vault's renewals and grants a standby's claim only when
    the holder has been silent long enough (see docs/control-plane.md, "Witness"). Vaults
    reach it with 'vault serve --witness URL --witness-token-file DIR/witness.token'."""
    from drsite.vault.server import parse_listen
    from drsite.vault.witness import run_witness

    host, port = parse_listen(listen)
    run_witness(data, host=host, port=port, ca_data=ca_data)


@vault_command(vault, "state")
def state(
    conn: Conn,
    data: Path | None = typer.Option(None, help="The vault's data directory (its CA)."),
) -> None:
    """Show a vault's role in a pair: active, standby or fenced, with its database's timeline
    and the controller lease's epoch (no token needed)."""
    ca_file = conn.ca_file
    if ca_file is None and data is not None:
        ca_file = data / "pki" / "ca.pem"
    with client(conn.vault, None, ca_file) as c:
        res = c.vault_state()
    if conn.json:
        show(res, [], title="", json_out=True)
    else:
        peer = f", peer {res['peer_url']}" if res.get("peer_url") else ""
        typer.echo(f"{res['role']} (timeline {res['timeline']}, epoch {res['epoch']}){peer}")


@vault_command(vault, "promote")
def promote(
    conn: Conn,
    data: Path | None = typer.Option(None, help="The standby vault's data directory (its CA, "
                                                "its admin token)."),
    force: bool = typer.Option(False, "--force", help="Promote even while the active vault "
                                                      "answers (a planned switchover: it is "
                                                      "fenced, its last writes are lost)."),
) -> None:
    """Make the standby vault at --vault the active one, when the active vault's site is lost:
    its PostgreSQL is promoted, it takes the controller lease with a new epoch (the old active
    vault, if it comes back, is fenced and refuses writes until 'drsite vault rejoin') and runs
    the jobs. Run it only when the other site is down or cut off (with a witness, 'vault serve
    --auto-promote-after' does it by itself under the witness's rule)."""
    ca_file = conn.ca_file
    if ca_file is None and data is not None:
        ca_file = data / "pki" / "ca.pem"
    with client(conn.vault, _admin_token(data, conn.token), ca_file) as c:
        res = c.promote(force=force)
    if conn.json:
        show(res, [], title="", json_out=True)
    else:
        typer.echo(f"vault promoted: role {res['role']}, controller epoch {res['epoch']}")


@vault.command("rotate-master-key")
def rotate_master_key(
    data: Path = typer.Option(Path("drsite-vault"), help="The vault's data directory."),
    db: str | None = typer.Option(None, help="Database URL (default: SQLite in the data "
                                             "directory)."),
    master_key_file: Path | None = MasterKeyOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Seal every secret in the vault's database under a new master key (stop the vault
    first). Interrupted, it leaves every secret readable; run it again to finish."""
    from drsite.vault.masterkey import rotate_master_key as rotate

    report = rotate(data, db_url=db, master_key_file=master_key_file)
    if json_out:
        show(report, [], title="", json_out=True)
    else:
        typer.echo(f"master key rotated: {report['old_key']} -> {report['new_key']} "
                   f"({report['values_resealed']} value(s) sealed again)")


def _admin_token(data: Path | None, token: str | None) -> str | None:
    if token:
        return token
    if data is not None and (data / "admin.token").exists():
        return (data / "admin.token").read_text().strip()
    return None


@vault_command(vault, "registration-key")
def registration_key(
    conn: Conn,
    site: str = typer.Option(..., help="Site the registering host joins."),
    ttl: int = typer.Option(3600, min=60, max=7 * 86400, help="Seconds until the key expires."),
    data: Path | None = typer.Option(None, help="Vault data dir (reads its admin token and CA; "
                                                "on the vault's machine)."),
) -> None:
    """Print a one-time registration key for a host of the site given by --site (admin;
    expires after --ttl). On the host: 'drsite agent register --vault URL --key KEY --ca-file
    CA'."""
    ca_file = conn.ca_file
    if ca_file is None and data is not None:
        ca_file = data / "pki" / "ca.pem"
    with client(conn.vault, _admin_token(data, conn.token), ca_file) as c:
        res = c.registration_key(site, ttl)
        if conn.json:
            show(res, [], title="", json_out=True)
        else:
            typer.echo(res["key"])


@vault.command("backup")
def backup(
    out: Path = typer.Option(..., "--out", "-o", help="Backup file to write (a tar, 0600)."),
    data: Path = typer.Option(Path("drsite-vault"), help="The vault's data directory."),
    db: str | None = typer.Option(None, help="Database URL (default: SQLite in the data "
                                             "directory; PostgreSQL: use pg_dump)."),
    master_key_file: Path | None = MasterKeyOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Back up the vault while it runs (deployments without HA): a consistent snapshot of its
    database (secrets stay sealed), its CA and server certificate (private keys sealed under
    the master key) and admin token. The master key itself is never in the backup: keep its
    file apart; 'drsite vault restore' needs it."""
    from drsite.vault.backup import backup as run_backup

    report = run_backup(data, out, db_url=db, master_key_file=master_key_file).to_dict()
    if json_out:
        show(report, [], title="", json_out=True)
    else:
        typer.echo(f"backup written to {report['path']} ({report['bytes']} bytes, "
                   f"{report['seconds']:.2f} s); its secrets need master key "
                   f"{report['master_key_id']} to restore — keep that key file apart")


@vault.command("restore")
def restore(
    source: Path = typer.Option(..., "--from", help="Backup file from 'drsite vault backup'."),
    data: Path = typer.Option(..., help="Data directory to restore into (new or empty)."),
    master_key_file: Path = typer.Option(..., "--master-key-file", envvar="DRSITE_MASTER_KEY_FILE",
                                         help="The master key file the backed-up vault used "
                                              "(written as DATA/master.key, 0600)."),
    force: bool = typer.Option(False, "--force", help="Replace a stopped vault in --data (it is "
                                                      "renamed aside, not deleted)."),
    json_out: bool = JsonOpt,
) -> None:
    """Restore a vault backup into a data directory, verified before it is put in place; then
    start it with 'drsite vault serve --data DIR'. Refused over a running vault."""
    from drsite.vault.backup import restore as run_restore

    report = run_restore(source, data, master_key_file=master_key_file, force=force)
    if json_out:
        show(report, [], title="", json_out=True)
    else:
        aside = f"; the vault it replaced is in {report['replaced']}" if report["replaced"] else ""
        typer.echo(f"restored into {report['data_dir']} (master key {report['master_key_id']})"
                   f"{aside}; start it with: drsite vault serve --data {report['data_dir']}")


@vault.command("rejoin")
def rejoin(
    data: Path = typer.Option(..., help="The old active vault's data directory (stopped)."),
    pg: Path | None = typer.Option(None, help="Its PostgreSQL cluster directory, when drsite "
                                              "runs it ('drsite up --ha': DIR/pg/SITE): "
                                              "rewound onto the active one's (pg_rewind, else "
                                              "a fresh base backup) and started as its hot "
                                              "standby."),
    pg_port: int = typer.Option(5432, help="That cluster's port."),
    primary_port: int = typer.Option(5433, help="The active vault's PostgreSQL port."),
    slot: str = typer.Option("drsite_standby", help="Replication slot on the active one."),
    db: str | None = typer.Option(None, help="Database URL of this vault (checked to be a "
                                             "hot standby before the fence is lifted)."),
    json_out: bool = JsonOpt,
) -> None:
    """Make a fenced old active vault the standby of the active one: its database becomes a
    hot standby of the active vault's (with --pg: done here; else do it first with pg_rewind
    or a base backup), then the fence marker is removed. Start it again with 'drsite vault
    serve --peer ACTIVE_URL': it serves reads and follows the active one."""
    from drsite.vault.rejoin import rejoin as run_rejoin

    report = run_rejoin(data, pg=pg, pg_port=pg_port, primary_port=primary_port, slot=slot,
                        db_url=db)
    if json_out:
        show(report, [], title="", json_out=True)
    else:
        typer.echo(f"rejoined as a standby ({report['how']}); start it with: drsite vault serve "
                   f"--data {data} --peer ACTIVE_URL")
