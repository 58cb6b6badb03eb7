"""Every hint tells an operator what to do with a command that exists.

Walks the source: every ``hint=`` of an error, every message and help text, every job message
that names a ``drsite …`` command, and checks each command path against the real Typer app
(``drsite failover commit`` must be a command of group ``failover``); and no hint sends an
operator to an API route (``GET /api/v1/items``) or to one of drsite's internal functions
(``cleanup_test_failover``)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer.main

import drsite
from drsite.cli.main import app

SRC = Path(drsite.__file__).parent
COMMAND = re.compile(r"\bdrsite((?: (?:[a-z][a-z-]*|[A-Z][A-Z_]*))+)")
ROUTE = re.compile(r"\b(?:GET|POST|PUT|PATCH|DELETE) /|/api/v1")
IDENT = re.compile(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b")
# commands that do not exist (any more): a hint naming them is wrong
OLD_NAMES = {"protect", "token", "item", "site", "host", "policy", "group", "alert"}
# names that read like a command and are not one (the CA's subject name)
NAMES = {"drsite vault CA"}
# snake_case words a hint may say: values and fields an operator types or reads
VALUES = {"latest_app", "app_consistent_every_s", "rpo_threshold_s", "timeout_s", "every_s",
          "boot_timeout_s", "retention_hours", "frequency_s", "store_url", "vm_names",
          "allow_resize", "region_offset", "region_length", "io_size", "point_key",
          "scrub_interval_s", "scrub_rate_bps", "bandwidth_limit_bps", "drill_probe",
          "ip_rule", "test_network", "resync_window", "connection_string", "account_key",
          "sas_token", "access_key", "secret_key", "max_in_flight", "endpoint_url",
          "account_name", "account_url"}


def tree() -> Any:
    """The ``drsite`` command tree as Typer builds it (groups have ``commands``)."""
    cmd = typer.main.get_command(app)
    assert hasattr(cmd, "commands")
    return cmd


def exists(root: Any, words: list[str]) -> bool:
    """``words`` (command words, then UPPERCASE placeholders) name a command: every lowercase
    word down to a leaf is a sub-command, and the placeholders right after the leaf are no
    more than its positional arguments (``drsite vault registration-key SITE`` is wrong: that
    command takes ``--site``)."""
    node = root
    rest = list(words)
    while rest and rest[0].islower():
        if not hasattr(node, "commands"):
            break  # the rest are arguments
        sub = node.commands.get(rest.pop(0))
        if sub is None:
            return False
        node = sub
    if hasattr(node, "commands"):
        return not rest  # a group named with no sub-command is fine: "see drsite items"
    placeholders = 0
    for w in rest:
        if not w.isupper():
            break
        placeholders += 1
    positional = [p for p in node.params if p.param_type_name == "argument"]
    return placeholders <= len(positional)


def checked(root: Any, first: str) -> bool:
    """Whether a ``drsite WORD …`` is meant as a command: a root command, a near miss of one
    (``item`` for ``items``) or an old name; other words are prose (``drsite is up``)."""
    names = set(root.commands)
    return first in names or first + "s" in names or first.rstrip("s") in names \
        or first in OLD_NAMES


def literal(node: ast.AST) -> str | None:
    """A string expression's text (an f-string's placeholders as ``X``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = literal(node.left), literal(node.right)
        return None if a is None or b is None else a + b
    return None


def texts(node: ast.AST) -> Iterator[str]:
    """Every string a hint expression can be (both branches of ``a if c else b``)."""
    if isinstance(node, ast.IfExp):
        yield from texts(node.body)
        yield from texts(node.orelse)
        return
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            yield from texts(v)
        return
    t = literal(node)
    if t is not None:
        yield t


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def hints() -> Iterator[tuple[str, str]]:
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "hint":
                        for t in texts(kw.value):
                            yield f"{path.relative_to(SRC)}:{node.lineno}", t


def all_strings() -> Iterator[tuple[str, str]]:
    """Every string in the source (messages, help, docstrings) and the dashboard templates."""
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            t = literal(node) if isinstance(node, ast.Constant | ast.JoinedStr) else None
            if t is not None and "drsite " in t:
                yield f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}", t
    for path in sorted((SRC / "web" / "templates").rglob("*.html")):
        yield str(path.relative_to(SRC)), path.read_text()
    repo = SRC.parent.parent  # README and docs, when run from a checkout
    for path in [repo / "README.md", *sorted((repo / "docs").glob("*.md")),
                 *sorted(SRC.rglob("*.md"))]:
        if path.exists():
            yield str(path), path.read_text()


def functions() -> set[str]:
    out: set[str] = set()
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "_" in node.name.strip("_"):
                out.add(node.name.strip("_"))
    return out


def test_the_walk_finds_hints_and_commands() -> None:
    hs = list(hints())
    assert len(hs) > 150  # the walk sees the source, not an empty list
    assert sum(1 for _, t in all_strings() if COMMAND.search(t)) > 100


def test_every_drsite_command_named_exists() -> None:
    root = tree()
    bad = []
    for where, text in all_strings():
        for m in COMMAND.finditer(text):
            words = m.group(1).split()
            if not checked(root, words[0]) or m.group(0) in NAMES:
                continue
            if not exists(root, words):
                bad.append(f"{where}: drsite{m.group(1)}")
    assert bad == [], "\n".join(bad)


def test_no_hint_names_an_api_route_or_an_internal_function() -> None:
    internal = functions() - VALUES
    bad = []
    for where, text in hints():
        if ROUTE.search(text):
            bad.append(f"{where}: route in {text!r}")
        for word in IDENT.findall(text):
            if word in internal:
                bad.append(f"{where}: internal name {word!r} in {text!r}")
    assert bad == [], "\n".join(bad)


def test_the_checker_catches_what_it_should() -> None:
    root = tree()
    assert exists(root, ["failover", "commit"]) and exists(root, ["items", "points"])
    assert exists(root, ["job", "resume"]) and exists(root, ["vms", "create"])
    for wrong in (["item", "points"], ["token", "create"], ["failover", "explode"],
                  ["vault", "registration-key", "SITE"], ["failover", "commit", "ITEM", "X"]):
        assert not exists(root, wrong), wrong
    assert exists(root, ["failover", "commit", "ITEM"]) and exists(root, ["items"])
    assert checked(root, "item") and checked(root, "protect") and not checked(root, "is")
    assert ROUTE.search("List items with GET /api/v1/items.")
    assert "cleanup_test_failover" in functions()
