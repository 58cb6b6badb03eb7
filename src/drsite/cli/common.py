"""Shared CLI plumbing: the connection options (declared once: :func:`vault_command`), the
client from options/env, tables, JSON output, sizes."""

from __future__ import annotations

import functools
import inspect
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from drsite.client.api import PAGE_MAX, VaultClient, VaultConfig
from drsite.core.errors import InvalidInput, NotFound
from drsite.core.states import JobState, TaskState
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


WhereOpt = typer.Option([], "--where", metavar="FIELD=VALUE",
                        help="Only rows whose FIELD (a --json key) is VALUE (case-insensitive; "
                             "repeat to combine).")
SortOpt = typer.Option(None, "--sort", metavar="FIELD",
                       help="Sort by FIELD (a --json key; -FIELD: descending; empty values last).")


def select_rows(rows: Sequence[dict[str, Any]], where: Sequence[str],
                sort: str | None) -> list[dict[str, Any]]:
    """A list command's rows filtered by ``--where FIELD=VALUE`` (all must hold) and ordered by
    ``--sort [-]FIELD``; a field no row has is refused with the fields there are."""
    out = list(rows)
    fields = sorted({k for r in out for k in r})

    def known(field: str, opt: str) -> str:
        if fields and field not in fields:
            raise InvalidInput(f"{opt}: no field {field!r} in these rows",
                               hint=f"Use one of: {', '.join(fields)} (the keys of --json).")
        return field

    for cond in where:
        field, sep, value = cond.partition("=")
        if not sep or not field.strip():
            raise InvalidInput(f"--where {cond!r} is not FIELD=VALUE",
                               hint="Write e.g. --where site=primary --where health=critical.")
        key = known(field.strip(), "--where")
        out = [r for r in out if _text(r.get(key)).lower() == value.strip().lower()]
    if sort:
        desc = sort.startswith("-")
        key = known(sort.lstrip("-"), "--sort")
        present = [r for r in out if r.get(key) is not None]
        absent = [r for r in out if r.get(key) is None]
        present.sort(key=lambda r: _sort_key(r.get(key)), reverse=desc)
        out = present + absent
    return out


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def _sort_key(v: Any) -> tuple[int, float, str]:
    """Numbers by value before text by its letters (a column may hold both)."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, _text(v).lower())


def client(vault: str | None, token: str | None, ca_file: Path | None) -> VaultClient:
    return VaultClient(VaultConfig.from_env(vault, token, ca_file))


@dataclass(frozen=True)
class Conn:
    """What every command that talks to the vault takes: where the vault is, the token, the
    vault's CA (options or ``DRSITE_VAULT_URL``/``DRSITE_TOKEN``/``DRSITE_CA_FILE``), and
    whether to print JSON for scripts."""

    vault: str | None = None
    token: str | None = None
    ca_file: Path | None = None
    json: bool = False

    def client(self) -> VaultClient:
        return client(self.vault, self.token, self.ca_file)


# the options of Conn, added to every vault command by vault_command (name, option, type)
CONN_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("vault", VaultOpt, str | None), ("token", TokenOpt, str | None),
    ("ca_file", CaOpt, Path | None), ("json_out", JsonOpt, bool))
F = TypeVar("F", bound=Callable[..., Any])


def vault_command(group: typer.Typer, name: str | None = None, **kw: Any) -> Callable[[F], F]:
    """Register ``fn(conn: Conn, ...)`` as command ``name`` of ``group`` with the connection
    options (``--vault``, ``--token``, ``--ca-file``, ``--json``) added after its own: they are
    declared here once, not on each command. Returns ``fn`` unchanged (tests call it with a
    ``Conn``)."""

    def register(fn: F) -> F:
        hints = get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name != "conn"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=t)
                 for n, opt, t in CONN_OPTIONS]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            conn = Conn(kwargs.pop("vault"), kwargs.pop("token"), kwargs.pop("ca_file"),
                        bool(kwargs.pop("json_out")))
            return fn(conn, *args, **kwargs)

        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*[p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in own], *added])
        command.__annotations__ = {**{p.name: p.annotation for p in own},
                                   **{n: t for n, _, t in CONN_OPTIONS}, "return": None}
        group.command(name, **kw)(command)
        return fn

    return register


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """``1G``, ``1GiB``, ``512M``, ``4096`` → bytes (K, M, G, T, P are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidInput(f"{what} {text!r} is not a size",
                           hint="Write e.g. 512MiB, 1G, 20GiB, or a number of bytes.")
    mult = 1024 ** " kmgtp".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * mult)


LimitOpt = typer.Option(100, "--limit", min=1, help="How many to show (the newest, or the "
                                                  "first in the list's order).")
AllOpt = typer.Option(False, "--all", help="Every one, all pages (not only --limit).")


