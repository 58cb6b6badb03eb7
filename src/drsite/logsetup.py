"""Process logging for drsite's long-running servers (agent, vault, witness)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Log lines with time, level, logger and thread to stderr, unless the process (a test, an
    embedding program) set logging up already. httpx logs at WARNING: at INFO it writes a line per
    request, which for an agent's heartbeats or a vault's peer and witness probes is most of the
    log."""
    root = logging.getLogger()
    if root.handlers:
        return
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
