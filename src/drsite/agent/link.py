"""The agent's side of the agent routes: heartbeat and command results, over mTLS.

Responsible for: the HTTP calls of ``/api/v1/agent/heartbeat`` and
``/api/v1/agent/commands/{id}/result``, parsing the replies, and mapping failures to the error
hierarchy (unreachable vault, timeout → ``NetworkError``, transient; error answers through the
codec of :mod:`drsite.core.errors`: the body's class, else by status, 5xx transient), and
**following the active vault of a pair** (issue 14): it knows every vault URL of the pair and
sends to the one that last answered; when that one refuses as the standby (``standby``) or
cannot be reached (``network``), it tries the others in turn at once and remembers the first
that answers. Not responsible for: retrying or backing off (the daemon does), or for what the
commands mean.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from drsite.core.errors import (
    AuthError,
    DrsiteError,
    InvalidInput,
    NetworkError,
    StandbyVault,
    from_dict,
)
from drsite.core.states import CommandStatus

log = logging.getLogger(__name__)

COMMAND_KINDS = ("protect", "cycle", "resync", "retention", "unprotect", "update_settings",
                 # failover (agent/failover.py)
                 "failover", "failover_cleanup", "failover_commit", "failover_cancel",
                 "failover_change_point", "reprotect_seed", "failover_prepare",
                 "failover_resume_source", "failover_fence", "run_script",
                 "store_rekey",   # agent/storerekey.py
                 # store upkeep and drills (agent/scrub.py, agent/drill.py)
                 "scrub", "verify", "drill_probe",
                 # consistency groups' barrier (agent/barrier.py)
                 "group_prepare", "group_seal",
                 # the VM lifecycle (agent/vms.py)
                 "vm_create", "vm_import", "vm_start", "vm_stop", "vm_delete")
# commands of no item (item_id null): store_rekey's lane is "", a VM command's its VM's
ITEMLESS_KINDS = ("store_rekey", "vm_create", "vm_import", "vm_start", "vm_stop", "vm_delete")


def vault_error(resp: httpx.Response, what: str) -> DrsiteError:
    """The drsite error an error answer of the vault stands for: its JSON body decoded
    (:func:`~drsite.core.errors.from_dict`), or by status when it has none of ours."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if not isinstance(body.get("message"), str) or not body["message"]:
        body = {**body, "message": f"the vault answered HTTP {resp.status_code} to {what}"}
    return from_dict(body, http_status=resp.status_code)


@dataclass(frozen=True)
class Command:
    """One command the vault sent (``docs/control-plane.md``, "Command")."""

    command_id: str
    kind: str
    item_id: str
    args: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_dict(d: Any) -> Command:
        """Parse and validate; ``InvalidInput`` on a malformed command."""
        if not isinstance(d, dict):
            raise InvalidInput(f"command is not an object: {d!r}")
        try:
            cid, kind, raw_item = str(d["command_id"]), str(d["kind"]), d["item_id"]
        except KeyError as e:
            raise InvalidInput(f"command without {e.args[0]!r}") from None
        item = "" if raw_item is None else str(raw_item)
        args = d.get("args") or {}
        if not isinstance(args, dict):
            raise InvalidInput(f"command {cid}: args is not an object")
        if not cid or (not item and kind not in ITEMLESS_KINDS):
            raise InvalidInput("command with an empty command_id or item_id")
        return Command(cid, kind, item, dict(args))

    def to_dict(self) -> dict[str, Any]:
        return {"command_id": self.command_id, "kind": self.kind, "item_id": self.item_id,
                "args": dict(self.args)}


@dataclass(frozen=True)
class HeartbeatReply:
    """The vault's answer to a heartbeat: commands to run and, per item, the highest point
    sequence number it has stored."""

    commands: list[Command]
    ack: dict[str, int]
    malformed: int = 0  # commands dropped because they could not be parsed
    store_acl: dict[str, Any] | None = None  # a new store access list (store-serving agents)
    recovery_book: dict[str, Any] | None = None  # a new recovery book (store-serving agents)
    recovery_book_patch: dict[str, Any] | None = None  # or what changed in the one it holds
    breakglass_ack: list[str] = field(default_factory=list)  # break-glass failovers recorded


@dataclass(frozen=True)
class ChannelReply:
    """The command channel's answer: commands, and whether the vault asks for a heartbeat
    now (it answers at once then, with or without commands)."""

    commands: list[Command]
    heartbeat: bool = False


