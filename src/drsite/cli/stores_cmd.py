"""``drsite store``: cloud recovery stores (S3, Azure Blob) in the vault. Thin: options → the
client → a table or ``--json``.

Credentials are never taken from the command line (argv is visible to every user of the host
and lands in shell history): they come from ``--secret-file`` (a JSON object, ``-`` = stdin)
or from the usual environment variables — S3: ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``; Azure: ``AZURE_STORAGE_KEY``, ``AZURE_STORAGE_SAS_TOKEN`` or
``AZURE_STORAGE_CONNECTION_STRING``. The vault never returns them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from drsite.cli.common import Conn, SortOpt, WhereOpt, console, select_rows, show, vault_command
from drsite.core.errors import InvalidInput

store = typer.Typer(help="Cloud recovery stores (S3, Azure Blob); admin to change.",
                    no_args_is_help=True)

ENV_SECRETS = {
    "s3": {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY"},
    "azure": {"account_key": "AZURE_STORAGE_KEY", "sas_token": "AZURE_STORAGE_SAS_TOKEN",
              "connection_string": "AZURE_STORAGE_CONNECTION_STRING"},
}
COLUMNS = ["name", "kind", "config", "encrypted", "active_key_id", "groups"]

SecretFileOpt = typer.Option(None, "--secret-file",
                             help="JSON object with the credentials (S3: access_key, secret_key; "
                                  "Azure: one of account_key, sas_token, connection_string); "
                                  "'-' reads stdin. Default: environment variables.")


def read_secret(kind: str, secret_file: Path | None) -> dict[str, str]:
    """The credentials from ``secret_file`` (JSON object; ``-`` = stdin) or the environment."""
    if secret_file is not None:
        try:
            text = sys.stdin.read() if str(secret_file) == "-" else secret_file.read_text()
            data = json.loads(text)
        except OSError as e:
            raise InvalidInput(f"cannot read the secret file {secret_file}: "
                               f"{e.strerror or type(e).__name__}") from None
        except ValueError:
            raise InvalidInput(f"the secret file {secret_file} is not a JSON object") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise InvalidInput(f"the secret file {secret_file} must be a JSON object of strings")
        return {str(k): v for k, v in data.items()}
    got = {field: os.environ[var] for field, var in ENV_SECRETS.get(kind, {}).items()
           if os.environ.get(var)}
    if not got:
        names = ", ".join(ENV_SECRETS.get(kind, {}).values())
        raise InvalidInput(f"no credentials for the {kind} store",
                           hint=f"Pass --secret-file FILE or set {names}.")
    return got


def _config(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@vault_command(store, "create")
def store_create(
    conn: Conn,
    name: str,
    kind: str = typer.Option(..., help="s3 or azure."),
    bucket: str | None = typer.Option(None, help="S3 bucket."),
    endpoint_url: str | None = typer.Option(None, help="S3 endpoint (omit for AWS)."),
    region: str | None = typer.Option(None, help="S3 region (us-east-1)."),
    container: str | None = typer.Option(None, help="Azure container."),
    account_url: str | None = typer.Option(None, help="Azure account URL."),
    account_name: str | None = typer.Option(None, help="Azure account name (default: from the URL)."),
    prefix: str | None = typer.Option(None, help="Key prefix inside the bucket/container."),
    max_in_flight: int | None = typer.Option(None, help="Requests in flight at most (8)."),
    bandwidth_limit: int | None = typer.Option(None, help="Bytes/s cap for this store."),
    encryption: bool = typer.Option(True, help="Encrypt objects with a vault-generated AES-256 key."),
    secret_file: Path | None = SecretFileOpt,
) -> None:
    """Create a cloud recovery store (the vault generates its encryption key)."""
    config = _config(bucket=bucket, endpoint_url=endpoint_url, region=region, container=container,
                     account_url=account_url, account_name=account_name, prefix=prefix,
                     max_in_flight=max_in_flight, bandwidth_limit_bps=bandwidth_limit)
    body = {"name": name, "kind": kind, "config": config,
            "secret": read_secret(kind, secret_file), "encryption": encryption}
    with conn.client() as c:
        show(c.create_store(body), COLUMNS, title="store created", json_out=conn.json)


@vault_command(store, "list")
def store_list(conn: Conn, where: list[str] = WhereOpt, sort: str | None = SortOpt) -> None:
    """List cloud recovery stores (never their credentials or keys)."""
    with conn.client() as c:
        show(select_rows(c.stores(), where, sort), COLUMNS, title="cloud stores", json_out=conn.json)


@vault_command(store, "show")
def store_show(conn: Conn, name: str) -> None:
    """Show a store: configuration, key ids, groups using it."""
    with conn.client() as c:
        s = c.store(name)
        if conn.json:
            show(s, [], title="", json_out=True)
            return
        for k, v in s.items():
            console.print(f"[bold]{k}[/]: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


@vault_command(store, "update")
def store_update(
    conn: Conn,
    name: str,
    prefix: str | None = typer.Option(None, help="Key prefix (only while no group uses it)."),
    region: str | None = typer.Option(None, help="S3 region."),
    max_in_flight: int | None = typer.Option(None, help="Requests in flight at most."),
    bandwidth_limit: int | None = typer.Option(None, help="Bytes/s cap for this store."),
    credentials: bool = typer.Option(False, "--credentials",
                                     help="Replace the credentials (from --secret-file or env)."),
    secret_file: Path | None = SecretFileOpt,
) -> None:
    """Change a store's settings or credentials (sent to the agents of its items)."""
    config = _config(prefix=prefix, region=region, max_in_flight=max_in_flight,
                     bandwidth_limit_bps=bandwidth_limit)
    with conn.client() as c:
        secret = None
        if credentials or secret_file is not None:
            secret = read_secret(str(c.store(name)["kind"]), secret_file)
        show(c.update_store(name, config=config or None, secret=secret), COLUMNS,
             title="store updated", json_out=conn.json)


