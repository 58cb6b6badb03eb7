"""Prometheus text for ``GET /api/v1/metrics``, read from the database at scrape time.

Series: ``drsite_item_rpo_seconds{item,vm}``, ``drsite_item_health{item,vm,health}`` (1 for the
current one), ``drsite_item_bytes_sent_total`` / ``drsite_item_bytes_stored_total`` (lifetime
counters from the agents' reports), ``drsite_item_churn_bytes_per_second`` (bytes written into
recovery points over the last hour, per second), ``drsite_jobs{kind,state}``,
``drsite_agent_up{host,site}``, ``drsite_alerts_active{severity}``,
``drsite_item_damaged_points{item,vm}`` (points that cannot be restored),
``drsite_item_scrub_bytes_checked{item,vm}`` and ``drsite_item_scrub_completed_timestamp``
(the last scrub report), ``drsite_drill_passed{plan}`` and ``drsite_group_drill_passed{group}``
(1/0, the latest finished drill).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from drsite.core.states import LIVE_ITEM_STATUSES
from drsite.replication.report import Health
from drsite.vault.db.database import Database
from drsite.vault.db.models import Alert, Drill, Host, Item, Job, Point, Site
from drsite.vault.health import agent_up
from drsite.vault.scrub import damage_of
from drsite.vault.settings import VaultSettings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CHURN_WINDOW_S = 3600.0


class VaultCollector(Collector):
    def __init__(self, db: Database, settings: VaultSettings) -> None:
        self.db = db
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        now = self.settings.clock.now()
        rpo = GaugeMetricFamily("drsite_item_rpo_seconds", "Age of the newest committed recovery point",
                                labels=["item", "vm"])
        health = GaugeMetricFamily("drsite_item_health", "Health of each protected item (1 = current)",
                                   labels=["item", "vm", "health"])
        sent = CounterMetricFamily("drsite_item_bytes_sent", "Bytes shipped by the item's agent",
                                   labels=["item", "vm"])
        stored = CounterMetricFamily("drsite_item_bytes_stored", "Bytes that reached the recovery store",
                                     labels=["item", "vm"])
        churn = GaugeMetricFamily("drsite_item_churn_bytes_per_second",
                                  "Bytes written into recovery points over the last hour, per second",
                                  labels=["item", "vm"])
        jobs = GaugeMetricFamily("drsite_jobs", "Jobs by kind and state", labels=["kind", "state"])
        up = GaugeMetricFamily("drsite_agent_up", "1 when the agent sends heartbeats",
                               labels=["host", "site"])
        alerts = GaugeMetricFamily("drsite_alerts_active", "Open alerts", labels=["severity"])
        damaged = GaugeMetricFamily("drsite_item_damaged_points",
                                    "Recovery points whose data in the store is damaged",
                                    labels=["item", "vm"])
        scrubbed = GaugeMetricFamily("drsite_item_scrub_bytes_checked",
                                     "Bytes read and hash-checked by the last scrub call",
                                     labels=["item", "vm"])
        scrub_done = GaugeMetricFamily("drsite_item_scrub_completed_timestamp",
                                       "When the last complete scrub pass ended",
                                       labels=["item", "vm"])
        drill_ok = GaugeMetricFamily("drsite_drill_passed", "1 when the plan's latest drill "
                                     "passed, 0 when it failed", labels=["plan"])
        group_drill_ok = GaugeMetricFamily("drsite_group_drill_passed", "1 when the protection "
                                           "group's latest drill passed, 0 when it failed",
                                           labels=["group"])
        with self.db.read() as s:
            churn_by_item = dict(s.execute(
                select(Point.item_id, func.sum(Point.bytes_written))
                .where(Point.created_at >= now - CHURN_WINDOW_S).group_by(Point.item_id)).all())
            damage = damage_of(s)
            live = select(Item).where(Item.status.in_(LIVE_ITEM_STATUSES))
            for item in s.scalars(live):
                labels = [item.id, item.vm_name]
                if item.last_point_time is not None:
                    rpo.add_metric(labels, max(0.0, now - item.last_point_time))
                for h in Health:
                    health.add_metric([*labels, h.value], 1.0 if item.health == h else 0.0)
                report = item.report or {}
                sent.add_metric(labels, float(report.get("bytes_sent") or 0))
                stored.add_metric(labels, float(report.get("bytes_stored") or 0))
                churn.add_metric(labels, float(churn_by_item.get(item.id) or 0) / CHURN_WINDOW_S)
                damaged.add_metric(labels, float(len(damage[item.id].points))
                                   if item.id in damage else 0.0)
                sc = item.scrub or {}
                scrubbed.add_metric(labels, float(sc.get("bytes_checked") or 0))
                if sc.get("finished_at"):
                    scrub_done.add_metric(labels, float(sc["finished_at"]))
            for kind, state, n in s.execute(select(Job.kind, Job.state, func.count())
                                            .group_by(Job.kind, Job.state)):
                jobs.add_metric([kind, state.value], float(n))
            sites = {site.id: site.name for site in s.scalars(select(Site))}
            for host in s.scalars(select(Host).where(Host.revoked_at.is_(None))):
                up.add_metric([host.name, sites.get(host.site_id, "")],
                              1.0 if agent_up(host, now, self.settings) else 0.0)
            for sev, n in s.execute(select(Alert.severity, func.count()).where(Alert.cleared_at.is_(None))
                                    .group_by(Alert.severity)):
                alerts.add_metric([sev], float(n))
            done = s.execute(select(Drill.plan, Drill.group, Drill.state)
                             .where(Drill.state != "running").order_by(Drill.started_at)).all()
            by_plan = {str(p): str(st) for p, _g, st in done if p is not None}
            by_group = {str(g): str(st) for _p, g, st in done if g is not None}
            for plan, outcome in by_plan.items():
                drill_ok.add_metric([plan], 1.0 if outcome == "passed" else 0.0)
            for group, outcome in by_group.items():
                group_drill_ok.add_metric([group], 1.0 if outcome == "passed" else 0.0)
        yield from (rpo, health, sent, stored, churn, jobs, up, alerts, damaged, scrubbed,
                    scrub_done, drill_ok, group_drill_ok)


def render(db: Database, settings: VaultSettings) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VaultCollector(db, settings))
    return generate_latest(registry)
