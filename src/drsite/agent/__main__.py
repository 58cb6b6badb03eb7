"""``python -m drsite.agent register|run …``: the agent as a process without the Typer CLI
(options mirror ``drsite agent register`` / ``drsite agent run``). Exit codes: 0 ok, else the
error's own as for ``drsite`` (``DrsiteError.exit_code``: 2 a permanent error, 75 a transient
one)."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from drsite.agent.main import HYPERVISOR_KINDS, agent_register, agent_run, configure_logging
from drsite.core.errors import DrsiteError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m drsite.agent", description=__doc__)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register", help="register this host with the vault")
    r.add_argument("--vault", required=True, help="vault URL, e.g. https://127.0.0.1:8443")
    r.add_argument("--key", required=True, help="one-time registration key")
    r.add_argument("--data", type=Path, default=Path("drsite-agent"), help="agent data directory")
    r.add_argument("--name", default=socket.gethostname(), help="host name shown in the vault")
    r.add_argument("--ca-file", type=Path, default=None, help="the vault's CA certificate")
    r.add_argument("--ca-fingerprint", default=None, help="SHA-256 fingerprint of the vault's CA")
    r.add_argument("--insecure-first-contact", action="store_true",
                   help="trust whatever CA the vault presents (logged); not recommended")
    run = sub.add_parser("run", help="run the agent daemon in the foreground")
    run.add_argument("--data", type=Path, default=Path("drsite-agent"), help="agent data directory")
    run.add_argument("--hypervisor", default="file", choices=HYPERVISOR_KINDS)
    run.add_argument("--vms", type=Path, required=True, help="file hypervisor root")
    run.add_argument("--store", type=Path, default=None, help="serve a recovery store from here")
    run.add_argument("--store-listen", default=None, help="HOST:PORT of the store server")
    run.add_argument("--heartbeat-interval", type=float, default=2.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.cmd == "register":
            ident = agent_register(args.vault, args.key, args.data, args.name,
                                   ca_file=args.ca_file, ca_fingerprint=args.ca_fingerprint,
                                   insecure_first_contact=args.insecure_first_contact)
            print(f"registered host {ident.host_id} in site {ident.site}")
        else:
            agent_run(args.data, hypervisor_kind=args.hypervisor, vms_root=args.vms,
                      store_dir=args.store, store_listen=args.store_listen,
                      heartbeat_interval=args.heartbeat_interval)
    except DrsiteError as e:
        print(f"error ({e.error_class.value}): {e}" + (f"\nhint: {e.hint}" if e.hint else ""),
              file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
