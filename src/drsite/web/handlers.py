"""What every dashboard route does around its page: the session (a login redirect that keeps
the page to come back to), the page's context, error pages (HTML, with the API's message and
hint), forms, and the checks of an action POST (session, origin and CSRF, role).

Responsible for: those mechanics, the same for every route. Not responsible for: what a page
shows (``data``, the templates) or which actions exist (``actions``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from drsite.core.errors import AuthError, Conflict, DrsiteError, InvalidInput, NotFound
from drsite.vault.context import Vault
from drsite.web.render import page
from drsite.web.session import CSRF_FIELD, CSRF_HEADER, WebUser, csrf_ok, current_user, same_origin

POLL = "every 2s"
MAX_FORM_BYTES = 16 * 1024
NAV = (("overview", "/ui", "Overview"), ("vms", "/ui/vms", "VMs"),
       ("jobs", "/ui/jobs", "Jobs"), ("plans", "/ui/plans", "Plans"),
       ("drills", "/ui/drills", "Drills"), ("policies", "/ui/policies", "Policies"),
       ("alerts", "/ui/alerts", "Alerts"),
       ("sites", "/ui/sites", "Sites"), ("events", "/ui/events", "Events"))
ADMIN_NAV = (("audit", "/ui/audit", "Audit"),)  # shown to admins only (the page is admin only)


def vault_of(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


def now(vault: Vault) -> float:
    return vault.settings.clock.now()


def safe_next(value: str | None) -> str:
    """A path of the dashboard to go back to after logging in (anything else: ``/ui``)."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value \
            and not value.startswith("/ui/f/") and not value.startswith("/ui/login"):
        return value
    return "/ui"


def page_path(request: Request) -> str:
    """The page the browser shows: for a live fragment (htmx), the page it belongs to."""
    current = request.headers.get("hx-current-url")
    if current:
        parts = urlsplit(current)
        if parts.netloc in ("", request.headers.get("host", "")):
            return parts.path + (f"?{parts.query}" if parts.query else "")
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


def login_url(request: Request) -> str:
    return f"/ui/login?next={quote(safe_next(page_path(request)), safe='')}"


def login_redirect(request: Request) -> Response:
    """The way to the login form, back to this page afterwards (a live fragment: htmx is told
    to load the login form for the page it is on)."""
    target = login_url(request)
    if request.headers.get("hx-request"):
        return Response("session ended", status_code=401, media_type="text/plain",
                        headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def nav(user: WebUser | None) -> tuple[tuple[str, str, str], ...]:
    return NAV + ADMIN_NAV if user is not None and user.is_admin else NAV


def pair(vault: Vault) -> dict[str, Any] | None:
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


def ctx(vault: Vault, user: WebUser, active: str, **kw: Any) -> dict[str, Any]:
    return {"user": user, "now": now(vault), "nav": nav(user), "active": active, "poll": POLL,
            "pair": pair(vault), **kw}


def error(vault: Vault, user: WebUser | None, err: DrsiteError, status: int,
          fragment: bool = False) -> HTMLResponse:
    """An error page (or, for a live fragment, the error in place of the fragment)."""
    if fragment:
        return page("fragments/error.html", status, err=err)
    return page("error.html", status, user=user, now=now(vault), nav=nav(user), active="",
                err=err, poll=POLL, status=status, pair=pair(vault))


def status_of(err: DrsiteError) -> int:
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Conflict):
        return 409
    if isinstance(err, AuthError):
        return 403
    if isinstance(err, InvalidInput):
        return 400
    return 503 if err.transient else 400


def view(request: Request, template: str, active: str,
         build: Callable[[Vault, WebUser], dict[str, Any]], fragment: bool = False) -> Response:
    """A page (or its live fragment) of a logged-in user; errors as HTML."""
    vault = vault_of(request)
    user = current_user(request, vault)
    if user is None:
        return login_redirect(request)
    try:
        built = build(vault, user)
    except DrsiteError as e:
        return error(vault, user, e, status_of(e), fragment)
    return page(template, **ctx(vault, user, active, **built))


def params(request: Request) -> dict[str, str]:
    """The query parameters (the first value of each)."""
    return {k: v for k, v in request.query_params.items()}


async def form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidInput("form too large")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and ctype != "application/x-www-form-urlencoded":
        raise InvalidInput("expected a form (application/x-www-form-urlencoded)")
    try:
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=50)
    except ValueError:
        raise InvalidInput("form has too many fields") from None
    return {k: v[0] for k, v in parsed.items() if v}


def session_ended(request: Request) -> Response:
    """A POST without a session: the login form, which comes back to the page the form was
    on (its ``Referer``, when it is this dashboard)."""
    referer = urlsplit(request.headers.get("referer") or "")
    back = safe_next(referer.path + (f"?{referer.query}" if referer.query else "")
                     if referer.netloc == request.headers.get("host", "") else None)
    return page("login.html", 401, next=back, error="Your session has ended: log in again.",
                hint=None)


async def signed_in(request: Request) -> tuple[Vault, WebUser] | Response:
    """The vault and the session's user, or the response refusing the request (no session:
    the login form, which comes back to the page the form was on)."""
    vault = vault_of(request)
    user = await run_in_threadpool(current_user, request, vault)
    if user is None:
        return session_ended(request)
    return vault, user


async def checked_post(request: Request, session: tuple[Vault, WebUser] | None = None
                       ) -> tuple[Vault, WebUser, dict[str, str]] | Response:
    """The session, form and checks of an action POST, or the response refusing it;
    ``session``: the one :func:`signed_in` already found (not looked up again)."""
    got = session if session is not None else await signed_in(request)
    if isinstance(got, Response):
        return got
    vault, user = got
    try:
        fields = await form(request)
    except InvalidInput as e:
        return error(vault, user, e, 400)
    presented = fields.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    if not same_origin(request) or not csrf_ok(user, presented):
        return error(vault, user, AuthError("refused: the form's CSRF token is missing or wrong",
                                            hint="Reload the page and try again."), 403)
    if not user.can_operate:
        return error(vault, user, AuthError(
            f"token {user.name!r} has the {user.role.value} role: it can look, not act",
            hint="Log in with an operator or admin token to do this."), 403)
    return vault, user, fields


async def act(request: Request, confirm: Callable[[Vault, WebUser], dict[str, Any]],
              active: str, action: Callable[[Vault, WebUser, dict[str, str]], str]) -> Response:
    """Run an action POST: the session first, then its confirmation page's context
    (``confirm``: an unknown item or action is refused here, with its status), then the form's
    checks; on success redirect (303) to the page ``action`` returns; a refusal is shown on the
    confirmation page, with its hint."""
    session = await signed_in(request)
    if isinstance(session, Response):
        return session
    vault, user = session
    try:
        shown = await run_in_threadpool(confirm, vault, user)
    except DrsiteError as e:
        return error(vault, user, e, status_of(e))
    checked = await checked_post(request, session)
    if isinstance(checked, Response):
        return checked
    vault, user, fields = checked
    try:
        target = await run_in_threadpool(action, vault, user, fields)
    except DrsiteError as e:
        c = ctx(vault, user, active, **{**shown, "error": e, "values": fields})
        return page("confirm.html", status_of(e), **c)
    return RedirectResponse(target, status_code=303)
