"""Scrub results in the vault: when each item's store is scrubbed, by whom, and what damage means.

- **Who scrubs**: the host that reads the item's store cheaply — the agent serving the target
  site's store (its own files), or for a cloud store the most recently heard host of the target
  site, given the store's spec in the command (as failover commands are). Never the source.
- **When**: a pass starts ``policy.scrub_interval_s`` after the previous pass started
  (``items.last_scrub_at``); a ``scrub`` command works for at most ``SCRUB_BUDGET_S`` at
  ``policy.scrub_rate_bps``; an incomplete pass is continued by the next tick (the agent keeps
  the cursor). One open ``scrub`` command per item.
- **What damage means** (``items.scrub`` holds the last report's summary; ``points.damage``
  marks each point that cannot be restored; only a later proof — ``verify`` — clears a mark):
  damage in the newest point of a protected item is repaired from the source (the scheduler
  sends a ``resync`` that compares the source with what the store can restore) → health
  warning while the repair is pending; the newest point damaged and not repairable (the item
  is not replicating) → health critical: critical only while the newest point cannot be
  restored and no repair has succeeded. Older points whose unique data is gone cannot be
  repaired: once the newest point is intact (a repair committed a new point) they only make
  the item warning, with their count in the reason — they stay marked damaged, are refused as
  failover choices and leave with retention. Failover refuses a damaged point with a message
  naming a command, and ``latest`` falls back to the newest point that is not damaged.

Responsible for: the rules above. Not responsible for: sending (``scheduler``), alerts
(``health``), reading stores (agents, ``store/scrub.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from drsite.core.errors import Conflict
from drsite.core.states import ItemProtection
from drsite.vault.audit import record_event
from drsite.vault.db.models import Group, Host, Item, Point, Policy
from drsite.vault.itemfacts import ItemFacts, ItemRow
from drsite.vault.storeacl import site_store_host
from drsite.vault.stores import item_store_spec

SCRUB_BUDGET_S = 300.0
KEEP_FINDINGS = 50


@dataclass(frozen=True)
class Damage:
    """An item's damaged points (``point_id -> reason``) and its newest catalogued point."""

    points: dict[str, str] = field(default_factory=dict)
    newest: str | None = None

    @property
    def newest_damaged(self) -> bool:
        return self.newest is not None and self.newest in self.points

    @property
    def older(self) -> list[str]:
        return sorted(p for p in self.points if p != self.newest)


def damage_of(s: Session, item_ids: list[str] | None = None) -> dict[str, Damage]:
    """The damage of every item with a damaged point (of ``item_ids``, or of all): two queries."""
    q = select(Point.item_id, Point.point_id, Point.damage).where(Point.damage.is_not(None))
    if item_ids is not None:
        q = q.where(Point.item_id.in_(item_ids))
    bad: dict[str, dict[str, str]] = {}
    for item_id, point_id, dmg in s.execute(q):
        bad.setdefault(item_id, {})[point_id] = str((dmg or {}).get("reason") or "damaged")
    if not bad:
        return {}
    top = (select(Point.item_id, func.max(Point.seq).label("seq"))
           .where(Point.item_id.in_(sorted(bad))).group_by(Point.item_id).subquery())
    newest: dict[str, str] = {}
    for item_id, pid in s.execute(
            select(Point.item_id, Point.point_id)
            .join(top, (Point.item_id == top.c.item_id) & (Point.seq == top.c.seq))
            .order_by(Point.item_id, Point.point_id)):
        newest.setdefault(item_id, pid)  # one per item, whatever the number of damaged items
    return {i: Damage(p, newest.get(i)) for i, p in bad.items()}