class VaultLink:
    """HTTPS client of the agent routes (client certificate in ``ssl_context``), to one vault
    or to the vaults of a pair (``vault_urls``, the active one first if known).

    ``transport`` replaces the network (tests: ``httpx.MockTransport``). Thread-safe: the
    heartbeat thread and command workers share one instance.
    """

    def __init__(self, vault_urls: str | Sequence[str], ssl_context: ssl.SSLContext, *,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        urls = [vault_urls] if isinstance(vault_urls, str) else list(vault_urls)
        self.vault_urls: list[str] = []
        for u in urls:
            if u.rstrip("/") not in self.vault_urls:
                self.vault_urls.append(u.rstrip("/"))
        if not self.vault_urls:
            raise InvalidInput("an agent needs at least one vault URL")
        self._lock = threading.Lock()
        self._active = 0
        self._clients: list[httpx.Client] = []
        for url in self.vault_urls:
            t = transport
            if t is None:
                # TCP_NODELAY: a request's body is not held back by Nagle's algorithm until the
                # vault acknowledges its headers (a delayed ACK costs ~40 ms per request)
                t = httpx.HTTPTransport(
                    verify=ssl_context,
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
            self._clients.append(httpx.Client(base_url=url + "/api/v1/agent", verify=ssl_context,
                                              timeout=timeout, transport=t))

    @property
    def vault_url(self) -> str:
        """The vault this link sends to first: the one that answered last."""
        return self.vault_urls[self._active]

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def _post(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        """POST to the active vault; on ``standby`` or ``network``, to the others in turn (the
        first that answers becomes the active one). Other errors are the vault's answer and
        are raised as they are."""
        with self._lock:
            first = self._active
        order = [(first + k) % len(self.vault_urls) for k in range(len(self.vault_urls))]
        failed: list[DrsiteError] = []
        for i in order:
            try:
                out = self._post_to(i, path, body, timeout=timeout)
            except (StandbyVault, NetworkError) as e:
                failed.append(e)
                continue
            if i != first:
                with self._lock:
                    self._active = i
                log.warning("following the active vault at %s (%s)", self.vault_urls[i],
                            "; ".join(f"{self.vault_urls[j]}: {e.code}"
                                      for j, e in zip(order, failed, strict=False)))
            return out
        # every vault refused or was unreachable: a standby's refusal says most (it names the
        # active vault), else the first failure
        standby = [e for e in failed if isinstance(e, StandbyVault)]
        raise standby[0] if standby else failed[0]

    def _post_to(self, i: int, path: str, body: dict[str, Any], *,
                 timeout: float | None = None) -> Any:
        url = self.vault_urls[i]
        try:
            resp = self._clients[i].post(path, json=body, timeout=timeout if timeout is not None
                                         else httpx.USE_CLIENT_DEFAULT)
        except httpx.TimeoutException as e:
            raise NetworkError(f"the vault at {url} did not answer in time") from e
        except httpx.ConnectError as e:
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                raise AuthError(f"the vault at {url} presents a certificate not "
                                f"signed by the CA this host registered with: {e}") from e
            raise NetworkError(f"cannot reach the vault at {url}: {e}") from e
        except httpx.HTTPError as e:
            raise NetworkError(f"request to the vault at {url} failed: {e}") from e
        if resp.status_code >= 400:
            raise vault_error(resp, path)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as e:
            raise NetworkError(f"the vault's answer to {path} is not JSON") from e

    @staticmethod
    def _commands(out: dict[str, Any]) -> tuple[list[Command], int]:
        commands: list[Command] = []
        bad = 0
        for raw in out.get("commands") or []:
            try:
                commands.append(Command.from_dict(raw))
            except InvalidInput as e:
                bad += 1
                log.error("dropping a malformed command from the vault: %s", e)
        return commands, bad

    def clock_sample(self, timeout: float = 2.0) -> tuple[str, float, float, float]:
        """One reading of the active vault's cut clock: ``(clock_id, vault_t, sent, received)``
        with ``sent``/``received`` this host's ``time.monotonic()`` around the request (the
        reading was taken between them)."""
        with self._lock:
            i = self._active
        sent = time.monotonic()
        out = self._post_to(i, "/clock", {}, timeout=timeout)
        received = time.monotonic()
        if not isinstance(out, dict) or not isinstance(out.get("t"), (int, float)):
            raise NetworkError("the vault's clock reply is malformed")
        return str(out.get("clock_id")), float(out["t"]), sent, received

    def wait_commands(self, wait_s: float) -> list[Command]:
        """The command channel: this host's commands as soon as the vault has any, or ``[]``
        after about ``wait_s`` (the vault holds the request open). ``NotFound`` from a vault
        without the channel."""
        return self.wait_channel(wait_s).commands

    def wait_channel(self, wait_s: float) -> ChannelReply:
        """:meth:`wait_commands`, and whether the vault asks for a heartbeat now (a job waits
        for one: a store access list to confirm, a point to reach its catalogue)."""
        out = self._post("/commands/wait", {"timeout_s": wait_s}, timeout=wait_s + 15.0) or {}
        if not isinstance(out, dict):
            raise NetworkError("the vault's command channel reply is not an object")
        return ChannelReply(self._commands(out)[0], out.get("heartbeat") is True)

    def heartbeat(self, payload: dict[str, Any]) -> HeartbeatReply:
        """Send one heartbeat; the reply's malformed commands are dropped (and logged)."""
        out = self._post("/heartbeat", payload) or {}
        if not isinstance(out, dict):
            raise NetworkError("the vault's heartbeat reply is not an object")
        commands, bad = self._commands(out)
        ack: dict[str, int] = {}
        raw_ack = out.get("ack") or {}
        if isinstance(raw_ack, dict):
            for item_id, seq in raw_ack.items():
                try:
                    ack[str(item_id)] = int(seq) if seq is not None else 0
                except (TypeError, ValueError):
                    log.error("ignoring a malformed ack for item %s: %r", item_id, seq)
        acl, book = out.get("store_acl"), out.get("recovery_book")
        patch, acked = out.get("recovery_book_patch"), out.get("breakglass_ack")
        return HeartbeatReply(commands, ack, bad, acl if isinstance(acl, dict) else None,
                              book if isinstance(book, dict) else None,
                              patch if isinstance(patch, dict) else None,
                              [str(x) for x in acked] if isinstance(acked, list) else [])

    def post_result(self, command_id: str, *, status: CommandStatus, progress: float,
                    result: dict[str, Any] | None = None,
                    error: dict[str, Any] | None = None) -> None:
        """Report a command's progress (``running``) or its final status."""
        self._post(f"/commands/{command_id}/result",
                   {"status": CommandStatus(status).value,
                    "progress": max(0.0, min(100.0, float(progress))),
                    "result": result or {}, "error": error})
