"""Task body of the Verify job: prove recovery points restore to what their manifests say.

One task sends ``verify`` to the host that reads the item's store cheaply (as a scrub does,
``vault/scrub.py``), with the points asked for (``latest``, ``all`` or one id), waits for it and
keeps the report (per point, per disk: bytes read, digest or damaged ranges) in its data
(``GET /items/{id}/verifications/{job_id}``). Damaged points are marked in the catalogue, a
point proven whole is unmarked; any damage fails the job (so ``drsite items verify`` exits
non-zero). The job does not hold the item: replication goes on while it reads.
"""

from __future__ import annotations

from drsite.core.errors import CorruptData
from drsite.core.states import JobState
from drsite.vault import storeacl
from drsite.vault.jobs.failover import run_command
from drsite.vault.jobs.model import JobHandlers, Step, TaskContext, done
from drsite.vault.scrub import apply_verify, scrub_host


def verify_points(ctx: TaskContext) -> Step:
    item = ctx.item()
    host, spec = scrub_host(ctx.s, item)
    args: dict[str, object] = {"points": ctx.job.args.get("points") or "latest",
                               "point_key": storeacl.point_key(ctx.s, item.id, ctx.now)}
    if spec is not None:
        args["store"] = spec
    got = run_command(ctx, host, "verify", args, item_id=item.id, progress=10.0)
    if isinstance(got, Step):
        return got
    report = dict((got.result or {}).get("verify") or {})
    apply_verify(ctx.s, item, report, ctx.now)
    ctx.put(report=report)
    points = list(report.get("points") or [])
    bad = [p for p in points if not p.get("ok")]
    read = sum(int(p.get("bytes_read") or 0) for p in points)
    if bad:
        first = bad[0]
        errs = [e for d in first.get("disks") or [] for e in d.get("errors") or []]
        raise CorruptData(
            f"{len(bad)} of {len(points)} recovery point(s) of {item.vm_name} cannot be restored "
            f"({', '.join(str(p.get('point_id')) for p in bad[:5])}): "
            f"{first.get('error') or (errs[0] if errs else 'damaged')}",
            hint=f"They are marked damaged and refused for failover. 'drsite items resync "
                 f"{item.id}' repairs the newest point from the source; older points cannot "
                 "be repaired.")
    return done(f"{len(points)} recovery point(s) of {item.vm_name} restore exactly to their "
                f"manifests ({read} bytes read and checked)")


def verify_on_end(ctx: TaskContext, state: JobState) -> None:
    return None


VERIFY_HANDLERS = JobHandlers(tasks={"verify_points": verify_points}, on_end=verify_on_end)
