"""LlamaIndex `MetadataFilters` -> intrinsic-retrieval filters (evaluated as candidate masks).

Semantics follow LlamaIndex's reference in-memory store (`SimpleVectorStore`): ``!=`` and
``nin`` also match nodes that lack the key, ``is_empty`` matches a missing, null or ``""`` value,
and the ``not`` condition matches when none of its filters match.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from intrinsic_retrieval import Filter, InvalidFilterError

_SIMPLE = {
    FilterOperator.EQ: "$eq",
    FilterOperator.GT: "$gt",
    FilterOperator.LT: "$lt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in",
}

SUPPORTED_OPERATORS = frozenset(
    {*_SIMPLE, FilterOperator.NE, FilterOperator.NIN, FilterOperator.IS_EMPTY}
)


def _leaf(f: MetadataFilter) -> Filter:
    op = FilterOperator(f.operator)
    key = f.key
    if op in _SIMPLE:
        return {key: {_SIMPLE[op]: f.value}}
    if op == FilterOperator.NE:
        return {"$or": [{key: {"$ne": f.value}}, {key: {"$exists": False}}]}
    if op == FilterOperator.NIN:
        return {"$or": [{key: {"$nin": f.value}}, {key: {"$exists": False}}]}
    if op == FilterOperator.IS_EMPTY:
        return {"$or": [{key: None}, {key: {"$eq": ""}}]}  # None matches null or missing
    supported = ", ".join(sorted(o.value for o in SUPPORTED_OPERATORS))
    raise InvalidFilterError(
        f"filter operator {op.value!r} on {key!r} is not supported by intrinsic-retrieval "
        f"filters; supported: {supported}"
    )


def to_library_filter(filters: MetadataFilters | MetadataFilter | Filter | None) -> Filter | None:
    """Translate LlamaIndex filters (nested ones included); a plain dict is taken to be a
    library filter already and passed through."""
    if filters is None:
        return None
    if isinstance(filters, dict):
        return filters
    if isinstance(filters, MetadataFilter):
        return _leaf(filters)
    if not isinstance(filters, MetadataFilters):
        raise InvalidFilterError(
            "filters must be MetadataFilters, MetadataFilter or a dict, "
            f"got {type(filters).__name__}"
        )
    parts: list[Any] = [to_library_filter(f) for f in filters.filters]
    if not parts:
        return None
    condition = FilterCondition(filters.condition or FilterCondition.AND)
    if condition == FilterCondition.AND:
        return parts[0] if len(parts) == 1 else {"$and": parts}
    if condition == FilterCondition.OR:
        return parts[0] if len(parts) == 1 else {"$or": parts}
    if condition == FilterCondition.NOT:
        return {"$not": parts[0] if len(parts) == 1 else {"$or": parts}}
    raise InvalidFilterError(f"unknown filter condition {condition!r}")
