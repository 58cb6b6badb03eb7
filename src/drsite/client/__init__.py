"""Typed client of the vault's operator API (used by the CLI, the web dashboard's tests, tests)."""

from drsite.client.api import VaultClient, VaultConfig

__all__ = ["VaultClient", "VaultConfig"]
