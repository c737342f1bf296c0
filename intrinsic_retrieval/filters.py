"""Metadata filters compiled to SQLite over the store's JSON metadata column.

Filters are candidate masks, evaluated before scoring, so a filtered-out chunk can never appear in
results. Compiling to SQL (json_extract) keeps filtering off the Python hot path and scales with
the store, not with the number of hits.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidFilterError

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_OPS = {"$eq": "=", "$ne": "!=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_ID_COLUMNS = {"document_id": "document_id", "chunk_id": "chunk_id"}


def _column(field: str) -> tuple[str, list[Any]]:
    if field in _ID_COLUMNS:
        return _ID_COLUMNS[field], []
    if not isinstance(field, str) or not _FIELD.match(field):
        raise InvalidFilterError(f"invalid metadata field name in filter: {field!r}")
    path = "$" + "".join(f'."{part}"' for part in field.split("."))
    return "json_extract(metadata, ?)", [path]


def _scalar(value: Any, field: str) -> Any:
    if isinstance(value, bool):
        return int(value)  # json_extract yields 1/0 for JSON true/false
    if value is None or isinstance(value, int | float | str):
        return value
    raise InvalidFilterError(f"filter value for {field!r} must be a scalar, got {type(value).__name__}")


def _condition(col: str, params: list[Any], field: str, op: str, value: Any) -> tuple[str, list]:
    if op in _OPS:
        if value is None and op in ("$eq", "$ne"):
            return f"{col} IS {'NOT ' if op == '$ne' else ''}NULL", params
        return f"{col} {_OPS[op]} ?", [*params, _scalar(value, field)]
    if op in ("$in", "$nin"):
        if not isinstance(value, list | tuple | set | frozenset):
            raise InvalidFilterError(f"{op} for {field!r} needs a list")
        values = [_scalar(v, field) for v in value]
        if not values:
            return ("0" if op == "$in" else "1"), []
        neg = "NOT " if op == "$nin" else ""
        return f"{col} {neg}IN ({','.join('?' * len(values))})", [*params, *values]
    if op == "$exists":
        return f"{col} IS {'NOT ' if value else ''}NULL", params
    raise InvalidFilterError(f"unknown filter operator {op!r} for field {field!r}")


def _leaf(field: str, cond: Any) -> tuple[str, list[Any]]:
    col, params = _column(field)
    if not isinstance(cond, dict):
        cond = {"$eq": cond}
    if not cond:
        raise InvalidFilterError(f"empty condition for field {field!r}")
    sqls: list[str] = []
    flat: list[Any] = []
    for op, value in cond.items():
        sql, args = _condition(col, params, field, op, value)
        sqls.append(sql)
        flat.extend(args)
    return "(" + " AND ".join(sqls) + ")", flat


def compile_filter(flt: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """Return a SQL boolean expression and its parameters; ``("1", [])`` for no filter."""
    if flt is None:
        return "1", []
    if not isinstance(flt, dict):
        raise InvalidFilterError(f"filter must be a dict, got {type(flt).__name__}")
    if not flt:
        return "1", []
    clauses: list[str] = []
    params: list[Any] = []
    for key, cond in flt.items():
        if key in ("$and", "$or"):
            if not isinstance(cond, list | tuple) or not cond:
                raise InvalidFilterError(f"{key} needs a non-empty list of filters")
            subs = [compile_filter(c) for c in cond]
            joiner = " AND " if key == "$and" else " OR "
            clauses.append("(" + joiner.join(s for s, _ in subs) + ")")
            for _, p in subs:
                params.extend(p)
        elif key == "$not":
            sub, p = compile_filter(cond)
            clauses.append(f"(NOT {sub})")
            params.extend(p)
        else:
            sql, p = _leaf(key, cond)
            clauses.append(sql)
            params.extend(p)
    return " AND ".join(clauses), params