def fetch_list(c: VaultClient, path: str, *, limit: int, all_pages: bool,
               **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Rows of a list endpoint (one or more pages: ``limit`` of them, or all) and how many
    match in total."""
    first = c.page(path, **params, limit=min(limit, PAGE_MAX) if not all_pages else PAGE_MAX)
    rows = list(first["entries"])
    total = int(first["total"])
    cursor = first.get("next_cursor")
    while cursor and (all_pages or len(rows) < limit):
        want = PAGE_MAX if all_pages else min(PAGE_MAX, limit - len(rows))
        pg = c.page(path, **params, limit=want, cursor=cursor)
        rows.extend(pg["entries"])
        cursor = pg.get("next_cursor")
    return rows, total


def list_rows(c: VaultClient, path: str, *, limit: int, all_pages: bool, where: Sequence[str],
              sort: str | None, server_fields: Sequence[str] = (),
              rows_of: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
              **params: Any) -> tuple[list[dict[str, Any]], int]:
    """A list command's rows and how many match, with paging, ``--where`` and ``--sort``.

    A ``--where`` on one of ``server_fields`` (fields the endpoint filters exactly) becomes
    that filter, so the vault pages and counts only the matching rows. Any other ``--where``,
    and ``--sort``, need the whole list: every page is read, filtered and sorted here
    (:func:`select_rows`, over the rows as ``--json`` shows them: ``rows_of``), then ``--limit``
    cuts it (``--all``: not) and the total is what matched. ``--sort`` therefore sorts every
    matching row, not only the page shown."""
    local: list[str] = []
    for cond in where:
        field, sep, value = cond.partition("=")
        key = field.strip()
        if sep and key in server_fields and params.get(key) is None:
            params[key] = value.strip().lower()
        else:
            local.append(cond)
    shape = rows_of or (lambda rows: rows)
    if local or sort:
        rows, _ = fetch_list(c, path, limit=limit, all_pages=True, **params)
        out = select_rows(shape(rows), local, sort)
        return (out if all_pages else out[:limit]), len(out)
    rows, total = fetch_list(c, path, limit=limit, all_pages=all_pages, **params)
    return shape(rows), total


def show_list(rows: list[dict[str, Any]], total: int, columns: Iterable[str], *, title: str,
              what: str, json_out: bool) -> None:
    """:func:`show`, and — when the list was cut — "showing N of M" (on stderr with
    ``--json``, so the JSON stays a list): never a silently shortened list."""
    show(rows, columns, title=title, json_out=json_out)
    if len(rows) < total:
        note = f"showing {len(rows)} of {total} {what} (--all for every one, or --limit N)"
        (err_console if json_out else console).print(note)


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


def follow_job(c: VaultClient, job_id: str, json_out: bool, wait: bool,
               timeout: float = 24 * 3600.0) -> dict[str, Any]:
    """Show a job's progress until it ends (``wait``), then the job; exit 1 when it did not
    succeed (the job's error and hint are in its row and ``drsite jobs show JOB``). Without
    ``wait``: the job id. Returns the job."""
    if not wait:
        show({"job_id": job_id}, ["job_id"], title="job started", json_out=json_out)
        return {"id": job_id}
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), console=console,
                  disable=json_out) as progress:
        task = progress.add_task(job_id, total=100)

        def update(job: dict[str, Any]) -> None:
            running = [t for t in job.get("tasks", []) if t.get("state") == TaskState.RUNNING]
            step = (running[0].get("title") or running[0]["name"]) if running \
                else job.get("state")
            desc = f"{job.get('kind')} {job.get('target') or ''}: {step}"
            progress.update(task, description=desc, completed=float(job.get("progress") or 0))

        job = c.wait_job(job_id, on_update=update, timeout=timeout)
    if json_out:
        show(job, [], title="", json_out=True)
    else:
        show(job, ["id", "kind", "target", "state", "progress", "message"], title="job",
             json_out=False)
        err = job.get("error") or {}
        if err:
            err_console.print(f"[red]error[/] ({err.get('code')}): {err.get('message')}")
            if err.get("hint"):
                err_console.print(f"[yellow]hint[/]: {err['hint']}")
    if job.get("state") != JobState.SUCCEEDED:
        raise typer.Exit(EXIT_JOB_FAILED)
    return job


ItemArg = typer.Argument(..., metavar="ITEM", help="An item id, or the name of the VM it "
                                                   "protects (then: the VM's current item).")


def item_ref(c: VaultClient, ref: str) -> str:
    """The item ``ref`` names: an item id, or the name of a protected VM (the item that stands
    for the VM now: after a failover and re-protect, its reverse item)."""
    try:
        return str(c.item(ref)["id"])
    except (NotFound, InvalidInput):
        pass
    rows = [it for it in c.items() if it.get("vm_name") == ref]
    if len(rows) == 1:
        return str(rows[0]["id"])
    if not rows:
        raise NotFound(f"no item {ref!r}: neither an item id nor the name of a protected VM",
                       hint="List items with 'drsite items list'.")
    raise InvalidInput(f"{len(rows)} items protect VMs named {ref} "
                       f"({', '.join(str(it['id']) for it in rows)})",
                       hint="Give the item id ('drsite items list').")
