"""``drsite`` as a real process — an operator command and the agent's own entry point
(``drsite agent register``) — exits with the error's own exit code (``DrsiteError.exit_code``):
2 when an operator must act, 75 (EX_TEMPFAIL) when trying again later may work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from drsite.core.errors import EXIT_PERMANENT, EXIT_TRANSIENT, InvalidInput, NetworkError
from drsite.pki import CertificateAuthority

DRSITE = [sys.executable, "-c", "from drsite.cli.main import main; main()"]
AGENT = [*DRSITE, "agent"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: nobody listens


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRSITE_")}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)


def test_cli_and_agent_agree_on_exit_codes(tmp_path: Path) -> None:
    assert (NetworkError.exit_code, InvalidInput.exit_code) == (EXIT_TRANSIENT, EXIT_PERMANENT)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca").cert_path
    vault = f"https://127.0.0.1:{_closed_port()}"
    # transient: nobody answers at the vault's address
    cli = _run([*DRSITE, "sites", "list", "--vault", vault, "--ca-file", str(ca), "--token", "t"])
    agent = _run([*AGENT, "register", "--vault", vault, "--key", "drsk_x", "--data",
                  str(tmp_path / "agent"), "--ca-file", str(ca)])
    for p in (cli, agent):
        assert p.returncode == EXIT_TRANSIENT == 75, p.stderr
        assert "transient" in p.stderr
    # permanent: bad input, refused before anything is sent
    cli = _run([*DRSITE, "sites", "list"])
    agent = _run([*AGENT, "register", "--vault", vault, "--key", "drsk_x", "--data",
                  str(tmp_path / "agent")])
    for p in (cli, agent):
        assert p.returncode == EXIT_PERMANENT == 2, p.stderr
        assert "permanent" in p.stderr and "hint" in p.stderr
    assert not (tmp_path / "agent" / "agent.json").exists()
