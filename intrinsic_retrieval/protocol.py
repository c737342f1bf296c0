"""The one interface every retriever implements and every integration consumes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from typing import Any, Protocol, Self, runtime_checkable

from .errors import EmptyQueryError, InvalidInputError
from .types import DocumentLike, Hit

#: A metadata filter: ``{"field": value}`` for equality, ``{"field": {"$gte": 3}}`` for
#: operators ($eq $ne $gt $gte $lt $lte $in $nin $exists), ``{"$and": [...]}`` / ``{"$or": [...]}``.
#: The pseudo-fields ``document_id`` and ``chunk_id`` address ids. See `filters.py`.
Filter = dict[str, Any]


@runtime_checkable
class Retriever(Protocol):
    """Index documents, search them, persist the index.

    Filters are candidate masks: a chunk that fails the filter is never scored or returned.
    """

    def add(self, documents: Iterable[DocumentLike], *, on_duplicate: str = "error") -> list[str]:
        """Chunk, encode and store documents; returns their document ids."""
        ...

    def delete(self, ids: Iterable[str]) -> int:
        """Tombstone documents (by document id) or single chunks (by chunk id); returns the
        number of chunks removed."""
        ...

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Hit]: ...

    def search_batch(
        self, queries: Sequence[str], k: int = 10, filter: Filter | None = None
    ) -> list[list[Hit]]: ...

    def save(self, path: str | PathLike[str]) -> None: ...

    @classmethod
    def load(cls, path: str | PathLike[str], **overrides: Any) -> Self: ...

    def __len__(self) -> int:
        """Number of live chunks."""
        ...


def check_query(query: Any) -> str:
    """A query every retriever accepts: a non-blank str."""
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be str, got {type(query).__name__}")
    if not query.strip():
        raise EmptyQueryError("query is empty")
    return query


def check_k(k: Any, name: str = "k") -> int:
    """A result count: a positive int (not a bool)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {k!r}")
    return k


def check_queries(
    queries: Any, k: Any, check: Callable[[Any], str] = check_query
) -> tuple[list[str], int]:
    """`search_batch`'s arguments: a list of queries (not one str), each passing `check` (a
    retriever may add its own limits), and `k`."""
    if isinstance(queries, str):
        raise InvalidInputError("search_batch takes a list of queries; use search() for one")
    return [check(q) for q in queries], check_k(k)
