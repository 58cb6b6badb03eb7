"""The remote recovery store: a secondary site's store served over mTLS (``server``) and the
primary side's client (``client``). See ``design.md`` in this directory for the trust model."""

from drsite.sitestore.client import SITE_TARGET_OPTIONS, SiteObjectStore, SiteTarget
from drsite.sitestore.server import make_store_app

__all__ = ["SITE_TARGET_OPTIONS", "SiteObjectStore", "SiteTarget", "make_store_app"]
