"""Metadata filters compiled to SQLite over the store's JSON metadata column.

Filters are candidate masks, evaluated before scoring, so a filtered-out chunk can never appear in
results. Compiling to SQL (`json_extract` / `json_type`) keeps filtering off the Python hot path
and scales with the store, not with the number of hits.

The language is a small, Mongo-like subset::

    {"topic": "biology"}                                   equality (scalars: str, int, float,
    {"year": {"$gte": 2015, "$lt": 2020}}                  bool, None); several keys = AND
    {"lang": {"$in": ["en", "de"]}}, {"x": {"$nin": [1]}}
    {"source.kind": "pdf"}                                 dotted path into nested objects
    {"author": {"$exists": True}}
    {"$or": [{...}, {...}]}, {"$and": [...]}, {"$not": {...}}, {"x": {"$not": {"$gt": 3}}}
    {"document_id": {"$in": [...]}}, {"chunk_id": "a#0"}   pseudo-fields (columns, not metadata)

Semantics, chosen to be predictable rather than SQL-flavoured:

- Comparisons only match values of the same kind: numbers with numbers, strings with strings,
  booleans only by equality (``True`` never equals ``1``). ``{"year": {"$gt": 2015}}`` does not
  match ``"year": "2016"``.
- Every condition is two-valued. ``$ne`` and ``$nin`` match chunks that lack the field, and
  ``$not`` is the exact complement of what it wraps.
- ``None`` (``$eq``/``$in``) matches a JSON null or a missing field; ``$exists: True`` matches a
  present field, null included.
- Arrays and objects are not compared element-wise; filter on scalar fields or dotted paths.
- Field names are path segments of letters, digits, ``_`` and ``-`` joined by dots; anything
  else, unknown operators, non-scalar values and nesting deeper than 32 raise
  `InvalidFilterError`. Values are always bound parameters, never spliced into SQL.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidFilterError

__all__ = ["ID_FIELDS", "OPERATORS", "compile_filter"]

#: pseudo-fields that address store columns instead of metadata
ID_FIELDS = ("document_id", "chunk_id")
OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$not")
_SEGMENT = re.compile(r"^[\w\-]+$")
_RANGE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_MAX_DEPTH = 32
_NUMERIC = "('integer','real')"
_INT64 = (-(2**63), 2**63 - 1)

Sql = tuple[str, list[Any]]


class _Field:
    """SQL for reading one field's value and JSON type (NULL type = field missing)."""

    def __init__(self, name: object) -> None:
        if not isinstance(name, str):
            raise InvalidFilterError(f"filter field names must be str, got {name!r}")
        self.name = name
        if name in ID_FIELDS:
            self.is_column = True
            self._value: Sql = (name, [])
            self._type: Sql = ("'text'", [])
            return
        parts = name.split(".")
        if name.startswith("$") or not all(_SEGMENT.match(p) for p in parts):
            raise InvalidFilterError(
                f"invalid metadata field name in filter: {name!r} (use letters, digits, '_' and "
                "'-', with dots for nested fields)"
            )
        self.is_column = False
        path = "$" + "".join(f'."{p}"' for p in parts)
        self._value = ("json_extract(metadata, ?)", [path])
        self._type = ("json_type(metadata, ?)", [path])

    def value(self) -> Sql:
        return self._value[0], list(self._value[1])

    def type(self) -> Sql:
        return self._type[0], list(self._type[1])


