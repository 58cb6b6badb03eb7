"""The web dashboard served by the vault at ``/ui`` (server-rendered, htmx for live fragments).

No build step: Jinja2 templates and static files ship as package data, and ``static/htmx.min.js``
is the vendored htmx release (version and license in ``static/README.txt``). The vault mounts
:data:`drsite.web.routes.router`. Pages read the same views as the REST API (``data``).
"""
