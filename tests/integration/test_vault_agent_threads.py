"""Agent traffic never takes every thread of the API (issue 13): on SQLite one transaction
writes at a time, and agent requests (heartbeats, command results) wait for it in threads.
Before ``Vault.agent_limiter``, 40 queued heartbeats held all of anyio's 40 worker threads and an
operator's ``GET /items`` — a read, which SQLite's WAL serves beside the writer — waited for a
thread until the writer finished (``GET /items`` p99 340 ms at 1,000 items in bench/scale). Here
the write lock is held while 60 heartbeats queue: operator reads are answered at once, and every
heartbeat is applied once the lock is free."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from drsite.vault.context import AGENT_THREADS_SQLITE
from drsite.vault.testing import Harness, vm_info

HEARTBEATS = 60  # more than anyio's default thread pool (40)


def test_operator_reads_are_answered_while_agent_writes_queue(tmp_path: Path) -> None:
    h = Harness(tmp_path / "vault")
    try:
        h.site("prim")
        agent = h.register("prim", "hv1")
        agent.beat(vms=[vm_info("vm-1", "web1")])
        h.ok("GET", "/items")  # the token's first use is touched now, not while the lock is held
        h.peer = agent.cert_der  # every request below comes over hv1's connection
        statuses: list[int] = []
        lock = threading.Lock()

        def beat() -> None:
            r = h.client.post("/api/v1/agent/heartbeat",
                              json={"host_name": "hv1", "version": "test", "vms": None,
                                    "items": []})
            with lock:
                statuses.append(r.status_code)

        reads: dict[str, Any] = {}

        def read() -> None:
            t0 = time.monotonic()
            reads["items"] = h.call("GET", "/items")
            reads["health"] = h.call("GET", "/health")
            reads["took"] = time.monotonic() - t0

        beats = [threading.Thread(target=beat, daemon=True) for _ in range(HEARTBEATS)]
        with h.vault.db.tx() as s:
            s.execute(text("UPDATE hosts SET version = version"))  # SQLite's write lock, held
            for t in beats:
                t.start()
            time.sleep(1.0)  # every heartbeat has arrived and waits (in a thread, or for one)
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(20)
            assert not reader.is_alive(), "an operator read waited for the agents' writes"
            assert not statuses  # nothing written while the lock was held
            active = h.vault.agent_limiter.borrowed_tokens
            assert active <= AGENT_THREADS_SQLITE
        assert reads["items"].status_code == 200 and reads["items"].json()["total"] == 0
        assert reads["health"].status_code == 200
        assert reads["took"] < 10.0
        for t in beats:
            t.join(60)
        assert statuses == [200] * HEARTBEATS
    finally:
        h.peer = None
        h.close()
