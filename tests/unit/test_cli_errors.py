"""The ``drsite`` entry point's errors: one line and a hint on stderr, the exit code of the
error's class (2 permanent, 75 transient), and with ``--json`` the error as JSON on stdout too
(a script reading stdout got nothing)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from drsite.cli.main import main; main()",
                           *args], capture_output=True, text=True, timeout=60)


def test_an_error_with_json_is_json_on_stdout() -> None:
    url = f"https://127.0.0.1:{_free_port()}"   # nothing listens there
    r = run("items", "list", "--json", "--vault", url, "--token", "t")
    assert r.returncode == 75, r
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "network" and err["class"] == "transient" and err["hint"]
    assert "cannot reach the vault" in r.stderr
    r = run("policies", "create", "x", "--frequency", "nan", "--json", "--vault", url,
            "--token", "t")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["code"] == "invalid_input", r


def test_an_error_without_json_leaves_stdout_empty() -> None:
    r = run("items", "list", "--vault", f"https://127.0.0.1:{_free_port()}", "--token", "t")
    assert r.returncode == 75 and r.stdout == "" and "hint:" in r.stderr, r


def test_version_with_json() -> None:
    r = run("version", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["version"], r