def damage_reasons(item: Item | ItemFacts | ItemRow,
                   damage: Damage | None) -> tuple[bool, bool, list[str]]:
    """(warning, critical, reasons) of an item's store damage: critical only for a damaged
    newest point that cannot be repaired (the item is not protected); a damaged newest point
    being repaired, and damaged older points, are warnings."""
    if damage is None or not damage.points:
        return False, False, []
    warn = crit = False
    reasons: list[str] = []
    if damage.newest_damaged:
        assert damage.newest is not None
        why = damage.points[damage.newest]
        if item.status == ItemProtection.PROTECTED:
            warn = True
            reasons.append(f"the newest recovery point {damage.newest} is damaged in the store "
                           f"({why}); it is being repaired from the source (a resync against "
                           "what the store can restore)")
        else:
            crit = True
            reasons.append(f"the newest recovery point {damage.newest} cannot be restored ({why})"
                           f" and cannot be repaired while the item is {item.status}")
    older = damage.older
    if older:
        # unrepairable, but the newest point (or its repair) still recovers the VM: warning
        warn = True
        shown = ", ".join(older[:3]) + (f" and {len(older) - 3} more" if len(older) > 3 else "")
        reasons.append(f"{len(older)} older recovery point(s) cannot be restored ({shown}): their "
                       f"data in the recovery store is damaged ({damage.points[older[0]]}); "
                       f"failover to them is refused and they leave with retention; see "
                       f"'drsite items verify {item.id} --all'")
    return warn, crit, reasons


# ------------------------------------------------------------------------------- scheduling

def scrub_host(s: Session, item: Item) -> tuple[Host | None, dict[str, Any] | None]:
    """The host that scrubs the item's store, and the cloud store's spec (None: a site store)."""
    group = s.get(Group, item.group_id)
    spec = item_store_spec(s, item)
    if group is None or group.store_id is None:
        return site_store_host(s, item.target_site_id), spec   # the site's store host only
    q = select(Host).where(Host.site_id == item.target_site_id, Host.revoked_at.is_(None))
    host = s.scalars(q.order_by(Host.last_heartbeat.desc())).first()
    return host, spec


def scrub_due(item: Item | ItemFacts, policy: Policy, now: float) -> bool | None:
    """None: no scrub now; True: start a new pass; False: continue the current pass."""
    if policy.scrub_interval_s is None or item.status != ItemProtection.PROTECTED \
            or item.last_point_time is None:
        return None
    last = dict(item.scrub or {})
    if last.get("complete") is False and not last.get("error"):
        return False
    if item.last_scrub_at is None or now - item.last_scrub_at >= policy.scrub_interval_s:
        return True
    return None


def scrub_args(policy: Policy, spec: dict[str, Any] | None,
               point_key: str | None) -> dict[str, Any]:
    """A ``scrub`` command's arguments. ``point_key``: the item's key, so the scrubbing host
    checks that every manifest is authentic (a cloud store's scrub host may hold no key of its
    own); scrubbed from the command when it ends, like every point key."""
    args: dict[str, Any] = {"rate_bps": policy.scrub_rate_bps, "budget_s": SCRUB_BUDGET_S}
    if spec is not None:
        args["store"] = spec
    if point_key is not None:
        args["point_key"] = point_key
    return args


def repair_due(item: Item | ItemFacts) -> str | None:
    """The reason for a repair resync when the last scrub found the newest point damaged and no
    repair was sent for it yet (None otherwise)."""
    sc = dict(item.scrub or {})
    latest = sc.get("latest_point")
    if not sc.get("latest_damaged") or not latest or sc.get("repair_for") == latest:
        return None
    # a delta point committed since shares the damaged data it did not rewrite: the repair
    # compares the source with the store's newest point, whichever it is
    return f"scrub found damage in the newest point {latest}"


# ------------------------------------------------------------------------------- results

def _mark(s: Session, item: Item, points: dict[str, str], now: float, by: str) -> list[str]:
    """Mark catalogued points damaged; returns the newly marked ids."""
    if not points:
        return []
    new: list[str] = []
    for p in s.scalars(select(Point).where(Point.item_id == item.id,
                                           Point.point_id.in_(sorted(points)))):
        if p.damage is None:
            p.damage = {"reason": points[p.point_id][:500], "found_at": now, "by": by}
            new.append(p.point_id)
    if new:
        record_event(s, now, "item", item.id,
                     f"{item.vm_name}: {len(new)} recovery point(s) marked damaged by {by}: "
                     f"{', '.join(sorted(new)[:5])}")
    return new


