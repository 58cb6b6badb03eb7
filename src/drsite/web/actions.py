"""The dashboard's actions: every one a confirmation page (GET, no side effect) that says what
will happen — and, when the vault would refuse it now, why and what to do, with the button
disabled — then a POST that calls the API's own operation and redirects (303) to the job.

A VM's actions (``/ui/items/{id}/act/{action}``): test failover (point, test VM name) and its
cleanup (notes), planned and unplanned failover (point), commit (re-protect, reverse network
mappings), cancel, change of recovery point (point), resync, re-protect, failback; verify
(``/ui/items/{id}/verify``). A plan's (``/ui/plans/{name}/{action}``) and its drill now
(``/ui/plans/{name}/drill``), a job's (cancel, resume), an alert's acknowledgement.

The point picker: latest, latest app-consistent, or any point of the catalogue (the newest on
the page, with absolute times; every point on the points list, which links back here with the
point chosen, as the VM page's timeline marks do).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from drsite.core.actions import (
    ITEM_ACTIONS,
    PLAN_ACTIONS,
    POINT_ACTIONS,
    POINT_CHOICES,
    FailoverAction,
)
from drsite.core.errors import DrsiteError, InvalidInput, NotFound
from drsite.vault.context import Vault
from drsite.web import data
from drsite.web import handlers as H
from drsite.web.lists import ListQuery
from drsite.web.session import WebUser, current_user

router = APIRouter(include_in_schema=False)

A = FailoverAction
PICKER_POINTS = 50  # newest points offered on a confirmation page; the list has every one

# label, what will happen, disruptive
ITEM_TEXT: dict[str, tuple[str, str, bool]] = {
    A.TEST_FAILOVER: (
        "Test failover",
        "Starts a copy of the VM from the chosen recovery point in the isolated test network, "
        "on a copy-on-write view of the replica. Replication goes on and the production VM is "
        "not touched. Clean the test failover up when you are done.", False),
    A.CLEANUP_TEST_FAILOVER: (
        "Clean up test failover",
        "Stops and deletes the test VM and its copy-on-write images, and keeps your notes with "
        "the test failover. Recovery points and replication are not affected.", False),
    A.PLANNED_FAILOVER: (
        "Planned failover",
        "Shuts the VM down, ships its last changes and starts the replica on the recovery site: "
        "no data is lost (the replica is proven equal to the stopped source first). The source "
        "stays off. Commit afterwards (it re-protects), or cancel to hand the VM back.", True),
    A.UNPLANNED_FAILOVER: (
        "Unplanned failover",
        "Starts the replica on the recovery site from the chosen recovery point without waiting "
        "for the source site (use it when the source is down): changes made after that point "
        "are lost. The old primary is fenced as soon as its agent can be reached. Commit, then "
        "re-protect once the source site is back.", True),
    A.COMMIT: (
        "Commit the failover",
        "Ends the failover: the recovery VM keeps running from the point it started on, and the "
        "VM's other recovery points are discarded; the point can no longer be changed. After a "
        "planned failover the VM is re-protected at once: it replicates back to its old site.",
        True),
    A.CANCEL: (
        "Cancel the failover",
        "Deletes the recovery VM of the uncommitted failover and hands the VM back to the source "
        "site (after a planned failover its source VM is powered on again).", True),
    A.CHANGE_POINT: (
        "Change the recovery point",
        "Stops and deletes the recovery VM and starts it again from the chosen recovery point "
        "(same name and networks). Changes made in the recovery VM since it started are lost.",
        True),
    A.REPROTECT: (
        "Re-protect",
        "Reverses replication: the failed-over VM replicates back to its old site, resyncing "
        "against the old primary's disks so that only differences travel. Its networks need a "
        "mapping back (below).", False),
    A.FAILBACK: (
        "Fail back",
        "A planned failover back to the site the VM came from: the VM is shut down on the "
        "recovery site, its last changes shipped, and the original VM re-created from them (no "
        "data lost). Commit afterwards to replicate it forward again.", True),
    "resync": (
        "Resync",
        "Compares the VM's disks with what the recovery store restores, 64 KiB block by block "
        "by checksums, and sends only the blocks that differ, now (outside the resync window "
        "too). Replication goes on afterwards.", False),
}
ITEM_KEYS = (*(a.value for a in ITEM_ACTIONS), "resync")
PLAN_TEXT: dict[str, tuple[str, str, bool]] = {
    A.TEST_FAILOVER: (
        "Test failover",
        "Starts every VM of the plan, group by group, from its latest recovery point in the "
        "isolated test network, on a copy-on-write view of the replica. Replication goes on and "
        "production VMs are not touched. Clean the test failover up when you are done.", False),
    A.CLEANUP_TEST_FAILOVER: (
        "Clean up test failover",
        "Stops and deletes the plan's test VMs and their copy-on-write images. Recovery points "
        "and replication are not affected.", False),
    A.PLANNED_FAILOVER: (
        "Planned failover",
        "Shuts the source VMs down, ships their last changes, then starts the replicas on the "
        "recovery site group by group, running the plan's pre and post actions: no data is lost. "
        "The source VMs stay off. Commit afterwards to end the failover.", True),
    A.UNPLANNED_FAILOVER: (
        "Unplanned failover",
        "Starts the replicas on the recovery site from the chosen recovery point without waiting "
        "for the source site (use it when the source is down). Changes made after that point are "
        "lost, and the VMs stay unprotected until you re-protect them.", True),
    A.COMMIT: (
        "Commit",
        "Ends the failover: the recovery VMs keep running from the point they started on, and the "
        "other recovery points of those VMs are discarded. The point can no longer be changed.",
        True),
    A.CANCEL: (
        "Cancel failover",
        "Deletes the recovery VMs of the uncommitted failover and hands the VMs back to the "
        "source site.", True),
    A.REPROTECT: (
        "Re-protect",
        "Reverses replication: the failed-over VMs replicate back to the original site, resyncing "
        "against the old primary disks so that only differences travel.", True),
    A.FAILBACK: (
        "Fail back",
        "A planned failover of every re-protected VM of the plan back to the site it came from, "
        "group by group (no data lost). Commit afterwards.", True),
}
POINT_LABELS = {"latest": "Latest recovery point (lowest RPO)",
                "latest_app": "Latest app-consistent recovery point",
                "latest_group": "Latest multi-VM consistent point (consistent groups)"}
# the dashboard offers exactly the choices the API takes (a choice added there fails here)
PLAN_POINTS = tuple((c, POINT_LABELS[c]) for c in POINT_CHOICES)
VERIFY_WHAT = ("Reads the chosen recovery points whole from the recovery store, on the host that "
               "serves it, checking every piece of data against its hash, and records each disk's "
               "digest. A point that cannot be restored exactly is marked damaged and refused for "
               "failover (the job fails); a point proven whole loses an earlier damage mark. "
               "Replication goes on meanwhile; nothing is changed in the store.")
VERIFY_CHOICES = (("latest", "The newest recovery point"), ("all", "Every kept recovery point"))


def confirm_ctx(title: str, label: str, what: str, action_url: str, back: str, danger: bool,
                fields: list[dict[str, Any]] | None = None,
                refusal: DrsiteError | None = None) -> dict[str, Any]:
    """A confirmation page: what will happen, the fields to fill, and — when the vault would
    refuse the action now — the refusal with its hint (the button is then disabled)."""
    return {"title": title, "label": label, "what": what, "action_url": action_url,
            "back": back, "danger": danger, "fields": fields or [], "error": refusal,
            "refused": refusal is not None, "values": {}}


# ---------------------------------------------------------------------------- a VM's actions

def _item_fields(vault: Vault, user: WebUser, item: dict[str, Any], action: str,
                 chosen: str | None, failover: dict[str, Any] | None) -> list[dict[str, Any]]:
    fields: list[dict[str, Any]] = []
    if action in POINT_ACTIONS:
        query = ListQuery(f"/ui/items/{item['id']}/points", sort="created_at", desc=True,
                          limit=PICKER_POINTS)
        page = data.points_page(vault, user, item["id"], query)["page"]
        fields.append({"type": "point", "name": "point", "points": page.rows,
                       "total": page.total, "selected": chosen or "latest",
                       "more": f"/ui/items/{quote(item['id'])}/points?pick={action}"})
    if action == A.TEST_FAILOVER:
        fields.append({"type": "text", "name": "vm_name", "label": "Test VM name",
                       "placeholder": f"{item['vm_name']}-test", "maxlength": 63})
    if action == A.CLEANUP_TEST_FAILOVER:
        fields.append({"type": "textarea", "name": "notes", "maxlength": 2000,
                       "label": "Notes: what the test showed (kept with the test failover)"})
    if action == A.COMMIT and failover is not None and failover.get("kind") == "planned":
        fields.append({"type": "checkbox", "name": "reprotect", "checked": True,
                       "label": "Re-protect at once (the VM replicates back to its old site)"})
    if action in (A.COMMIT, A.REPROTECT):
        fields.append({"type": "checkbox", "name": "create_reverse_mapping", "checked": False,
                       "label": "Create the missing network mappings back (the forward ones "
                                "inverted); without them re-protect is refused"})
    return fields


def _item_confirm(vault: Vault, user: WebUser, item_id: str, action: str,
                  chosen: str | None = None) -> dict[str, Any]:
    if action not in ITEM_KEYS:
        raise NotFound(f"no VM action {action!r}", hint=f"Use one of {', '.join(ITEM_KEYS)}.")
    item = data.item(vault, user, item_id)
    label, what, danger = ITEM_TEXT[action]
    failover = data.open_failover(vault, item)
    refusal = data.refusal(vault, item["id"], action, {"create_reverse_mapping": True}
                           if action in (A.COMMIT, A.REPROTECT) else {})
    url = f"/ui/items/{quote(item['id'])}/act/{action}"
    return confirm_ctx(f"{label} of {item['vm_name']}", label.lower(), what, url,
                       f"/ui/items/{quote(item['id'])}", danger,
                       _item_fields(vault, user, item, action, chosen, failover), refusal)


@router.get("/ui/items/{item_id}/act/{action}")
def item_action_confirm(request: Request, item_id: str, action: str) -> Response:
    chosen = request.query_params.get("point")
    return H.view(request, "confirm.html", "vms",
                  lambda v, u: _item_confirm(v, u, item_id, action, chosen))


def _item_args(action: str, fields: dict[str, str]) -> dict[str, Any]:
    """The API body of a VM action from its form."""
    args: dict[str, Any] = {}
    if action in POINT_ACTIONS:
        point = fields.get("point") or "latest"
        if point == "other":  # the picker's free field
            point = (fields.get("point_id") or "").strip()
        args["point"] = point
    if action == A.TEST_FAILOVER and (fields.get("vm_name") or "").strip():
        args["vm_name"] = fields["vm_name"].strip()
    if action == A.CLEANUP_TEST_FAILOVER and fields.get("notes"):
        args["notes"] = fields["notes"][:2000]
    if action == A.COMMIT and fields.get("reprotect_shown") == "1":  # the box was offered
        args["reprotect"] = fields.get("reprotect") == "on"
    if action in (A.COMMIT, A.REPROTECT) and fields.get("create_reverse_mapping") == "on":
        args["create_reverse_mapping"] = True
    return args


@router.post("/ui/items/{item_id}/act/{action}")
async def item_action(request: Request, item_id: str, action: str) -> Response:
    def run(vault: Vault, user: WebUser, fields: dict[str, str]) -> str:
        job_id = data.start_item_action(vault, user, item_id, action, _item_args(action, fields))
        return f"/ui/jobs/{quote(job_id)}"

    return await H.act(request, lambda v, u: _item_confirm(v, u, item_id, action), "vms", run)


def _verify_confirm(vault: Vault, user: WebUser, item_id: str) -> dict[str, Any]:
    data.item(vault, user, item_id)  # 404 for an unknown item, as the page
    return confirm_ctx(f"Verify the recovery points of item {item_id}", "verify", VERIFY_WHAT,
                       f"/ui/items/{quote(item_id)}/verify", f"/ui/items/{quote(item_id)}",
                       False, [{"type": "choice", "name": "point", "choices": VERIFY_CHOICES,
                                "selected": "latest", "legend": "Recovery points"}],
                       data.allowed(vault, item_id)["verify"])


@router.get("/ui/items/{item_id}/verify")
def verify_confirm(request: Request, item_id: str) -> Response:
    return H.view(request, "confirm.html", "vms", lambda v, u: _verify_confirm(v, u, item_id))


@router.post("/ui/items/{item_id}/verify")
async def verify(request: Request, item_id: str) -> Response:
    def run(vault: Vault, user: WebUser, fields: dict[str, str]) -> str:
        which = fields.get("point", "latest")
        if which not in dict(VERIFY_CHOICES):
            raise InvalidInput(f"unknown choice {which!r}: verify the newest point or all points")
        return f"/ui/jobs/{quote(data.start_verify(vault, user, item_id, which))}"

    return await H.act(request, lambda v, u: _verify_confirm(v, u, item_id), "vms", run)


# ------------------------------------------------------------------------- a plan's drill

DRILL_WHAT = ("Runs the plan's test failover now, from each VM's latest recovery point, in the "
              "isolated test network; verifies each test VM's disks against its recovery point, "
              "boots it and runs the plan's probe (if the plan has one); then cleans the test "
              "VMs up and records the drill's report (RPO, RTO, what failed). Production VMs "
              "and replication are not touched.")


def _drill_confirm(vault: Vault, name: str) -> dict[str, Any]:
    data.plan(vault, name)  # 404 for an unknown plan
    why = data.plan_allowed(vault, name).get(A.TEST_FAILOVER.value)
    refusal = InvalidInput(f"no VM of the plan can have a test failover now: {why}",
                           hint="Each VM's page says what it can do.") if why else None
    return confirm_ctx(f"Drill of recovery plan {name}", "run the drill", DRILL_WHAT,
                       f"/ui/plans/{quote(name)}/drill", f"/ui/plans/{quote(name)}", False,
                       refusal=refusal)


# declared before the plan's actions: "drill" is not a failover action of /ui/plans/{name}/{action}
@router.get("/ui/plans/{name}/drill")
def drill_confirm(request: Request, name: str) -> Response:
    return H.view(request, "confirm.html", "plans", lambda v, u: _drill_confirm(v, name))


@router.post("/ui/plans/{name}/drill")
async def drill(request: Request, name: str) -> Response:
    def run(vault: Vault, user: WebUser, _fields: dict[str, str]) -> str:
        return f"/ui/drills/{quote(data.start_drill(vault, user, name))}"

    return await H.act(request, lambda v, u: _drill_confirm(v, name), "plans", run)


# ------------------------------------------------------------------------- a plan's actions

def _plan_confirm(vault: Vault, name: str, action: str) -> dict[str, Any]:
    try:
        act = FailoverAction.parse(action, PLAN_ACTIONS)
    except InvalidInput as e:
        raise NotFound(f"no plan action {action!r}", hint=e.hint) from None
    data.plan(vault, name)  # 404 for an unknown plan
    label, what, danger = PLAN_TEXT[act]
    fields: list[dict[str, Any]] = []
    if act in POINT_ACTIONS:
        fields.append({"type": "choice", "name": "point", "choices": PLAN_POINTS,
                       "selected": "latest", "legend": "Recovery point"})
    if act is A.CLEANUP_TEST_FAILOVER:
        fields.append({"type": "textarea", "name": "notes", "maxlength": 2000,
                       "label": "Notes: what the test showed (kept with each VM's test failover)"})
    if act in (A.COMMIT, A.REPROTECT):
        fields.append({"type": "checkbox", "name": "create_reverse_mapping", "checked": False,
                       "label": "Create the missing network mappings back (the forward ones "
                                "inverted)"})
    why = data.plan_allowed(vault, name).get(act.value)
    refusal = InvalidInput(f"no VM of the plan can {act.words} now: {why}",
                           hint="Each VM's page says what it can do.") if why else None
    return confirm_ctx(f"{label} of recovery plan {name}", label.lower(), what,
                       f"/ui/plans/{quote(name)}/{act.value}", f"/ui/plans/{quote(name)}",
                       danger, fields, refusal)


@router.get("/ui/plans/{name}/{action}")
def plan_action_confirm(request: Request, name: str, action: str) -> Response:
    return H.view(request, "confirm.html", "plans", lambda v, u: _plan_confirm(v, name, action))


@router.post("/ui/plans/{name}/{action}")
async def plan_action(request: Request, name: str, action: str) -> Response:
    def run(vault: Vault, _user: WebUser, fields: dict[str, str]) -> str:
        act = FailoverAction.parse(action, PLAN_ACTIONS)  # a known action: _plan_confirm said so
        args: dict[str, Any] = {}
        if act in POINT_ACTIONS:
            point = fields.get("point", "latest")
            if point not in dict(PLAN_POINTS):
                raise InvalidInput(f"unknown recovery point choice {point!r}")
            args["point"] = point
        if act is A.CLEANUP_TEST_FAILOVER and fields.get("notes"):
            args["notes"] = fields["notes"][:2000]
        if fields.get("create_reverse_mapping") == "on":
            args["create_reverse_mapping"] = True
        return f"/ui/jobs/{quote(data.start_plan_action(vault, name, act.value, args))}"

    return await H.act(request, lambda v, u: _plan_confirm(v, name, action), "plans", run)


# ------------------------------------------------------------------------- jobs and alerts

def _job_confirm(job_id: str, action: str) -> dict[str, Any]:
    if action == "cancel":
        return confirm_ctx(f"Cancel job {job_id}", "cancel the job",
                           "Asks the job to stop at its next task boundary. An EnableProtection "
                           "job is rolled back (the replica is removed); other jobs stop where "
                           "they are.", f"/ui/jobs/{quote(job_id)}/cancel",
                           f"/ui/jobs/{quote(job_id)}", True)
    if action == "resume":
        return confirm_ctx(f"Resume job {job_id}", "resume the job",
                           "The job is paused at a manual step of its recovery plan. Resume it "
                           "once that step is done: the plan goes on with its next action or "
                           "group.", f"/ui/jobs/{quote(job_id)}/resume",
                           f"/ui/jobs/{quote(job_id)}", False)
    raise NotFound(f"no job action {action!r}", hint="Use cancel or resume.")


@router.get("/ui/jobs/{job_id}/{action}")
def job_action_confirm(request: Request, job_id: str, action: str) -> Response:
    return H.view(request, "confirm.html", "jobs", lambda v, u: _job_confirm(job_id, action))


@router.post("/ui/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: str, action: str) -> Response:
    vault = H.vault_of(request)
    try:
        confirm = _job_confirm(job_id, action)
    except NotFound as e:
        user = await run_in_threadpool(current_user, request, vault)
        return H.error(vault, user, e, 404)

    def run(vault: Vault, user: WebUser, _fields: dict[str, str]) -> str:
        if action == "cancel":
            data.cancel_job(vault, user, job_id)
        else:
            data.resume_job(vault, job_id)
        return f"/ui/jobs/{quote(job_id)}"

    return await H.act(request, lambda v, u: confirm, "jobs", run)


@router.post("/ui/alerts/{alert_id}/ack")
async def ack(request: Request, alert_id: str) -> Response:
    checked = await H.checked_post(request)
    if isinstance(checked, Response):
        return checked
    vault, user, fields = checked
    try:
        await run_in_threadpool(data.ack_alert, vault, user, alert_id)
    except DrsiteError as e:
        return H.error(vault, user, e, H.status_of(e))
    back = H.safe_next(fields.get("back"))
    return RedirectResponse(back if back.startswith("/ui/alerts") else "/ui/alerts",
                            status_code=303)
