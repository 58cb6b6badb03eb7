"""Pages of list endpoints: ``{"entries", "total", "limit", "next_cursor"}``.

Every list that grows with the fleet (items, jobs, alerts, events, audit, recovery points) is
read one page at a time, in a stable order (a unique sort key: the row's own order columns,
then its id), with a keyset cursor: ``next_cursor`` is an opaque token naming the last row of
the page, and the next page is the rows strictly after it in that order. Rows inserted while a
client pages (new jobs, new events) therefore never shift a page: nothing is returned twice or
skipped. ``total`` counts every row that matches the filters (all pages), so a client can say
"showing N of M" and never cut a list silently.

Responsible for: limits, cursors, the count, and the keyset condition. Not responsible for:
filters (each route) or how a row is shown (``views``).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from drsite.core.errors import InvalidInput

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR = 512


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


@dataclass(frozen=True)
class Key:
    """One sort column of a list, and its direction."""

    column: InstrumentedAttribute[Any]
    descending: bool = False

    @property
    def name(self) -> str:
        return str(self.column.key)

    def order(self) -> ColumnElement[Any]:
        return self.column.desc() if self.descending else self.column.asc()

    def after(self, value: Any) -> ColumnElement[bool]:
        cond: ColumnElement[bool] = self.column < value if self.descending else self.column > value
        return cond


def encode_cursor(values: Sequence[Any]) -> str:
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, n: int) -> list[Any]:
    """The sort-key values a cursor names; ``InvalidInput`` for anything we did not issue."""
    bad = InvalidInput("invalid cursor", hint="Pass the next_cursor of the previous page as it "
                                              "came, or omit cursor for the first page.")
    if len(token) > MAX_CURSOR:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad from None
    if not isinstance(values, list) or len(values) != n or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in values):
        raise bad
    return values


def after_cursor(keys: Sequence[Key], values: Sequence[Any]) -> ColumnElement[bool]:
    """Rows strictly after ``values`` in the order of ``keys`` (a lexicographic keyset)."""
    alternatives = []
    for i, key in enumerate(keys):
        equal = [keys[j].column == values[j] for j in range(i)]
        alternatives.append(and_(*equal, key.after(values[i])))
    return or_(*alternatives)


def page(s: Session, q: Select[Any], keys: Sequence[Key], *, limit: int, cursor: str | None,
         view: Callable[[Any], dict[str, Any]],
         prepare: Callable[[list[Any]], None] | None = None,
         rows_of: Callable[[Any], list[Any]] | None = None) -> dict[str, Any]:
    """One page of ``q`` (a ``select(Model)`` with its filters) in the order of ``keys``;
    ``prepare`` sees the page's rows before ``view`` shows each (to read what they need in
    one query). ``rows_of``: ``q`` selects columns (the keys' among them), and this makes the
    page's rows of its result."""
    limit = check_limit(limit)
    total = s.scalar(select(func.count()).select_from(q.order_by(None).subquery()))
    if cursor:
        q = q.where(after_cursor(keys, decode_cursor(cursor, len(keys))))
    q = q.order_by(*(k.order() for k in keys)).limit(limit + 1)
    rows = rows_of(s.execute(q)) if rows_of is not None else list(s.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = encode_cursor([getattr(rows[-1], k.name) for k in keys]) if more and rows else None
    if prepare is not None:
        prepare(rows)
    return {"entries": [view(r) for r in rows], "total": int(total or 0), "limit": limit,
            "next_cursor": nxt}