@vault_command(store, "rotate-key")
def store_rotate_key(conn: Conn, name: str) -> None:
    """Make a new encryption key active; old keys stay for reading older objects."""
    with conn.client() as c:
        show(c.rotate_store_key(name), ["name", "active_key_id", "key_ids"],
             title="key rotated", json_out=conn.json)


@vault_command(store, "rekey")
def store_rekey(conn: Conn, name: str,
                wait: bool = typer.Option(True, help="Wait for the job to end."),
                timeout: float = typer.Option(3600.0, help="Seconds to wait.")) -> None:
    """Re-encrypt the store's objects written under older keys with its active key (a
    resumable job run by an agent that holds the store; safe while replication runs)."""
    with conn.client() as c:
        job = c.rekey_store(name)
        if wait:
            job = c.wait_job(str(job["id"]), timeout=timeout)
        show(job, ["id", "kind", "target", "state", "message"], title="store rekey",
             json_out=conn.json)
        if job.get("state") == "failed":
            raise typer.Exit(2)


@vault_command(store, "assign")
def store_assign(conn: Conn, name: str,
                 group: str = typer.Option(..., help="Protection group.")) -> None:
    """Make a group replicate to this store (while it protects nothing yet). NAME '-' sets the
    group back to its target site's agent store."""
    with conn.client() as c:
        show(c.set_group_store(group, None if name == "-" else name),
             ["name", "site", "target_site", "store", "policy"], title="group",
             json_out=conn.json)


@vault_command(store, "delete")
def store_delete(conn: Conn, name: str) -> None:
    """Delete a store no group uses. Its keys go with it: its objects become unreadable."""
    with conn.client() as c:
        c.delete_store(name)
    if conn.json:
        print(json.dumps({"deleted": name}))
    else:
        console.print(f"store {name} deleted")
