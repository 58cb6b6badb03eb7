"""SQLAlchemy models of the vault's state (one module, one metadata, one Alembic history).

Times are float seconds since the epoch (UTC), as everywhere in drsite, so an injected clock
drives every timestamp. JSON columns are always replaced, never mutated in place.
Responsible for: table shapes and constraints. Not responsible for: rules (see the API,
``jobs``, ``scheduler`` and ``health`` modules).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from drsite.core.states import CommandStatus, FailoverState, ItemProtection, JobState, TaskState
from drsite.replication.report import Health
from drsite.vault.db.sealed import COMMAND_ARG_PATHS, SealedJSON
from drsite.vault.db.types import EnumText

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Site(Base):
    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    # the host an admin granted the site's store role (migration 0011; ``storeacl``): only it
    # gets the store's access list and recovery book and is believed about break-glass; a
    # ``store_url`` in another host's heartbeat is a claim, never acted on. No foreign key
    # (hosts refer to sites): checked where used (same site, not revoked).
    store_host_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class RegistrationKey(Base):
    """A one-time key for a host to join a site; only its sha256 is stored. With ``host_id``
    (migration 0004) it is a re-issue key: it replaces the certificate of that host only."""

    __tablename__ = "registration_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    used_by_host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"),
                                                nullable=True)


class Host(Base):
    """A registered agent. Only the certificate with ``cert_fingerprint`` is accepted."""

    __tablename__ = "hosts"
    __table_args__ = (UniqueConstraint("site_id", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    cert_fingerprint: Mapped[str] = mapped_column(String(128))
    cert_serial: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float | None] = mapped_column(Float, nullable=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    store_url: Mapped[str | None] = mapped_column(String(256), nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # digest of the store access list the agent last said it holds (migration 0005)
    store_acl_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # digest of the list last put in a heartbeat reply to it (migration 0007): while it differs
    # from ``store_acl_digest`` a list is in flight and no grant is confirmed
    store_acl_sent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # when the list ``store_acl_sent`` was built, and the build time of the last list the agent
    # confirmed holding (migration 0008; ``storeacl.grant_pending``)
    store_acl_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    store_acl_confirmed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # when the agent's process last started, as the vault saw it: the first heartbeat that says
    # ``restarted`` (migration 0015); each restart of a store's agent earns the items that
    # failed to reach it one early retry (``vault/retries.py``)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Vm(Base):
    """A VM as last reported by its host's agent (inventory)."""

    __tablename__ = "vms"
    __table_args__ = (UniqueConstraint("host_id", "vm_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"))
    vm_id: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(64))
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    present: Mapped[bool] = mapped_column(Boolean, default=True)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    # set when an operator disables protection: the group's policy does not re-protect it
    auto_protect_blocked: Mapped[bool] = mapped_column(Boolean, default=False)


class Policy(Base):
    __tablename__ = "policies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    frequency_s: Mapped[float] = mapped_column(Float)
    retention_hours: Mapped[float] = mapped_column(Float)
    app_consistent_every_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    initial_replication_start: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # "auto" | "zstd" | "off" (migration 0016; a boolean before: true = "zstd", false = "off")
    compression: Mapped[str] = mapped_column(String(8))
    encryption: Mapped[bool] = mapped_column(Boolean)
    bandwidth_limit_bps: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    resync_window: Mapped[str] = mapped_column(String(16))
    rpo_threshold_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # scrub of the items' recovery stores (migration 0006): a pass every interval (null: never),
    # paced to the rate (null: unpaced)
    scrub_interval_s: Mapped[float | None] = mapped_column(Float, nullable=True,
                                                           server_default="86400")
    scrub_rate_bps: Mapped[int | None] = mapped_column(BigInteger, nullable=True,
                                                       server_default=str(32 << 20))
    # synchronous mode (migration 0014; agent/syncmode.py): "async" | "sync", and the most a
    # guest write may wait for the recovery site before the item falls back to async
    mode: Mapped[str] = mapped_column(String(8), default="async", server_default="async")
    sync_budget_ms: Mapped[int] = mapped_column(Integer, default=50, server_default="50")


