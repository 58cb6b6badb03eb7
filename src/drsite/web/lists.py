"""Lists on the dashboard: search, filters, sort and pages over rows the API returned.

A list page reads its query parameters once (:class:`ListQuery`: ``q`` a case-insensitive
search over the row's text fields, one value per filter, ``sort`` and ``order``, ``limit`` and
``offset``), applies them to the API's rows and says how many matched ("21–40 of 57"), so a
list is never cut without notice. The parameter names are the list endpoints' own (``q``,
``limit``, filters named like the API's), so a page's URL reads like the API call it makes.

Responsible for: parsing (bad values fall back to the defaults, never an error page), the
order, the page, and links that keep every other parameter. Not responsible for: which rows
exist (the API).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

DEFAULT_LIMIT = 50
LIMITS = (20, 50, 100, 200)
MAX_Q = 100


@dataclass(frozen=True)
class ListQuery:
    """The state of one list: search, filters, order, page."""

    path: str
    q: str = ""
    filters: dict[str, str] = field(default_factory=dict)
    sort: str = ""
    desc: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @staticmethod
    def parse(path: str, params: Mapping[str, str], *, filters: Sequence[str],
              sorts: Sequence[str], default_sort: str, default_desc: bool = False) -> ListQuery:
        q = str(params.get("q") or "").strip()[:MAX_Q]
        sort = str(params.get("sort") or default_sort)
        if sort not in sorts:
            sort = default_sort
        order = params.get("order")
        desc = default_desc if order not in ("asc", "desc") else order == "desc"
        try:
            limit = int(params.get("limit") or DEFAULT_LIMIT)
        except ValueError:
            limit = DEFAULT_LIMIT
        try:
            offset = max(0, int(params.get("offset") or 0))
        except ValueError:
            offset = 0
        return ListQuery(path, q, {f: str(params[f])[:MAX_Q] for f in filters if params.get(f)},
                         sort, desc, limit if limit in LIMITS else DEFAULT_LIMIT, offset)

    def params(self, **changes: Any) -> dict[str, str]:
        """The query's parameters with ``changes`` (None drops one)."""
        base: dict[str, Any] = {"q": self.q, **self.filters, "sort": self.sort,
                                "order": "desc" if self.desc else "asc", "limit": self.limit,
                                "offset": self.offset}
        base.update(changes)
        return {k: str(v) for k, v in base.items()
                if v is not None and v != "" and not (k == "offset" and not v)}

    def url(self, **changes: Any) -> str:
        qs = urlencode(self.params(**changes))
        return f"{self.path}?{qs}" if qs else self.path

    def sort_url(self, key: str) -> str:
        """The link of a column header: sort by it (again: the other way), first page."""
        desc = not self.desc if key == self.sort else False
        return self.url(sort=key, order="desc" if desc else "asc", offset=None)

    def aria_sort(self, key: str) -> str:
        if key != self.sort:
            return "none"
        return "descending" if self.desc else "ascending"

    def with_filter(self, name: str, value: str | None) -> ListQuery:
        f = dict(self.filters)
        if value:
            f[name] = value
        else:
            f.pop(name, None)
        return replace(self, filters=f, offset=0)


@dataclass(frozen=True)
class Page:
    """One page of a list and where it sits."""

    rows: list[dict[str, Any]]
    total: int
    query: ListQuery

    @property
    def first(self) -> int:
        return self.query.offset + 1 if self.rows else 0

    @property
    def last(self) -> int:
        return self.query.offset + len(self.rows)

    @property
    def prev_url(self) -> str | None:
        if self.query.offset <= 0:
            return None
        return self.query.url(offset=max(0, self.query.offset - self.query.limit) or None)

    @property
    def next_url(self) -> str | None:
        if self.last >= self.total:
            return None
        return self.query.url(offset=self.last)


def _text(row: Mapping[str, Any], fields: Sequence[str]) -> str:
    return " ".join(str(row.get(f) or "") for f in fields).lower()


def _key(v: Any) -> tuple[int, Any]:
    """Sortable whatever the type: missing values last, numbers as numbers, text as text."""
    if v is None or v == "":
        return (2, "")
    if isinstance(v, bool):
        return (0, int(v))
    if isinstance(v, int | float):
        return (0, float(v))
    return (1, str(v).lower())


def paginate(rows: Sequence[dict[str, Any]], query: ListQuery, *, search: Sequence[str],
             match: Callable[[dict[str, Any], str, str], bool] | None = None,
             sort_value: Callable[[dict[str, Any], str], Any] | None = None) -> Page:
    """Filter (each filter: ``match(row, name, value)``, by default equality of the field),
    search, sort and cut ``rows``."""
    def matches(row: dict[str, Any], name: str, value: str) -> bool:
        return match(row, name, value) if match is not None else str(row.get(name)) == value

    out = [r for r in rows if all(matches(r, k, v) for k, v in query.filters.items())]
    if query.q:
        needle = query.q.lower()
        out = [r for r in out if needle in _text(r, search)]
    if query.sort:
        def value(r: dict[str, Any]) -> Any:
            return sort_value(r, query.sort) if sort_value is not None else r.get(query.sort)

        present = [r for r in out if value(r) not in (None, "")]
        missing = [r for r in out if value(r) in (None, "")]
        present.sort(key=lambda r: _key(value(r)), reverse=query.desc)
        out = present + missing  # no value: last, whichever way
    total = len(out)
    return Page(out[query.offset:query.offset + query.limit], total, query)
