"""Jinja environment (autoescape always on), static files, and the HTML response headers."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Any

from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from drsite import __version__
from drsite.core.states import ItemProtection, JobState, TaskState
from drsite.web import fmt

# script and style only from /ui/static; no inline script, no inline style, no framing
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                    "Cache-Control": "no-store"}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8",
                ".png": "image/png", ".ico": "image/x-icon"}


@cache
def static_files() -> dict[str, bytes]:
    """The package's static files by name (read once)."""
    root = resources.files("drsite.web") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir()
            if f.is_file() and any(f.name.endswith(ext) for ext in STATIC_TYPES)}


def static_url(name: str) -> str:
    data = static_files().get(name, b"")
    return f"/ui/static/{name}?v={hashlib.sha256(data).hexdigest()[:10]}"


def static_response(name: str) -> Response:
    files = static_files()
    if name not in files:
        return Response("not found", status_code=404, media_type="text/plain")
    ext = name[name.rfind("."):]
    return Response(files[name], media_type=STATIC_TYPES[ext],
                    headers={"Cache-Control": "public, max-age=86400",
                             "X-Content-Type-Options": "nosniff"})


@cache
def env() -> Environment:
    e = Environment(loader=PackageLoader("drsite.web", "templates"),
                    autoescape=select_autoescape(default=True, default_for_string=True),
                    undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    e.filters.update(utc=fmt.utc, iso=fmt.iso, duration=fmt.duration, size=fmt.size,
                     rate=fmt.rate, pct=fmt.pct, short=fmt.short)
    e.globals.update(static_url=static_url, badge=fmt.badge, version=__version__,
                     JobState=JobState, TaskState=TaskState, ItemProtection=ItemProtection)
    return e


def page(template: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    now = ctx.get("now")
    if now is not None:
        ctx.setdefault("ago", lambda t: fmt.ago(t, float(now)))
    html = env().get_template(template).render(**ctx)
    return HTMLResponse(html, status_code=status_code, headers=dict(SECURITY_HEADERS))