class Group(Base):
    """A protection group: VMs of ``site`` (matched by name, host or label) replicated to
    ``target_site`` under ``policy``."""

    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    target_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), nullable=True)
    match: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    # a cloud recovery store (S3/Azure) instead of the target site's agent store (migration 0003)
    store_id: Mapped[int | None] = mapped_column(ForeignKey("stores.id"), nullable=True)
    # a drill schedule over the group's protected VMs (migration 0006; vault/drills.py)
    drill: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # multi-VM consistency (migration 0009; vault/barrier.py): group points from a barrier
    consistent: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    barrier_timeout_ms: Mapped[int] = mapped_column(Integer, default=500, server_default="500")
    last_barrier_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_app_barrier_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    # the group this one mirrors (migration 0010): re-protect puts reverse items in a group
    # with reverse_of_id = the forward group; a failback's items go back to reverse_of_id
    reverse_of_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class GroupBarrier(Base):
    """One run of a consistency group's barrier (``vault/barrier.py``); ``state`` ``committed``
    is a group point: ``members[item].point_id`` of every member, all sealed under the hold.

    ``members``: ``{item_id: {host_id, vm_name, prepare, seal, state (pending|held|missed|
    sealing|committed|failed), point_id, point_created_at, held, paused_s, error}}``."""

    __tablename__ = "group_barriers"
    __table_args__ = (Index("ix_group_barriers_group_state", "group_id", "state"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))  # preparing|sealing|committed|partial
    app_consistent: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[float] = mapped_column(Float)
    prepare_deadline: Mapped[float] = mapped_column(Float)
    hold_deadline: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    point_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    members: Mapped[dict[str, Any]] = mapped_column(JSON)
    message: Mapped[str] = mapped_column(Text, default="")


