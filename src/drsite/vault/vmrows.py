"""The inventory's VM rows, written by several transactions that may run at once.

A host's heartbeat (its inventory), a failover step (the recovery VM, known before its host
reports it), a VM job (its command's result) and a break-glass report all insert the row of
a VM they have not seen — and two of them may do so for the same VM at the same moment. On
PostgreSQL (read committed) the second ``INSERT`` waits for the first transaction and then
fails the ``(host_id, vm_id)`` unique constraint; that must not fail a failover or a heartbeat.
On SQLite writers are serialized (``BEGIN IMMEDIATE``), so the race cannot happen there.

Invariant: at most one row per ``(host_id, vm_id)``; :func:`vm_row` returns that row, whoever
inserted it.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from drsite.vault.db.models import Vm


def find_vm(s: Session, host_id: str, vm_id: str) -> Vm | None:
    return s.scalars(select(Vm).where(Vm.host_id == host_id, Vm.vm_id == vm_id)).first()


def vm_row(s: Session, host_id: str, vm_id: str, make: Callable[[], Vm]) -> tuple[Vm, bool]:
    """The row of ``vm_id`` on ``host_id``: the existing one, or ``make()`` inserted now.
    Returns ``(row, inserted)``; when a concurrent transaction inserted the VM first, its row
    (``inserted`` False) — the caller then updates it as it would any existing row.

    The insert runs in a savepoint after the session's other pending changes are flushed, so
    a unique violation rolls back only this row, and is this row's."""
    row = find_vm(s, host_id, vm_id)
    if row is not None:
        return row, False
    new = make()
    s.flush()
    try:
        with s.begin_nested():
            s.add(new)
    except IntegrityError:
        row = find_vm(s, host_id, vm_id)   # read committed: the winner's row is visible now
        if row is None:
            raise
        return row, False
    return new, True
