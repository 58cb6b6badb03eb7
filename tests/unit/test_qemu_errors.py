"""QMP error classification (no QEMU needed)."""

from __future__ import annotations

from drsite.core.errors import InvalidInput, NotFound, PermanentError
from drsite.hypervisors.qemu.nbd import dirty_bitmap_context
from drsite.hypervisors.qemu.qmp import (
    QmpCommandError,
    QmpInvalidArgument,
    QmpNotFound,
    error_from_reply,
)


def test_error_from_reply() -> None:
    e = error_from_reply("x", {"class": "GenericError", "desc": "Parameter 'name' is missing"})
    assert isinstance(e, QmpInvalidArgument) and isinstance(e, InvalidInput)
    e = error_from_reply("x", {"class": "DeviceNotFound", "desc": "Device 'a' not found"})
    assert isinstance(e, QmpNotFound) and isinstance(e, NotFound)
    e = error_from_reply("x", {"class": "GenericError", "desc": "Bitmap is busy"})
    assert isinstance(e, QmpCommandError) and isinstance(e, PermanentError)
    assert e.qmp_class == "GenericError" and not e.transient
    e = error_from_reply("x", {"class": "CommandNotFound", "desc": "nope"})
    assert isinstance(e, QmpCommandError)


def test_dirty_bitmap_context() -> None:
    assert dirty_bitmap_context("b0") == "qemu:dirty-bitmap:b0"
