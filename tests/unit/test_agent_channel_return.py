"""The command channel notices the vault's return at once (issue 19: a vault restarted under
a job must not leave it waiting for the agent's heartbeat backoff): while the vault is down
(connection refused) the channel probes it every heartbeat interval, not on a growing
backoff; its first poll after a failure asks for an immediate answer (a long poll with
nothing to deliver would hide the return for 20 s); and the return wakes the heartbeat."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from drsite.agent.lanes import CHANNEL_WAIT_S, CommandLanes
from drsite.agent.link import ChannelReply
from drsite.agent.state import CommandJournal
from drsite.core.errors import Busy, NetworkError


class Link:
    vault_url = "https://127.0.0.1:1"

    def __init__(self, errors: list[Exception], stop: threading.Event,
                 beat_asked_at: tuple[int, ...] = ()) -> None:
        self.errors = errors
        self.stop = stop
        self.calls: list[tuple[float, float]] = []  # (monotonic time, wait_s)
        self.beat_asked_at = beat_asked_at  # the calls whose answer asks for a heartbeat

    def wait_channel(self, wait_s: float) -> ChannelReply:
        self.calls.append((time.monotonic(), wait_s))
        if self.errors:
            raise self.errors.pop(0)
        if len(self.calls) > 12:
            self.stop.set()
        return ChannelReply([], heartbeat=len(self.calls) in self.beat_asked_at)


class Host:
    heartbeat_interval = 0.05
    max_backoff_s = 5.0

    def __init__(self, link: Link) -> None:
        self.link = link
        self.returns: list[int] = []  # the call count when vault_back was called
        self.beats_asked: list[int] = []  # the call count when beat_soon was called

    def vault_back(self) -> None:
        self.returns.append(len(self.link.calls))

    def beat_soon(self) -> None:
        self.beats_asked.append(len(self.link.calls))

    def __getattr__(self, name: str) -> Any:  # nothing else is used by the channel loop
        raise AttributeError(name)


def run(tmp_path: Path, errors: list[Exception],
        beat_asked_at: tuple[int, ...] = ()) -> tuple[Link, Host]:
    stop = threading.Event()
    link = Link(errors, stop, beat_asked_at)
    host = Host(link)
    lanes = CommandLanes(host, CommandJournal(tmp_path / "commands.json"),  # type: ignore[arg-type]
                         threading.RLock(), stop, 1)
    t = threading.Thread(target=lanes.channel_loop, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return link, host


def test_a_vault_that_is_down_is_probed_every_interval(tmp_path: Path) -> None:
    link, host = run(tmp_path, [NetworkError("refused") for _ in range(8)])
    waited = link.calls[8][0] - link.calls[0][0]
    # eight refusals in a row, each retried one interval later: 0.4 s (the growing backoff
    # of a vault that answers with errors would take 0.05 × (1 + … + 8) = 1.8 s)
    assert waited < 1.2, waited
    # every poll while it was down, and the first after, asks for an immediate answer
    assert [w for _, w in link.calls[:9]] == [CHANNEL_WAIT_S] + [0.0] * 8
    assert link.calls[9][1] == CHANNEL_WAIT_S  # back to long polls
    assert host.returns == [9]  # the return is reported once, on the first answer


def test_a_vault_that_answers_with_errors_gets_a_growing_backoff(tmp_path: Path) -> None:
    link, host = run(tmp_path, [Busy("overloaded") for _ in range(4)])
    waited = link.calls[4][0] - link.calls[0][0]
    assert waited >= 0.05 * (1 + 2 + 3 + 4) * 0.95, waited
    assert host.returns == [5]


def test_the_vaults_ask_for_a_heartbeat_on_the_channel_is_passed_on(tmp_path: Path) -> None:
    """A channel answer with ``heartbeat`` (a job of the vault waits for this host's next
    heartbeat) makes the agent beat now; other answers do not."""
    _, host = run(tmp_path, [], beat_asked_at=(2, 5))
    assert host.beats_asked == [2, 5]
