"""The remote recovery store: a secondary site's store served over mTLS (``server``) and the
primary side's client (``client``). See ``design.md`` in this directory for the trust model."""

from drsite.store.site.client import SiteObjectStore, SiteTarget
from drsite.store.site.server import make_store_app

__all__ = ["SiteObjectStore", "SiteTarget", "make_store_app"]