def apply_scrub(s: Session, item: Item, report: dict[str, Any], host: str, now: float) -> None:
    """A scrub command's report: the item's scrub summary and its damaged points."""
    findings = list(report.get("findings") or [])
    per_point: dict[str, str] = {}
    for f in findings:
        for p in f.get("points") or []:
            per_point.setdefault(str(p), f"{f.get('kind')} object {f.get('key')}")
    prev = dict(item.scrub or {})
    summary = {k: report.get(k) for k in (
        "pass_started_at", "finished_at", "complete", "objects_checked", "bytes_checked",
        "packs_total", "packs_done", "latest_point", "latest_damaged", "damaged_points",
        "rate_bps", "seconds")}
    summary.update(at=now, host=host, findings=findings[:KEEP_FINDINGS],
                   findings_total=len(findings), error=None)
    for k in ("repair_for", "repair_sent_at"):
        if k in prev:
            summary[k] = prev[k]
    item.scrub = summary
    _mark(s, item, per_point, now, "scrub")
    item.updated_at = now


def apply_scrub_failure(item: Item, error: dict[str, Any], host: str, now: float) -> None:
    item.scrub = {**dict(item.scrub or {}), "at": now, "host": host, "error": error,
                  "complete": None}


def apply_verify(s: Session, item: Item, verify: dict[str, Any], now: float) -> None:
    """A verify's proofs: damaged points are marked; a point proven whole is unmarked."""
    bad: dict[str, str] = {}
    good: list[str] = []
    for p in verify.get("points") or []:
        pid = str(p.get("point_id"))
        if p.get("ok"):
            good.append(pid)
        else:
            errs = [e for d in p.get("disks") or [] for e in d.get("errors") or []]
            bad[pid] = str(p.get("error") or (errs[0] if errs else "damaged"))
    _mark(s, item, bad, now, "verify")
    if good:
        for row in s.scalars(select(Point).where(Point.item_id == item.id,
                                                 Point.point_id.in_(good),
                                                 Point.damage.is_not(None))):
            row.damage = None
            record_event(s, now, "item", item.id,
                         f"{item.vm_name}: point {row.point_id} proven whole by verify")


# ------------------------------------------------------------------------------- failover

def failover_point(s: Session, item: Item, choice: str) -> tuple[str, str | None]:
    """The point a failover may use for ``choice`` (``latest``, ``latest_app`` or an id):
    ``Conflict`` for a damaged point chosen by id; ``latest``/``latest_app`` fall back to the
    newest such point that is not damaged. Returns (choice to send, note or None)."""
    rows = s.scalars(select(Point).where(Point.item_id == item.id).order_by(Point.seq)).all()
    if choice not in ("latest", "latest_app"):
        row = next((p for p in rows if p.point_id == choice), None)
        if row is not None and row.damage is not None:
            intact = [p.point_id for p in rows if p.damage is None]
            alt = f" (newest intact point: {intact[-1]})" if intact else ""
            raise Conflict(
                f"recovery point {choice} of {item.vm_name} cannot be restored: its data in the "
                f"recovery store is damaged ({(row.damage or {}).get('reason')}){alt}",
                hint=f"Choose another point ('drsite items points {item.id}' lists them and "
                     f"their damage), or check it again with 'drsite items verify {item.id} "
                     f"--point {choice}'.")
        return choice, None
    cands = [p for p in rows if choice == "latest" or p.consistency == "app"]
    if not cands or cands[-1].damage is None:
        return choice, None
    good = [p for p in cands if p.damage is None]
    if not good:
        raise Conflict(f"every {'app-consistent ' if choice == 'latest_app' else ''}recovery "
                       f"point of {item.vm_name} is damaged in the recovery store",
                       hint=f"See 'drsite items verify {item.id} --all'; a resync "
                            f"('drsite items resync {item.id}') makes a new intact point.")
    note = (f"the newest {'app-consistent ' if choice == 'latest_app' else ''}point "
            f"{cands[-1].point_id} is damaged in the store; using {good[-1].point_id}")
    return good[-1].point_id, note
