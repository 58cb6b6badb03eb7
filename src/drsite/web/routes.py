"""The dashboard's routes: pages at ``/ui/...``, their live fragments at ``/ui/f/...`` (polled
by htmx every 2 s), confirmations and POST actions, login/logout, static files, and ``/`` → ``/ui``.

Every page needs a logged-in token (``session``): GET pages redirect to the login form, fragments
answer 401 with ``HX-Redirect``. Every POST checks, in this order: a session (401), the request's
origin and the session's CSRF token (403), then the role (403 for a reader: the dashboard shows
everything to a reader and lets it press nothing). Actions are the API's own operations
(``data``), so their rules and errors are the API's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from drsite.core.errors import AuthError, Conflict, DrsiteError, InvalidInput, NotFound
from drsite.core.states import JOB_FILTER_ACTIVE, JobState
from drsite.vault.api.deps import set_actor
from drsite.vault.context import Vault
from drsite.web import data
from drsite.web.render import page, static_response
from drsite.web.session import (
    COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    WebUser,
    check_token,
    cookie_secure,
    csrf_ok,
    current_user,
    same_origin,
)

router = APIRouter(include_in_schema=False)

POLL = "every 2s"
SESSION_MAX_AGE_S = 12 * 3600
MAX_FORM_BYTES = 16 * 1024
NAV = (("overview", "/ui", "Overview"), ("vms", "/ui/vms", "Protected VMs"),
       ("jobs", "/ui/jobs", "Jobs"), ("plans", "/ui/plans", "Recovery plans"),
       ("drills", "/ui/drills", "Drills"), ("alerts", "/ui/alerts", "Alerts"))
ADMIN_NAV = (("audit", "/ui/audit", "Audit"),)  # shown to admins only (the page is admin only)


# Plan actions: label, what will happen (shown on the confirmation), whether it is disruptive
PLAN_ACTIONS: dict[str, tuple[str, str, bool]] = {
    "test_failover": (
        "Test failover",
        "Starts every VM of the plan, group by group, from its latest recovery point in the "
        "isolated test network, on a copy-on-write view of the replica. Replication goes on and "
        "production VMs are not touched. Clean the test failover up when you are done.", False),
    "cleanup_test_failover": (
        "Clean up test failover",
        "Stops and deletes the plan's test VMs and their copy-on-write images. Recovery points "
        "and replication are not affected.", False),
    "planned_failover": (
        "Planned failover",
        "Shuts the source VMs down, ships their last changes, then starts the replicas on the "
        "recovery site group by group, running the plan's pre and post actions: no data is lost. "
        "The source VMs stay off. Commit afterwards to end the failover.", True),
    "unplanned_failover": (
        "Unplanned failover",
        "Starts the replicas on the recovery site from the chosen recovery point without waiting "
        "for the source site (use it when the source is down). Changes made after that point are "
        "lost, and the VMs stay unprotected until you re-protect them.", True),
    "commit": (
        "Commit",
        "Ends the failover: the recovery VMs keep running from the point they started on, and the "
        "other recovery points of those VMs are discarded. The point can no longer be changed.",
        True),
    "cancel": (
        "Cancel failover",
        "Deletes the recovery VMs of the uncommitted failover and hands the VMs back to the "
        "source site.", True),
    "reprotect": (
        "Re-protect",
        "Reverses replication: the failed-over VMs replicate back to the original site, resyncing "
        "against the old primary disks so that only differences travel.", True),
}
VERIFY_WHAT = ("Reads the chosen recovery points whole from the recovery store, on the host that "
               "serves it, checking every piece of data against its hash, and records each disk's "
               "digest. A point that cannot be restored exactly is marked damaged and refused for "
               "failover (the job fails); a point proven whole loses an earlier damage mark. "
               "Replication goes on meanwhile; nothing is changed in the store.")
VERIFY_CHOICES = (("latest", "The newest recovery point"), ("all", "Every kept recovery point"))
POINT_CHOICES = (("latest", "Latest recovery point (lowest RPO)"),
                 ("latest_app", "Latest app-consistent recovery point"))
POINT_ACTIONS = ("test_failover", "unplanned_failover")


def vault_of(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


def _now(vault: Vault) -> float:
    return vault.settings.clock.now()


def _safe_next(value: str | None) -> str:
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui"


def _login_redirect(request: Request) -> Response:
    if request.headers.get("hx-request"):
        return Response("session ended", status_code=401, media_type="text/plain",
                        headers={"HX-Redirect": "/ui/login"})
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)


def _nav(user: WebUser | None) -> tuple[tuple[str, str, str], ...]:
    return NAV + ADMIN_NAV if user is not None and user.is_admin else NAV


def _pair(vault: Vault) -> dict[str, Any] | None:
    """The banner of a vault that is not the active one of its pair (standby, or fenced):
    what it is and where the active vault is. None on an active vault."""
    if vault.fenced is not None:
        return {"role": "fenced", "active_url": vault.fenced.peer_url}
    if vault.standby:
        try:
            url = vault.active_url()
        except DrsiteError:
            url = None
        return {"role": "standby", "active_url": url}
    return None


def _ctx(vault: Vault, user: WebUser, active: str, **kw: Any) -> dict[str, Any]:
    return {"user": user, "now": _now(vault), "nav": _nav(user), "active": active, "poll": POLL,
            "pair": _pair(vault), **kw}


def _error(vault: Vault, user: WebUser | None, err: DrsiteError, status: int,
           fragment: bool = False) -> HTMLResponse:
    if fragment:
        return page("fragments/error.html", status, err=err)
    return page("error.html", status, user=user, now=_now(vault), nav=_nav(user), active="",
                err=err, poll=POLL, pair=_pair(vault))


def _status(err: DrsiteError) -> int:
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Conflict):
        return 409
    if isinstance(err, AuthError):
        return 403
    if isinstance(err, InvalidInput):
        return 400
    return 503 if err.transient else 400


def _view(request: Request, template: str, active: str, build: Callable[[Vault, WebUser], dict[str, Any]],
          fragment: bool = False) -> Response:
    vault = vault_of(request)
    user = current_user(request, vault)
    if user is None:
        return _login_redirect(request)
    try:
        ctx = build(vault, user)
    except DrsiteError as e:
        return _error(vault, user, e, _status(e), fragment)
    return page(template, **_ctx(vault, user, active, **ctx))


# --------------------------------------------------------------------------- entry, static

@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui/static/{name}")
def static(name: str) -> Response:
    return static_response(name)


@router.get("/ui/login")
def login_form(request: Request, next: str | None = None) -> Response:
    vault = vault_of(request)
    if current_user(request, vault) is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return page("login.html", next=_safe_next(next), error=None, hint=None)


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidInput("form too large")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and ctype != "application/x-www-form-urlencoded":
        raise InvalidInput("expected a form (application/x-www-form-urlencoded)")
    try:
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=50)
    except ValueError:
        raise InvalidInput("form has too many fields") from None
    return {k: v[0] for k, v in parsed.items() if v}


@router.post("/ui/login")
async def login(request: Request) -> Response:
    vault = vault_of(request)
    try:
        form = await _form(request)
    except InvalidInput as e:
        return page("login.html", 400, next="/ui", error=e.message, hint=None)
    nxt = _safe_next(form.get("next"))
    if not same_origin(request):
        return page("login.html", 403, next=nxt, error="login refused: the form came from another site",
                    hint=None)
    token = form.get("token", "").strip()
    try:
        user = await run_in_threadpool(check_token, vault, token)
    except AuthError as e:
        msg = ("Enter an API token." if not token else
               "That token was not accepted: it is not a token of this vault (it may have been "
               "deleted, or mistyped).")
        return page("login.html", 401, next=nxt, error=msg, hint=e.hint or None)
    set_actor(request, "token", user.name)  # the audit trail's "who" of this login
    resp = RedirectResponse(nxt, status_code=303)
    resp.set_cookie(COOKIE, token, max_age=SESSION_MAX_AGE_S, path="/ui", httponly=True,
                    samesite="strict", secure=cookie_secure(request))
    return resp


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    vault = vault_of(request)
    user = await run_in_threadpool(current_user, request, vault)
    if user is not None:
        form = await _form(request)
        if not (same_origin(request) and csrf_ok(user, form.get(CSRF_FIELD))):
            return _error(vault, user, AuthError("logout refused: the form's CSRF token is missing or "
                                                 "wrong", hint="Reload the page and try again."), 403)
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict",
                       secure=cookie_secure(request))
    return resp


# ----------------------------------------------------------------------------------- pages

@router.get("/ui")
def overview(request: Request) -> Response:
    return _view(request, "overview.html", "overview", lambda v, u: data.overview(v, u))


@router.get("/ui/f/overview")
def overview_fragment(request: Request) -> Response:
    return _view(request, "fragments/overview.html", "overview", lambda v, u: data.overview(v, u), True)


@router.get("/ui/vms")
def vms(request: Request, cursor: str | None = None) -> Response:
    return _view(request, "vms.html", "vms", lambda v, u: data.protected_vms(v, u, cursor))


@router.get("/ui/f/vms")
def vms_fragment(request: Request, cursor: str | None = None) -> Response:
    return _view(request, "fragments/vms.html", "vms",
                 lambda v, u: data.protected_vms(v, u, cursor), True)


@router.get("/ui/items/{item_id}")
def item(request: Request, item_id: str, window: str | None = None) -> Response:
    return _view(request, "item.html", "vms", lambda v, u: data.item_page(v, u, item_id, window))


@router.get("/ui/f/items/{item_id}")
def item_fragment(request: Request, item_id: str, window: str | None = None) -> Response:
    return _view(request, "fragments/item.html", "vms",
                 lambda v, u: data.item_page(v, u, item_id, window), True)


def _drills_ctx(v: Vault, u: WebUser, plan: str | None, group: str | None) -> dict[str, Any]:
    return {"drills": data.drills(v, u, plan, group), "plan": plan or "", "group": group or ""}


@router.get("/ui/drills")
def drills(request: Request, plan: str | None = None, group: str | None = None) -> Response:
    return _view(request, "drills.html", "drills", lambda v, u: _drills_ctx(v, u, plan, group))


@router.get("/ui/f/drills")
def drills_fragment(request: Request, plan: str | None = None,
                    group: str | None = None) -> Response:
    return _view(request, "fragments/drills.html", "drills",
                 lambda v, u: _drills_ctx(v, u, plan, group), True)


@router.get("/ui/drills/{drill_id}")
def drill(request: Request, drill_id: str) -> Response:
    return _view(request, "drill.html", "drills", lambda v, u: {"drill": data.drill(v, u, drill_id)})


@router.get("/ui/f/drills/{drill_id}")
def drill_fragment(request: Request, drill_id: str) -> Response:
    return _view(request, "fragments/drill.html", "drills",
                 lambda v, u: {"drill": data.drill(v, u, drill_id)}, True)


def _jobs_ctx(v: Vault, u: WebUser, state: str | None, kind: str | None,
              cursor: str | None) -> dict[str, Any]:
    jobs_page = data.jobs(v, u, state, kind, cursor)
    return {"jobs": jobs_page["entries"], "jobs_total": jobs_page["total"],
            "next_cursor": jobs_page["next_cursor"], "cursor": cursor or "",
            "state": state or "", "kind": kind or "",
            "states": (JOB_FILTER_ACTIVE, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED,
                       JobState.FAILED, JobState.CANCELLED)}


@router.get("/ui/jobs")
def jobs(request: Request, state: str | None = None, kind: str | None = None,
         cursor: str | None = None) -> Response:
    return _view(request, "jobs.html", "jobs", lambda v, u: _jobs_ctx(v, u, state, kind, cursor))


@router.get("/ui/f/jobs")
def jobs_fragment(request: Request, state: str | None = None, kind: str | None = None,
                  cursor: str | None = None) -> Response:
    return _view(request, "fragments/jobs.html", "jobs",
                 lambda v, u: _jobs_ctx(v, u, state, kind, cursor), True)


@router.get("/ui/jobs/{job_id}")
def job(request: Request, job_id: str) -> Response:
    return _view(request, "job.html", "jobs", lambda v, u: {"job": data.job(v, u, job_id)})


@router.get("/ui/f/jobs/{job_id}")
def job_fragment(request: Request, job_id: str) -> Response:
    return _view(request, "fragments/job.html", "jobs", lambda v, u: {"job": data.job(v, u, job_id)}, True)


def _alerts_ctx(v: Vault, u: WebUser, state: str | None, cursor: str | None) -> dict[str, Any]:
    alerts_page = data.alerts(v, u, state, cursor)
    return {"alerts": alerts_page["entries"], "alerts_total": alerts_page["total"],
            "next_cursor": alerts_page["next_cursor"], "cursor": cursor or "",
            "state": state or ""}


@router.get("/ui/alerts")
def alerts(request: Request, state: str | None = None, cursor: str | None = None) -> Response:
    return _view(request, "alerts.html", "alerts", lambda v, u: _alerts_ctx(v, u, state, cursor))


@router.get("/ui/f/alerts")
def alerts_fragment(request: Request, state: str | None = None,
                    cursor: str | None = None) -> Response:
    return _view(request, "fragments/alerts.html", "alerts",
                 lambda v, u: _alerts_ctx(v, u, state, cursor), True)


def _audit_ctx(v: Vault, u: WebUser, actor: str | None, before: str | None) -> dict[str, Any]:
    if before is not None and before != "" and not before.isdigit():
        raise InvalidInput("before must be an audit entry id")
    cursor = int(before) if before else None
    return {"audit": data.audit(v, u, actor or None, cursor), "actor": actor or "",
            "before": cursor}


@router.get("/ui/audit")
def audit(request: Request, actor: str | None = None, before: str | None = None) -> Response:
    return _view(request, "audit.html", "audit", lambda v, u: _audit_ctx(v, u, actor, before))


@router.get("/ui/f/audit")
def audit_fragment(request: Request, actor: str | None = None, before: str | None = None) -> Response:
    return _view(request, "fragments/audit.html", "audit",
                 lambda v, u: _audit_ctx(v, u, actor, before), True)


def _plans_ctx(v: Vault, _u: WebUser) -> dict[str, Any]:
    return {"plans": data.plans(v)}


def _plan_ctx(v: Vault, _u: WebUser, name: str) -> dict[str, Any]:
    return {"plan": data.plan(v, name), "actions": PLAN_ACTIONS, "name": name}


@router.get("/ui/plans")
def plans(request: Request) -> Response:
    return _view(request, "plans.html", "plans", _plans_ctx)


@router.get("/ui/f/plans")
def plans_fragment(request: Request) -> Response:
    return _view(request, "fragments/plans.html", "plans", _plans_ctx, True)


@router.get("/ui/plans/{name}")
def plan(request: Request, name: str) -> Response:
    return _view(request, "plan.html", "plans", lambda v, u: _plan_ctx(v, u, name))


@router.get("/ui/f/plans/{name}")
def plan_fragment(request: Request, name: str) -> Response:
    return _view(request, "fragments/plan.html", "plans", lambda v, u: _plan_ctx(v, u, name), True)


# ------------------------------------------------------------------ confirmations, actions

def _confirm_ctx(title: str, label: str, what: str, action_url: str, back: str, danger: bool,
                 choices: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    return {"title": title, "label": label, "what": what, "action_url": action_url, "back": back,
            "danger": danger, "choices": choices, "error": None}


def _plan_confirm(name: str, action: str) -> dict[str, Any]:
    if action not in PLAN_ACTIONS:
        raise NotFound(f"no plan action {action!r}",
                       hint=f"Use one of {', '.join(PLAN_ACTIONS)}.")
    label, what, danger = PLAN_ACTIONS[action]
    return _confirm_ctx(f"{label} of recovery plan {name}", label, what, f"/ui/plans/{quote(name)}/{action}",
                        f"/ui/plans/{quote(name)}", danger,
                        POINT_CHOICES if action in POINT_ACTIONS else ())


def _job_confirm(job_id: str, action: str) -> dict[str, Any]:
    if action == "cancel":
        return _confirm_ctx(f"Cancel job {job_id}", "cancel the job",
                            "Asks the job to stop at its next task boundary. An EnableProtection job "
                            "is rolled back (the replica is removed); other jobs stop where they are.",
                            f"/ui/jobs/{quote(job_id)}/cancel", f"/ui/jobs/{quote(job_id)}", True)
    return _confirm_ctx(f"Resume job {job_id}", "resume the job",
                        "The job is paused at a manual step of its recovery plan. Resume it once that "
                        "step is done: the plan goes on with its next action or group.",
                        f"/ui/jobs/{quote(job_id)}/resume", f"/ui/jobs/{quote(job_id)}", False)


def _verify_confirm(item_id: str) -> dict[str, Any]:
    return _confirm_ctx(f"Verify the recovery points of item {item_id}", "verify",
                        VERIFY_WHAT, f"/ui/items/{quote(item_id)}/verify",
                        f"/ui/items/{quote(item_id)}", False, VERIFY_CHOICES)


@router.get("/ui/items/{item_id}/verify")
def verify_confirm(request: Request, item_id: str) -> Response:
    def build(v: Vault, u: WebUser) -> dict[str, Any]:
        data.item(v, u, item_id)  # 404 for an unknown item, as the page
        return _verify_confirm(item_id)

    return _view(request, "confirm.html", "vms", build)


@router.get("/ui/plans/{name}/{action}")
def plan_action_confirm(request: Request, name: str, action: str) -> Response:
    return _view(request, "confirm.html", "plans", lambda v, u: _plan_confirm(name, action))


@router.get("/ui/jobs/{job_id}/{action}")
def job_action_confirm(request: Request, job_id: str, action: str) -> Response:
    if action not in ("cancel", "resume"):
        return Response("not found", status_code=404, media_type="text/plain")
    return _view(request, "confirm.html", "jobs", lambda v, u: _job_confirm(job_id, action))


async def _checked_post(request: Request) -> tuple[Vault, WebUser, dict[str, str]] | Response:
    """The session, form and checks of an action POST, or the response refusing it."""
    vault = vault_of(request)
    user = await run_in_threadpool(current_user, request, vault)
    if user is None:
        return page("login.html", 401, next="/ui", error="Your session has ended: log in again.",
                    hint=None)
    try:
        form = await _form(request)
    except InvalidInput as e:
        return _error(vault, user, e, 400)
    presented = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not same_origin(request) or not csrf_ok(user, presented):
        return _error(vault, user, AuthError("refused: the form's CSRF token is missing or wrong",
                                             hint="Reload the page and try again."), 403)
    if not user.can_operate:
        return _error(vault, user, AuthError(
            f"token {user.name!r} has the {user.role.value} role: it can look, not act",
            hint="Log in with an operator or admin token to do this."), 403)
    return vault, user, form


async def _act(request: Request, confirm: dict[str, Any], active: str,
               action: Callable[[Vault, WebUser, dict[str, str]], str]) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    vault, user, form = checked
    try:
        target = await run_in_threadpool(action, vault, user, form)
    except DrsiteError as e:
        ctx = _ctx(vault, user, active, **{**confirm, "error": e})
        return page("confirm.html", _status(e), **ctx)
    return RedirectResponse(target, status_code=303)


@router.post("/ui/plans/{name}/{action}")
async def plan_action(request: Request, name: str, action: str) -> Response:
    try:
        confirm = _plan_confirm(name, action)
    except NotFound:
        return Response("not found", status_code=404, media_type="text/plain")

    def run(vault: Vault, _user: WebUser, form: dict[str, str]) -> str:
        args: dict[str, Any] = {}
        if action in POINT_ACTIONS:
            point = form.get("point", "latest")
            if point not in dict(POINT_CHOICES):
                raise InvalidInput(f"unknown recovery point choice {point!r}")
            args["point"] = point
        job_id = data.start_plan_action(vault, name, action, args)
        return f"/ui/jobs/{quote(job_id)}"

    return await _act(request, confirm, "plans", run)


@router.post("/ui/items/{item_id}/verify")
async def verify(request: Request, item_id: str) -> Response:
    def run(vault: Vault, user: WebUser, form: dict[str, str]) -> str:
        which = form.get("point", "latest")
        if which not in dict(VERIFY_CHOICES):
            raise InvalidInput(f"unknown choice {which!r}: verify the newest point or all points")
        return f"/ui/jobs/{quote(data.start_verify(vault, user, item_id, which))}"

    return await _act(request, _verify_confirm(item_id), "vms", run)


@router.post("/ui/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: str, action: str) -> Response:
    if action not in ("cancel", "resume"):
        return Response("not found", status_code=404, media_type="text/plain")

    def run(vault: Vault, user: WebUser, _form: dict[str, str]) -> str:
        if action == "cancel":
            data.cancel_job(vault, user, job_id)
        else:
            data.resume_job(vault, job_id)
        return f"/ui/jobs/{quote(job_id)}"

    return await _act(request, _job_confirm(job_id, action), "jobs", run)


@router.post("/ui/alerts/{alert_id}/ack")
async def ack(request: Request, alert_id: str) -> Response:
    checked = await _checked_post(request)
    if isinstance(checked, Response):
        return checked
    vault, user, _form = checked
    try:
        await run_in_threadpool(data.ack_alert, vault, user, alert_id)
    except DrsiteError as e:
        return _error(vault, user, e, _status(e))
    return RedirectResponse("/ui/alerts", status_code=303)

