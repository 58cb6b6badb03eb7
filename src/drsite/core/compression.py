"""A policy's compression mode (plain values; imported by the CLI, so nothing heavy)."""

from __future__ import annotations

from drsite.core.errors import InvalidInput

COMPRESSION_MODES = ("auto", "zstd", "off")


def compression_mode(value: object) -> str:
    """A policy's ``compression``: ``"auto"`` (each frame compressed unless the compressors, not
    the store, hold the copy up), ``"zstd"`` (every frame) or ``"off"``. The boolean it used to
    be is still accepted: true means ``"zstd"``, false ``"off"``."""
    if value is True:
        return "zstd"
    if value is False:
        return "off"
    if isinstance(value, str) and value in COMPRESSION_MODES:
        return value
    raise InvalidInput(f"compression must be 'auto', 'zstd' or 'off', not {value!r}",
                       hint="auto: compress unless the CPU, not the store, is the bottleneck "
                            "(a fast local store gets some frames raw); zstd: always; off: "
                            "never. true/false still mean zstd/off.")