def _scalar(value: Any, field: str, op: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidFilterError(f"{op} value for {field!r} is outside the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidFilterError(f"{op} value for {field!r} must be finite, got {value}")
        return value
    raise InvalidFilterError(
        f"{op} value for {field!r} must be a str, number, bool or None, got {type(value).__name__}"
    )


def _equals(f: _Field, value: Any) -> Sql:
    """Strict 0/1 equality with kind matching."""
    t_sql, t_p = f.type()
    if value is None:
        return f"({t_sql} IS NULL OR {t_sql} = 'null')", t_p + t_p
    if isinstance(value, bool):
        return f"IFNULL({t_sql} = '{'true' if value else 'false'}', 0)", t_p
    v_sql, v_p = f.value()
    kind = "= 'text'" if isinstance(value, str) else f"IN {_NUMERIC}"
    return f"IFNULL({t_sql} {kind} AND {v_sql} = ?, 0)", [*t_p, *v_p, value]


def _in(f: _Field, values: list[Any]) -> Sql:
    """OR of equalities, with strings and numbers each checked in one `json_each` lookup."""
    strs = [v for v in values if isinstance(v, str)]
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    others = [v for v in values if v is None or isinstance(v, bool)]
    parts: list[str] = []
    params: list[Any] = []
    for group, kind in ((strs, "= 'text'"), (nums, f"IN {_NUMERIC}")):
        if group:
            t_sql, t_p = f.type()
            v_sql, v_p = f.value()
            parts.append(
                f"IFNULL({t_sql} {kind} AND {v_sql} IN (SELECT value FROM json_each(?)), 0)"
            )
            params += [*t_p, *v_p, json.dumps(group)]
    for v in dict.fromkeys(others):  # None / True / False, deduplicated
        sql, p = _equals(f, v)
        parts.append(sql)
        params += p
    if not parts:
        return "0", []
    return "(" + " OR ".join(parts) + ")", params


def _condition(f: _Field, op: str, value: Any, depth: int) -> Sql:
    if op == "$eq":
        return _equals(f, _scalar(value, f.name, op))
    if op == "$ne":
        sql, p = _equals(f, _scalar(value, f.name, op))
        return f"(NOT {sql})", p
    if op in _RANGE:
        value = _scalar(value, f.name, op)
        if value is None or isinstance(value, bool):
            raise InvalidFilterError(f"{op} for {f.name!r} needs a number or a string")
        t_sql, t_p = f.type()
        v_sql, v_p = f.value()
        kind = "= 'text'" if isinstance(value, str) else f"IN {_NUMERIC}"
        return f"IFNULL({t_sql} {kind} AND {v_sql} {_RANGE[op]} ?, 0)", [*t_p, *v_p, value]
    if op in ("$in", "$nin"):
        if not isinstance(value, list | tuple | set | frozenset):
            raise InvalidFilterError(f"{op} for {f.name!r} needs a list, got {value!r}")
        sql, p = _in(f, [_scalar(v, f.name, op) for v in value])
        return (sql, p) if op == "$in" else (f"(NOT {sql})", p)
    if op == "$exists":
        if not isinstance(value, bool):
            raise InvalidFilterError(f"$exists for {f.name!r} needs True or False")
        t_sql, t_p = f.type()
        return f"({t_sql} IS {'NOT ' if value else ''}NULL)", t_p
    if op == "$not":
        sql, p = _field_filter(f, value, depth + 1)
        return f"(NOT {sql})", p
    raise InvalidFilterError(
        f"unknown filter operator {op!r} for field {f.name!r}; operators: {', '.join(OPERATORS)}"
        + ("" if op.startswith("$") else f" (for a nested field write '{f.name}.{op}')")
    )


def _field_filter(f: _Field, cond: Any, depth: int) -> Sql:
    if depth > _MAX_DEPTH:
        raise InvalidFilterError(f"filter is nested deeper than {_MAX_DEPTH} levels")
    if not isinstance(cond, Mapping):
        return _equals(f, _scalar(cond, f.name, "$eq"))
    if not cond:
        raise InvalidFilterError(f"empty condition for field {f.name!r}")
    sqls: list[str] = []
    params: list[Any] = []
    for op, value in cond.items():
        if not isinstance(op, str):
            raise InvalidFilterError(f"operator for {f.name!r} must be a string, got {op!r}")
        sql, p = _condition(f, op, value, depth)
        sqls.append(sql)
        params += p
    return "(" + " AND ".join(sqls) + ")", params


def _compile(flt: Any, depth: int) -> Sql:
    if depth > _MAX_DEPTH:
        raise InvalidFilterError(f"filter is nested deeper than {_MAX_DEPTH} levels")
    if not isinstance(flt, Mapping):
        raise InvalidFilterError(f"filter must be a dict, got {type(flt).__name__}")
    if not flt:
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list | tuple) or not cond:
                raise InvalidFilterError(f"{key} needs a non-empty list of filters")
            subs = [_compile(c, depth + 1) for c in cond]
            joiner = " AND " if key == "$and" else " OR "
            clauses.append("(" + joiner.join(s for s, _ in subs) + ")")
            for _, p in subs:
                params += p
        elif key == "$not":
            sub, p = _compile(cond, depth + 1)
            clauses.append(f"(NOT {sub})")
            params += p
        elif isinstance(key, str) and key.startswith("$"):
            raise InvalidFilterError(
                f"unknown top-level filter operator {key!r}; use $and, $or, $not or a field name"
            )
        else:
            sql, p = _field_filter(_Field(key), cond, depth + 1)
            clauses.append(sql)
            params += p
    return "(" + " AND ".join(clauses) + ")", params


def compile_filter(flt: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    """Return a SQL boolean expression over the ``chunks`` table and its parameters;
    ``("1", [])`` for no filter. Raises `InvalidFilterError` for anything outside the language."""
    if flt is None:
        return "1", []
    return _compile(flt, 0)
