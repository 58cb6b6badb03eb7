"""The local recovery store: objects as files under one directory (a secondary site's disk)."""

from drsite.store.local.backend import LocalObjectStore

__all__ = ["LocalObjectStore"]
