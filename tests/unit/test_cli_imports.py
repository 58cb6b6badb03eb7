"""Every ``drsite`` invocation imports the CLI; the vault commands an operator types in a storm
(`items list`, `failover start`) must not pay for the replication engine, the store, numpy or
the HTTP server on the way (``drsite --help`` took ~1.5 s on a loaded 2-core box)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("drsite.replication.driver", "drsite.replication.local", "drsite.store.writer",
         "drsite.hypervisors.file.driver", "numpy", "uvicorn")


def test_the_cli_imports_no_engine_for_a_vault_command() -> None:
    code = ("import json, sys; import drsite.cli.main; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=60)
    assert json.loads(out.stdout) == []
