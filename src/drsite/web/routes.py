"""The dashboard's routes: pages at ``/ui/...``, their live fragments at ``/ui/f/...`` (polled
by htmx every 2 s), login/logout, static files, ``/`` → ``/ui``; the actions (confirmations and
POSTs) are in ``actions``; anything else under ``/ui`` is an HTML error page.

Every page needs a logged-in token (``session``): GET pages redirect to the login form (which
comes back to the page), fragments answer 401 with ``HX-Redirect``. Every POST checks, in this
order: a session (401), the request's origin and the session's CSRF token (403), then the role
(403 for a reader: the dashboard shows everything to a reader and lets it press nothing).
Actions are the API's own operations (``data``), so their rules and errors are the API's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from drsite.core.errors import AuthError, InvalidInput, MethodNotAllowed, NotFound
from drsite.core.states import JOB_FILTER_ACTIVE, JobState
from drsite.vault.api.deps import set_actor
from drsite.vault.context import Vault
from drsite.web import actions, data
from drsite.web import handlers as H
from drsite.web.lists import ListQuery
from drsite.web.render import page, static_response
from drsite.web.session import (
    COOKIE,
    CSRF_FIELD,
    WebUser,
    check_token,
    cookie_secure,
    csrf_ok,
    current_user,
    same_origin,
)

router = APIRouter(include_in_schema=False)

SESSION_MAX_AGE_S = 12 * 3600
JOB_STATES = (JOB_FILTER_ACTIVE, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED,
              JobState.FAILED, JobState.CANCELLED)
Build = Callable[[Vault, WebUser], dict[str, Any]]


def _page_and_fragment(path: str, template: str, active: str,
                       build: Callable[[Request], Build]) -> None:
    """Register the page ``path`` and its live fragment ``/ui/f/…`` (the same context)."""
    frag = "/ui/f" + path[len("/ui"):] if path != "/ui" else "/ui/f/overview"

    def page_route(request: Request) -> Response:
        return H.view(request, f"{template}.html", active, build(request))

    def fragment_route(request: Request) -> Response:
        return H.view(request, f"fragments/{template}.html", active, build(request), True)

    router.add_api_route(path, page_route, methods=["GET"])
    router.add_api_route(frag, fragment_route, methods=["GET"])


# --------------------------------------------------------------------------- entry, static

@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui/static/{name}")
def static(request: Request, name: str) -> Response:
    resp = static_response(name)
    if resp.status_code == 404:
        return not_found(request)
    return resp


@router.get("/ui/login")
def login_form(request: Request, next: str | None = None) -> Response:
    vault = H.vault_of(request)
    if current_user(request, vault) is not None:
        return RedirectResponse(H.safe_next(next), status_code=303)
    return page("login.html", next=H.safe_next(next), error=None, hint=None)


@router.post("/ui/login")
async def login(request: Request) -> Response:
    vault = H.vault_of(request)
    try:
        form = await H.form(request)
    except InvalidInput as e:
        return page("login.html", 400, next="/ui", error=e.message, hint=None)
    nxt = H.safe_next(form.get("next"))
    if not same_origin(request):
        return page("login.html", 403, next=nxt,
                    error="login refused: the form came from another site", hint=None)
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
    vault = H.vault_of(request)
    user = await run_in_threadpool(current_user, request, vault)
    if user is not None:
        form = await H.form(request)
        if not (same_origin(request) and csrf_ok(user, form.get(CSRF_FIELD))):
            return H.error(vault, user, AuthError("logout refused: the form's CSRF token is "
                                                  "missing or wrong",
                                                  hint="Reload the page and try again."), 403)
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict",
                       secure=cookie_secure(request))
    return resp


# ----------------------------------------------------------------------------------- pages

def _vms(request: Request) -> Build:
    query = ListQuery.parse("/ui/vms", H.params(request), filters=data.ITEM_FILTERS,
                            sorts=data.ITEM_SORTS, default_sort="vm_name")
    return lambda v, u: data.protected_vms(v, u, query)


def _jobs(request: Request) -> Build:
    query = ListQuery.parse("/ui/jobs", H.params(request), filters=("state", "kind"),
                            sorts=data.JOB_SORTS, default_sort="created_at", default_desc=True)
    return lambda v, u: {**data.jobs(v, u, query), "states": JOB_STATES}


def _alerts(request: Request) -> Build:
    query = ListQuery.parse("/ui/alerts", H.params(request), filters=("state", "kind"),
                            sorts=("raised_at",), default_sort="raised_at", default_desc=True)
    return lambda v, u: data.alerts(v, u, query)


def _events(request: Request) -> Build:
    query = ListQuery.parse("/ui/events", H.params(request), filters=("kind",),
                            sorts=data.EVENT_SORTS, default_sort="at", default_desc=True)
    return lambda v, u: data.events(v, u, query)


def _audit(request: Request) -> Build:
    actor = request.query_params.get("actor") or None
    before = request.query_params.get("before") or None

    def build(v: Vault, u: WebUser) -> dict[str, Any]:
        if before is not None and not before.isdigit():
            raise InvalidInput("before must be an audit entry id")
        cursor = int(before) if before else None
        return {"audit": data.audit(v, u, actor, cursor), "actor": actor or "",
                "before": cursor}

    return build


def _drills(request: Request) -> Build:
    plan, group = request.query_params.get("plan"), request.query_params.get("group")
    return lambda v, u: {"drills": data.drills(v, u, plan, group), "plan": plan or "",
                         "group": group or ""}


_page_and_fragment("/ui", "overview", "overview", lambda r: data.overview)
_page_and_fragment("/ui/vms", "vms", "vms", _vms)
_page_and_fragment("/ui/jobs", "jobs", "jobs", _jobs)
_page_and_fragment("/ui/alerts", "alerts", "alerts", _alerts)
_page_and_fragment("/ui/events", "events", "events", _events)
_page_and_fragment("/ui/sites", "sites", "sites", lambda r: data.sites)
_page_and_fragment("/ui/audit", "audit", "audit", _audit)
_page_and_fragment("/ui/drills", "drills", "drills", _drills)
_page_and_fragment("/ui/plans", "plans", "plans", lambda r: lambda v, u: {"plans": data.plans(v)})
_page_and_fragment("/ui/policies", "policies", "policies", lambda r: data.policies)


def _item(request: Request, item_id: str) -> Build:
    window = request.query_params.get("window")
    return lambda v, u: data.item_page(v, u, item_id, window)


def _points(request: Request, item_id: str) -> Build:
    query = ListQuery.parse(f"/ui/items/{item_id}/points", H.params(request),
                            filters=("consistency", "kind", "damaged", "pick"),
                            sorts=data.POINT_SORTS, default_sort="created_at", default_desc=True)
    pick = request.query_params.get("pick")

    def build(v: Vault, u: WebUser) -> dict[str, Any]:
        out = data.points_page(v, u, item_id, query.with_filter("pick", None))
        out["pick"] = pick if pick in actions.ITEM_KEYS else None
        out["query"] = query
        return out

    return build


@router.get("/ui/items/{item_id}")
def item(request: Request, item_id: str) -> Response:
    return H.view(request, "item.html", "vms", _item(request, item_id))


@router.get("/ui/f/items/{item_id}")
def item_fragment(request: Request, item_id: str) -> Response:
    return H.view(request, "fragments/item.html", "vms", _item(request, item_id), True)


@router.get("/ui/items/{item_id}/points")
def points(request: Request, item_id: str) -> Response:
    return H.view(request, "points.html", "vms", _points(request, item_id))


@router.get("/ui/items/{item_id}/points/{point_id}")
def point(request: Request, item_id: str, point_id: str) -> Response:
    return H.view(request, "point.html", "vms",
                  lambda v, u: data.point(v, u, item_id, point_id))


@router.get("/ui/hosts/{host_id}")
def host(request: Request, host_id: str) -> Response:
    return H.view(request, "host.html", "sites", lambda v, u: data.host(v, u, host_id))


@router.get("/ui/f/hosts/{host_id}")
def host_fragment(request: Request, host_id: str) -> Response:
    return H.view(request, "fragments/host.html", "sites", lambda v, u: data.host(v, u, host_id),
                  True)


@router.get("/ui/drills/{drill_id}")
def drill(request: Request, drill_id: str) -> Response:
    return H.view(request, "drill.html", "drills",
                  lambda v, u: {"drill": data.drill(v, u, drill_id)})


@router.get("/ui/f/drills/{drill_id}")
def drill_fragment(request: Request, drill_id: str) -> Response:
    return H.view(request, "fragments/drill.html", "drills",
                  lambda v, u: {"drill": data.drill(v, u, drill_id)}, True)


@router.get("/ui/jobs/{job_id}")
def job(request: Request, job_id: str) -> Response:
    return H.view(request, "job.html", "jobs", lambda v, u: {"job": data.job(v, u, job_id)})


@router.get("/ui/f/jobs/{job_id}")
def job_fragment(request: Request, job_id: str) -> Response:
    return H.view(request, "fragments/job.html", "jobs",
                  lambda v, u: {"job": data.job(v, u, job_id)}, True)


def _plan(name: str) -> Build:
    return lambda v, u: {"plan": data.plan(v, name), "actions": actions.PLAN_TEXT,
                         "allowed": data.plan_allowed(v, name), "name": name}


@router.get("/ui/plans/{name}")
def plan(request: Request, name: str) -> Response:
    return H.view(request, "plan.html", "plans", _plan(name))


@router.get("/ui/f/plans/{name}")
def plan_fragment(request: Request, name: str) -> Response:
    return H.view(request, "fragments/plan.html", "plans", _plan(name), True)


router.include_router(actions.router)


# ------------------------------------------------------------------ everything else: HTML errors

def not_found(request: Request) -> Response:
    vault = H.vault_of(request)
    user = current_user(request, vault)
    err = NotFound(f"no page {request.url.path}",
                   hint="Use the links above; the overview lists everything.")
    return H.error(vault, user, err, 404, fragment=request.url.path.startswith("/ui/f/"))


@router.api_route("/ui/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def anything_else(request: Request, path: str) -> Response:
    """An unknown page, or a known one asked with a method it does not take: an HTML page
    (never the API's JSON) that says so."""
    if request.method == "GET":
        return not_found(request)
    vault = H.vault_of(request)
    user = current_user(request, vault)
    return H.error(vault, user, MethodNotAllowed(
        f"{request.method} is not what {request.url.path} takes",
        hint="Use the page's own buttons; every action has a confirmation page."), 405)
