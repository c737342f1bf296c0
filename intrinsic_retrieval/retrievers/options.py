"""Query-time options: small frozen dataclasses, one per retriever, validated once.

A retriever's constructor takes its index-time options (what the store holds: model, chunking,
dtypes, layers) and its query-time options (how a query is scored) as keywords; the query-time
ones form its `SearchOptions` subclass, which `configure(**options)` replaces and `using(**options)`
replaces for a block. Field-level checks live in the dataclass (`validate`); checks that need the
model or the store live in the retriever's `_check_search_options`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Self

from ..errors import InvalidInputError


@dataclass(frozen=True)
class SearchOptions:
    """Base of every retriever's query-time options (none for BM25 and dense)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `InvalidInputError` for a value no query can use."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **options: Any) -> Self:
        """A validated copy with `options` replaced; unknown names are refused by name."""
        bad = sorted(set(options) - set(self.names()))
        if bad:
            raise InvalidInputError(
                f"not query-time options: {bad}; query-time options: {list(self.names())} "
                "(index-time options need a new index)"
            )
        return type(self)(**{**asdict(self), **options})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
