"""Request bodies (pydantic). Shapes and types only — a wrong shape or type is a 422; value
rules (names, ranges, references) are checked by the routes and answer 400/404/409.

Operator bodies are strict (no coercion, unknown fields refused); agent bodies ignore unknown
fields so that newer agents can talk to this vault.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from drsite.core.states import CommandStatus
from drsite.failover.wire import BREAKGLASS_MAX_REPORTS


class Strict(BaseModel):
    # operators' requests: NaN and infinities are refused (a NaN frequency was a 500); agents'
    # reports (Lenient) keep taking them, a bad number must not make a host look down
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class SiteIn(Strict):
    name: str
    description: str = ""


class RegistrationKeyIn(Strict):
    ttl_s: int = 3600


class StoreHostIn(Strict):
    host: str | None  # host id or name in the site; None: the site has no store host
    force: bool = False  # move the role although items replicate to the current store host


class PolicyIn(Strict):
    name: str | None = None  # required by POST; PUT takes the name from the path
    frequency_s: float = 300.0
    retention_hours: float = 24.0
    app_consistent_every_s: float | None = 3600.0
    initial_replication_start: str | None = None
    compression: bool | str = "auto"  # "auto" | "zstd" | "off"; true/false mean "zstd"/"off"
    encryption: bool = False
    bandwidth_limit_bps: int | None = None
    resync_window: str = "18:00-08:00"
    rpo_threshold_s: float = 1800.0
    scrub_interval_s: float | None = 86400.0
    scrub_rate_bps: int | None = 32 << 20
    mode: str = "async"  # "sync": a guest write waits for the recovery site (file VMs)
    sync_budget_ms: int = 50  # the most it waits before the item falls back to async


class VerifyIn(Strict):
    point: str | None = None
    all: bool = False


class MatchIn(Strict):
    vm_names: list[str] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)


class GroupIn(Strict):
    name: str
    site: str
    target_site: str
    policy: str | None = None
    match: MatchIn = Field(default_factory=MatchIn)
    store: str | None = None  # a cloud store instead of the target site's agent store
    drill: dict[str, Any] | None = None  # a drill schedule of the group's VMs
    consistent: bool = False  # multi-VM consistency: group points from a barrier (≤ 16 VMs)
    barrier_timeout_ms: int = 500  # the barrier's bound on guest write pauses


class GroupUpdate(Strict):
    """PUT /groups/{name}: fields present are changed (``policy: null`` dissociates,
    ``store: null`` goes back to the target site's agent store, ``drill: null`` ends the
    group's drill schedule)."""

    policy: str | None = None
    match: MatchIn | None = None
    store: str | None = None
    drill: dict[str, Any] | None = None
    consistent: bool | None = None
    barrier_timeout_ms: int | None = None


class ItemIn(Strict):
    vm_id: str
    group: str


class TokenIn(Strict):
    name: str
    role: str


class RegisterIn(Lenient):
    key: str
    host_name: str
    csr_pem: str
    host_id: str | None = None  # an agent re-registering (re-issue key): the host it already is


class ReissueIn(Strict):
    ttl_s: int = 3600


class ItemBeatIn(Lenient):
    item_id: str
    report: dict[str, Any]
    new_points: list[dict[str, Any]] = Field(default_factory=list)
    removed_points: list[str] = Field(default_factory=list)


class StoreAuditIn(Lenient):
    """A delete or overwrite the reporting host's store did (or refused): ``caller`` is the host
    id its client certificate named."""

    op: str
    key: str
    item_id: str | None = None
    caller: str
    outcome: str
    at: float | None = None


class HeartbeatIn(Lenient):
    host_name: str
    version: str = ""
    store_url: str | None = None
    # null: the inventory is unchanged since the agent's last answered heartbeat
    vms: list[dict[str, Any]] | None = Field(default_factory=list)
    items: list[ItemBeatIn] = Field(default_factory=list)
    audit: list[StoreAuditIn] = Field(default_factory=list, max_length=1000)
    store_acl_digest: str | None = Field(default=None, max_length=128)
    # ids of the commands the agent holds (queued, running, result not yet confirmed); None
    # from agents that do not list them (then only the timeouts re-deliver)
    held: list[str] | None = Field(default=None, max_length=10_000)
    # the agent's first answered heartbeat since its process started: every command delivered
    # before it that ``held`` does not list was lost with the old process (re-sent at once)
    restarted: bool = False
    # store-serving agents: the recovery book they hold; break-glass failovers not yet recorded
    recovery_book_digest: str | None = Field(default=None, max_length=128)
    recovery_book_patches: bool = False  # it applies book patches (recoverybook): agents >= 0.x
    breakglass: list[dict[str, Any]] = Field(default_factory=list,
                                             max_length=BREAKGLASS_MAX_REPORTS)


class CommandWaitIn(Lenient):
    # how long the vault may hold the request open when there is nothing to deliver
    timeout_s: float = Field(default=20.0, ge=0.0, le=60.0)


class CommandResultIn(Lenient):
    status: Literal[CommandStatus.RUNNING, CommandStatus.SUCCEEDED, CommandStatus.FAILED]
    progress: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class DiskIn(Strict):
    disk_id: str | None = None  # default d0, d1, …
    size: int | None = None     # bytes; an import may leave it out (the image's size)
    path: str | None = None     # import: the image, relative to the agent's import directory


class NicIn(Strict):
    network: str
    ip: str | None = None
    mac: str | None = None      # default: a stable 52:54:00:… address from host and VM name


class VmCreateIn(Strict):
    """POST /vms (CreateVm) and POST /vms/import (ImportVm: ``disks`` carry ``path``)."""

    host: str                   # host id, or host name (with ``site`` when names repeat)
    site: str | None = None
    name: str
    vcpus: int = 1
    memory_mib: int = 512
    disks: list[DiskIn] = Field(default_factory=list)
    nics: list[NicIn] = Field(default_factory=list)
    workload: dict[str, Any] | None = None  # file VMs: what the stand-in guest OS writes
    start: bool = False
    move: bool = False          # import: move the images into the VM instead of copying them


class VmStopIn(Strict):
    force: bool = False
    timeout_s: float = 60.0