class Item(Base):
    """A protected item: one VM replicated under a group's policy.

    ``status`` is the protection life cycle (``ItemProtection``: enabling → protected →
    disabling → removed, or failed; failing_over → failed_over → committed → reprotected while a
    failover holds it); ``state`` is the replication state (``ItemState``) from the agent's report,
    overridden by the vault to ``critical`` after a permanent failure (``critical_error``).
    ``vm_ref`` ("host_id/vm_id") is set while the item is active, so a VM has one active item.
    """

    __tablename__ = "items"
    # GET /items's order (VM name, then id): a page is read in index order up to its limit
    __table_args__ = (Index("ix_items_vm_name_id", "vm_name", "id"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"))
    vm_id: Mapped[str] = mapped_column(String(128))
    vm_name: Mapped[str] = mapped_column(String(64))
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id"))
    target_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    status: Mapped[ItemProtection] = mapped_column(EnumText(ItemProtection, 16), index=True)
    vm_ref: Mapped[str | None] = mapped_column(String(200), unique=True, nullable=True)
    state: Mapped[str] = mapped_column(String(32))
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    acked_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    last_point_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_app_point_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    retry: Mapped[dict[str, Any]] = mapped_column(JSON)
    critical_error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_cycle_sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_app_cycle_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_retention_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    active_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    health: Mapped[str] = mapped_column(String(16), default=Health.NORMAL.value)
    health_reasons: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # failover (migration 0003): the item this one reverses (re-protect), the failover that
    # holds the item (not committed/cleaned up yet), and the VM spec failover recreates
    origin_item_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    failover_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    vm_spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # scrub (migration 0006): when the current pass was started, and the last report's summary
    last_scrub_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    scrub: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # when the store grant's writer last changed (migration 0008): a failover made the item
    # read-only, a cancel writable again (``storeacl.set_status``); None: not since created_at
    grant_changed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the VM's one identity across failover and failback (migration 0010): the id of the first
    # item that protected it; re-protect's reverse item (and failback's) inherits it
    lineage_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class Point(Base):
    """The recovery-point catalogue (``PointInfo`` dicts reported by agents)."""

    __tablename__ = "points"
    # ix_points_damaged: the few damaged points (scrub.damage_of), without a scan of the catalogue
    __table_args__ = (UniqueConstraint("item_id", "point_id"), Index("ix_points_item_seq", "item_id", "seq"),
                      Index("ix_points_damaged", "item_id", sqlite_where=text("damage IS NOT NULL"),
                            postgresql_where=text("damage IS NOT NULL")))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    point_id: Mapped[str] = mapped_column(String(128))
    seq: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    consistency: Mapped[str] = mapped_column(String(16))
    bytes_written: Mapped[int] = mapped_column(BigInteger)
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    # set when a scrub or a verify found the point cannot be restored (migration 0006):
    # {"reason", "found_at", "by", "objects"}; failover refuses such a point
    damage: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)


class Job(Base):
    """A long operation with ordered tasks (``state``: :class:`JobState`)."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[JobState] = mapped_column(EnumText(JobState, 16), index=True)
    target: Mapped[str] = mapped_column(String(128))
    item_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    args: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class Task(Base):
    """One ordered step of a job. ``data`` holds the task's own resumable facts (e.g. the
    command it sent). ``state``: :class:`TaskState`."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("job_id", "idx"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(128))
    state: Mapped[TaskState] = mapped_column(EnumText(TaskState, 16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Command(Base):
    """A command for an agent, delivered in heartbeat replies.

    ``status`` (:class:`CommandStatus`): pending → sent → running → succeeded / failed (results
    posted by the agent).
    """

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_host_status", "host_id", "status"),
                      # the scheduler reads all open commands once per tick (migration 0002)
                      Index("ix_commands_status", "status"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"))
    item_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    # a cloud store's credentials and keys and an item's point key are sealed at rest
    args: Mapped[dict[str, Any]] = mapped_column(SealedJSON("commands.args", COMMAND_ARG_PATHS))
    status: Mapped[CommandStatus] = mapped_column(EnumText(CommandStatus, 16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Alert(Base):
    """A raised condition. One open alert per ``key``; ``cleared_at`` set when it ends."""

    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)
    raised_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)
    cleared_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    acked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Event(Base):
    """An append-only audit trail (registrations, job transitions, alerts)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)


class Audit(Base):
    """The audit trail (migration 0004): who (``actor_kind`` token/host/anonymous/local and
    ``actor``: token name or host id), from where (``client`` address), what (``action``: the
    route template, or ``agent.*`` / ``store.*`` / ``vault.*`` for facts that are not a call;
    ``target``), when (``at``), how it ended (``outcome`` ok/refused/failed, HTTP ``status``,
    ``error_code``) and non-secret ``detail``. Append-only; never holds a secret."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor_kind: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128), index=True)
    client: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(128))
    target: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class ApiToken(Base):
    """An operator API token; only the sha256 of the secret is stored."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Store(Base):
    """A cloud recovery store (``kind`` s3 or azure). ``config`` is what may be shown (endpoint,
    bucket/container, region, prefix); ``secret`` (credentials) and ``keys`` (encryption keys by
    key id) are never returned by the API nor logged, and are sealed at rest under the vault's
    master key; agents receive them in command arguments over mTLS only."""

    __tablename__ = "stores"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    secret: Mapped[dict[str, Any]] = mapped_column(SealedJSON("stores.secret"))  # sealed at rest
    keys: Mapped[dict[str, Any]] = mapped_column(SealedJSON("stores.keys"))  # sealed at rest
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class NetworkMapping(Base):
    """Source network of ``source_site`` → network on ``recovery_site`` (and → test network),
    with an IP rule (``{"kind": "keep"}``, ``{"kind": "subnet", "source", "target"}``,
    ``{"kind": "fixed", "addresses": {vm: ip}}``)."""

    __tablename__ = "network_mappings"
    __table_args__ = (UniqueConstraint("source_site_id", "recovery_site_id", "source_network"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    recovery_site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    source_network: Mapped[str] = mapped_column(String(64))
    recovery_network: Mapped[str] = mapped_column(String(64))
    test_network: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ip_rule: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class Failover(Base):
    """The vault's record of one failover of one item (the agents keep their own step records).

    ``kind``: test, planned, unplanned. ``state``: :class:`FailoverState`."""

    __tablename__ = "failovers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[FailoverState] = mapped_column(EnumText(FailoverState, 16), index=True)
    point_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    point_created_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    recovery_host_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    vm_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    vm_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    generation: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rto_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    notes: Mapped[list[Any]] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class RecoveryPlan(Base):
    """A recovery plan: ordered groups of items with pre/post actions (``spec``, validated by
    ``vault.plans``)."""

    __tablename__ = "recovery_plans"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class PointKey(Base):
    """An item's point key (``drsite.store.auth``): 32 random bytes, base64, sealed at rest.
    Given to the item's source agent (``protect``), its recovery agent (the store access list)
    and in failover commands; never in an API response. No foreign key: a reverse item's key
    exists before its row (``reprotect_seed`` writes its base). Migration 0005."""

    __tablename__ = "point_keys"
    item_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(SealedJSON("point_keys.key"))
    created_at: Mapped[float] = mapped_column(Float)


class Drill(Base):
    """One drill (migration 0006): a test failover of a recovery plan — or of a protection
    group's VMs (``group``; ``plan`` is then null) — verified, booted, probed and cleaned up.
    ``state``: running, passed, failed; ``trigger``: schedule or hand; ``report``: per VM
    point, RPO, RTO, verification and probe (``vault.drills``)."""

    __tablename__ = "drills"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    group: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    trigger: Mapped[str] = mapped_column(String(16))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ControllerLease(Base):
    """A lease with an epoch (migration 0008): ``name`` ``controller`` is held by the one vault
    process that runs the background work (``vault/controller.py``). ``epoch`` grows by one at
    every acquisition (never at a renewal): a controller's writes check, in their own
    transaction, that the row still names its ``holder`` at its ``epoch`` — the fencing token.
    Times (``expires_at``…) are the database server's clock (PostgreSQL) or the vault's
    (SQLite). ``info`` says who the holder is (host, pid, listen address), never a secret."""

    __tablename__ = "controller_lease"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str | None] = mapped_column(String(200), nullable=True)
    info: Mapped[dict[str, Any]] = mapped_column(JSON)
    acquired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    renewed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float] = mapped_column(Float)


class VaultCa(Base):
    """The vault's CA (migration 0012, row ``ca``): ``cert`` its certificate (PEM), ``key`` its
    private key (PEM), sealed at rest under the master key. The files in ``DATA/pki`` are a
    copy; the database's row is the one a standby vault, its database replicated, takes over
    with (``vault/castate.py``)."""

    __tablename__ = "vault_ca"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    cert: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(SealedJSON("vault_ca.key"))  # sealed at rest
    created_at: Mapped[float] = mapped_column(Float)
