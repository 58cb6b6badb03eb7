"""Columns whose secrets are sealed at rest (AES-256-GCM under the vault's master key).

:class:`SealedJSON` is a JSON column that seals its whole value, or only the values at some
paths inside it (``Command.args``: the cloud store's ``secret`` and ``keys``; the rest stays
queryable). In the database a sealed value is an envelope ``{"$sealed": "v1", "kid", "nonce",
"ct"}``; in Python it is the clear value. The sealer comes from the engine's dialect
(:func:`attach_sealer`, done by :class:`~drsite.vault.db.database.Database`), so there is no
global key. A value read in clear (a row written before sealing existed) is returned as it is;
the vault seals such rows at start (:mod:`drsite.vault.masterkey`).

Responsible for: the column type and where sealed values are (:data:`SEALED_COLUMNS`). Not
responsible for: keys and cryptography (a :class:`Sealer` does it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import JSON, Dialect, Engine
from sqlalchemy.types import TypeDecorator

MARK = "$sealed"


class Sealer(Protocol):
    def seal(self, value: Any, purpose: str) -> dict[str, Any]:
        """The envelope of ``value`` (any JSON value), bound to ``purpose``."""
        ...

    def unseal(self, envelope: dict[str, Any], purpose: str) -> Any:
        """The value inside an envelope (``SecretUnreadable`` when it cannot be opened)."""
        ...


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and MARK in value


def attach_sealer(engine: Engine, sealer: Sealer | None) -> None:
    """Make ``sealer`` seal and open the sealed columns of everything run on ``engine``."""
    engine.dialect.drsite_sealer = sealer  # type: ignore[attr-defined]


def _sealer(dialect: Dialect) -> Sealer:
    sealer: Sealer | None = getattr(dialect, "drsite_sealer", None)
    if sealer is None:
        raise RuntimeError("this database has no master key attached: sealed columns can be "
                           "neither written nor read (drsite.vault.db.sealed.attach_sealer)")
    return sealer


Path_ = tuple[str, ...]


def purpose_of(column: str, path: Path_) -> str:
    return ".".join((column, *path))


def map_paths(value: Any, paths: tuple[Path_, ...], fn: Any) -> Any:
    """A copy of ``value`` with ``fn(inner, path)`` applied to the value at each path that
    exists (``paths == ()``: to the whole value, path ``()``)."""
    if not paths:
        return fn(value, ())
    out = value
    for path in paths:
        parents: list[dict[str, Any]] = []
        node: Any = out
        for part in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(part), dict):
                node = None
                break
            parents.append(node)
            node = node[part]
        if not isinstance(node, dict) or path[-1] not in node or node[path[-1]] is None:
            continue
        new_leaf = fn(node[path[-1]], path)
        # rebuild the dicts along the path: the caller's value is never mutated
        rebuilt: Any = {**node, path[-1]: new_leaf}
        for parent, part in zip(reversed(parents), reversed(path[:-1]), strict=True):
            rebuilt = {**parent, part: rebuilt}
        out = rebuilt
    return out


class SealedJSON(TypeDecorator[Any]):
    """JSON with its whole value (``paths=()``) or the values at ``paths`` sealed at rest."""

    impl = JSON
    cache_ok = True

    def __init__(self, column: str, paths: tuple[Path_, ...] = ()) -> None:
        super().__init__()
        self.column = column
        self.paths = paths

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        sealer = _sealer(dialect)

        def seal(inner: Any, path: Path_) -> Any:
            return inner if is_sealed(inner) else sealer.seal(inner, purpose_of(self.column, path))

        return map_paths(value, self.paths, seal)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        sealer = _sealer(dialect)

        def unseal(inner: Any, path: Path_) -> Any:
            return sealer.unseal(inner, purpose_of(self.column, path)) if is_sealed(inner) else inner

        return map_paths(value, self.paths, unseal)


@dataclass(frozen=True)
class SealedColumn:
    """Where sealed values live: ``table.column`` (primary key ``pk``), at ``paths``."""

    table: str
    pk: str
    column: str
    paths: tuple[Path_, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


STORE_SPEC_PATHS: tuple[Path_, ...] = (("store", "secret"), ("store", "keys"))
# the secrets a command's arguments may carry: a cloud store's spec, an item's point key
COMMAND_ARG_PATHS: tuple[Path_, ...] = (*STORE_SPEC_PATHS, ("point_key",), ("rev_point_key",))

SEALED_COLUMNS = (
    SealedColumn("stores", "id", "secret"),            # cloud credentials
    SealedColumn("stores", "id", "keys"),              # data-encryption keys
    SealedColumn("commands", "id", "args", COMMAND_ARG_PATHS),  # what agents receive
    SealedColumn("point_keys", "item_id", "key"),      # items' point keys (store/auth.py)
    SealedColumn("vault_ca", "name", "key"),           # the CA's private key (vault/castate.py)
)
