"""Identifiers the vault hands out: short, random, valid names (they become store keys)."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """``prefix-`` followed by 12 random hex digits, e.g. ``i-3f9a0c1b2d4e``."""
    return f"{prefix}-{secrets.token_hex(6)}"
