"""Metadata filters: the Mongo-like language compiled to SQLite, run as candidate masks on a store,
checked operator by operator and against a reference evaluator written in Python."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intrinsic_retrieval.errors import InvalidFilterError
from intrinsic_retrieval.filters import compile_filter
from intrinsic_retrieval.store import EncodedChunkStore, TensorSpec
from intrinsic_retrieval.types import Chunk

METAS: list[dict[str, Any]] = [
    {
        "topic": "biology",
        "year": 2015,
        "score": 0.5,
        "flag": True,
        "lang": "en",
        "source": {"kind": "pdf", "pages": 10},
        "tags": ["a", "b"],
    },
    {
        "topic": "physics",
        "year": 2020,
        "score": 1.5,
        "flag": False,
        "lang": "de",
        "source": {"kind": "html"},
    },
    {"topic": "biology", "year": "2016", "flag": 1, "note": None},
    {"topic": 'it\'s "quoted"', "year": 2018.0, "source": "flat"},
    {},
    {
        "topic": "chemistry",
        "year": 2010,
        "lang": "en",
        "author-name": "x",
        "über": "ü",
        "2020": {"q-1": 3},
    },
]
DOCS = ["d0", "d0", "d1", "d2", "d3", "d4"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> EncodedChunkStore:
    path: Path = tmp_path_factory.mktemp("filters") / "s"
    s = EncodedChunkStore.create(
        path, fingerprint="fp", specs={"v": TensorSpec("fixed", "float32", (1,))}
    )
    chunks = [
        Chunk(f"{d}#{i}", d, f"t{i}", m) for i, (d, m) in enumerate(zip(DOCS, METAS, strict=True))
    ]
    s.append(chunks, {"v": torch.zeros(len(chunks), 1)})
    return s


def rows(store: EncodedChunkStore, flt: Any) -> list[int]:
    return store.candidate_mask(flt).nonzero().flatten().tolist()


CASES = [
    # equality and its kinds
    ({"topic": "biology"}, [0, 2]),
    ({"topic": {"$eq": "biology"}}, [0, 2]),
    ({"year": 2015}, [0]),
    ({"year": 2018}, [3]),  # 2018.0 is the number 2018
    ({"year": "2016"}, [2]),  # strings match strings only
    ({"flag": True}, [0]),  # True is not 1
    ({"flag": 1}, [2]),
    ({"flag": False}, [1]),
    ({"score": 0.5}, [0]),
    ({"topic": "biology", "lang": "en"}, [0]),  # several keys: AND
    # $ne matches missing fields too
    ({"topic": {"$ne": "biology"}}, [1, 3, 4, 5]),
    ({"flag": {"$ne": True}}, [1, 2, 3, 4, 5]),
    # ranges never cross kinds
    ({"year": {"$gt": 2015}}, [1, 3]),
    ({"year": {"$gte": 2015}}, [0, 1, 3]),
    ({"year": {"$lt": 2015}}, [5]),
    ({"year": {"$lte": 2015}}, [0, 5]),
    ({"year": {"$gte": 2011, "$lt": 2019}}, [0, 3]),
    ({"score": {"$gt": 1}}, [1]),
    ({"year": {"$gt": "2000"}}, [2]),
    ({"topic": {"$gte": "c", "$lt": "p"}}, [3, 5]),  # "chemistry", "it's ..."
    # $in / $nin
    ({"lang": {"$in": ["en", "fr"]}}, [0, 5]),
    ({"lang": {"$in": []}}, []),
    ({"lang": {"$nin": ["en"]}}, [1, 2, 3, 4]),
    ({"lang": {"$nin": []}}, [0, 1, 2, 3, 4, 5]),
    ({"year": {"$in": [2015, "2016", 2018.0]}}, [0, 2, 3]),
    ({"flag": {"$in": [True, 1]}}, [0, 2]),
    ({"note": {"$in": [None]}}, [0, 1, 2, 3, 4, 5]),  # null or missing
    ({"lang": {"$in": ("de",)}}, [1]),
    # None and $exists
    ({"note": None}, [0, 1, 2, 3, 4, 5]),
    ({"note": {"$exists": True}}, [2]),  # present, even though null
    ({"lang": {"$exists": True}}, [0, 1, 5]),
    ({"lang": {"$exists": False}}, [2, 3, 4]),
    ({"lang": {"$ne": None}}, [0, 1, 5]),
    # nested paths
    ({"source.kind": "pdf"}, [0]),
    ({"source.pages": {"$gte": 10}}, [0]),
    ({"source.kind": {"$exists": True}}, [0, 1]),
    ({"source.kind": {"$exists": False}}, [2, 3, 4, 5]),  # "flat" is a string, not an object
    ({"2020.q-1": 3}, [5]),
    ({"author-name": "x"}, [5]),
    ({"über": "ü"}, [5]),
    ({"source": "flat"}, [3]),
    # arrays and objects are not compared element-wise
    ({"tags": "a"}, []),
    ({"source": {"$exists": True}}, [0, 1, 3]),
    # pseudo-fields
    ({"document_id": "d0"}, [0, 1]),
    ({"document_id": {"$in": ["d1", "d4", "nope"]}}, [2, 5]),
    ({"chunk_id": "d2#3"}, [3]),
    ({"chunk_id": {"$ne": "d2#3"}}, [0, 1, 2, 4, 5]),
    ({"document_id": {"$exists": True}}, [0, 1, 2, 3, 4, 5]),
    ({"document_id": None}, []),
    # combinators
    ({"$or": [{"topic": "physics"}, {"year": {"$lt": 2012}}]}, [1, 5]),
    ({"$and": [{"topic": "biology"}, {"flag": True}]}, [0]),
    ({"$not": {"topic": "biology"}}, [1, 3, 4, 5]),
    ({"$not": {"lang": {"$in": ["en"]}}}, [1, 2, 3, 4]),
    ({"year": {"$not": {"$gt": 2015}}}, [0, 2, 4, 5]),
    ({"$or": [{"$and": [{"lang": "en"}, {"year": {"$gt": 2012}}]}, {"document_id": "d2"}]}, [0, 3]),
    ({"$not": {"$or": [{"lang": "en"}, {"lang": "de"}]}}, [2, 3, 4]),
    ({}, [0, 1, 2, 3, 4, 5]),
    (None, [0, 1, 2, 3, 4, 5]),
    # values with quotes or SQL are just values
    ({"topic": 'it\'s "quoted"'}, [3]),
    ({"topic": "x' OR '1'='1"}, []),
    ({"topic": {"$in": ["biology'); DROP TABLE chunks; --"]}}, []),
]


@pytest.mark.parametrize(("flt", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_filter_semantics(store, flt, expected):
    assert rows(store, flt) == expected


INJECTIONS = [
    "a') OR 1=1 --",
    'topic"; DROP TABLE chunks; --',
    "$.topic",
    "topic[0]",
    "topic..x",
    ".topic",
    "topic.",
    "",
    "to pic",
    'a"b',
    "a\\b",
    "topic*",
    "a'b",
    "topic\x00",
]


@pytest.mark.parametrize("field", INJECTIONS)
def test_field_names_that_are_not_plain_paths_are_refused(store, field):
    with pytest.raises(InvalidFilterError):
        compile_filter({field: "biology"})
    with pytest.raises(InvalidFilterError):
        store.candidate_mask({"$or": [{"topic": "biology"}, {field: {"$exists": True}}]})
    assert rows(store, {"topic": "biology"}) == [0, 2]  # the table is intact


BAD = [
    ["topic", "biology"],
    "topic = 'biology'",
    {"topic": {"$regex": "bio"}},
    {"topic": {"kind": "pdf"}},  # an object value: use a dotted path
    {"topic": {}},
    {"topic": ["biology"]},
    {"topic": {"$in": "biology"}},
    {"topic": {"$in": [["a"]]}},
    {"topic": {"$exists": 1}},
    {"year": {"$gt": None}},
    {"year": {"$gt": True}},
    {"year": {"$gt": [1]}},
    {"year": math.nan},
    {"year": {"$lt": math.inf}},
    {"year": 2**70},
    {"$or": []},
    {"$or": {"topic": "x"}},
    {"$and": ["topic"]},
    {"$not": ["topic"]},
    {"$nor": [{"topic": "x"}]},
    {1: "x"},
    {"topic": {1: "x"}},
    {"topic": {"$eq": object()}},
]


@pytest.mark.parametrize("flt", BAD, ids=[repr(b)[:40] for b in BAD])
def test_bad_filters_raise_invalid_filter_error(store, flt):
    with pytest.raises(InvalidFilterError):
        store.candidate_mask(flt)


def test_deep_nesting_is_refused_not_crashing():
    flt: dict[str, Any] = {"topic": "x"}
    for _ in range(40):
        flt = {"$not": flt}
    with pytest.raises(InvalidFilterError, match="deeper"):
        compile_filter(flt)
    ok: dict[str, Any] = {"topic": "x"}
    for _ in range(10):
        ok = {"$not": ok}
    compile_filter(ok)


def test_values_are_bound_parameters_never_sql():
    sql, params = compile_filter({"topic": "x' OR 1=1 --", "document_id": {"$in": ["a", "b"]}})
    assert "OR 1=1" not in sql and "x'" not in sql
    assert "x' OR 1=1 --" in params
    assert compile_filter(None) == ("1", [])
    assert compile_filter({}) == ("1", [])


def test_large_in_lists_use_one_parameter(store):
    many = [f"d{i}" for i in range(50_000)]
    _, params = compile_filter({"document_id": {"$in": many}})
    assert len(params) < 10
    assert rows(store, {"document_id": {"$in": many}}) == [0, 1, 2, 3, 4, 5]


def test_tombstoned_rows_never_pass_a_filter(tmp_path):
    s = EncodedChunkStore.create(tmp_path / "s", fingerprint="fp", specs={})
    s.append([Chunk(f"c{i}", f"d{i}", "t", {"k": 1}) for i in range(4)], {})
    s.delete(["c1"])
    assert rows(s, {"k": 1}) == [0, 2, 3]
    assert rows(s, {"$not": {"k": 2}}) == [0, 2, 3]


# ---------------------------------------------------------------------- against a reference
_MISSING = object()


def _get(meta: dict, doc: str, cid: str, field: str) -> Any:
    if field == "document_id":
        return doc
    if field == "chunk_id":
        return cid
    cur: Any = meta
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _kind(x: Any) -> str:
    if x is _MISSING or x is None:
        return "null"
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int | float):
        return "num"
    if isinstance(x, str):
        return "str"
    return "other"


def _eq(x: Any, v: Any) -> bool:
    if v is None:
        return x is None or x is _MISSING
    return _kind(x) == _kind(v) and x == v


def _cond(x: Any, op: str, v: Any) -> bool:
    if op == "$eq":
        return _eq(x, v)
    if op == "$ne":
        return not _eq(x, v)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if _kind(x) != _kind(v):
            return False
        return {"$gt": x > v, "$gte": x >= v, "$lt": x < v, "$lte": x <= v}[op]
    if op == "$in":
        return any(_eq(x, y) for y in v)
    if op == "$nin":
        return not any(_eq(x, y) for y in v)
    if op == "$exists":
        return (x is not _MISSING) == v
    raise AssertionError(op)


def reference(flt: dict, meta: dict, doc: str, cid: str) -> bool:
    for key, cond in flt.items():
        if key == "$and":
            ok = all(reference(c, meta, doc, cid) for c in cond)
        elif key == "$or":
            ok = any(reference(c, meta, doc, cid) for c in cond)
        elif key == "$not":
            ok = not reference(cond, meta, doc, cid)
        else:
            x = _get(meta, doc, cid, key)
            if isinstance(cond, dict):
                ok = all(_cond(x, op, v) for op, v in cond.items())
            else:
                ok = _eq(x, cond)
        if not ok:
            return False
    return True


FIELDS = st.sampled_from(
    [
        "topic",
        "year",
        "score",
        "flag",
        "lang",
        "note",
        "source.kind",
        "source.pages",
        "source",
        "missing",
        "document_id",
        "über",
    ]
)
VALUES = st.one_of(
    st.sampled_from(["biology", "physics", "en", "de", "pdf", "2016", "d0", "d2", "ü", "", "z"]),
    st.sampled_from([2010, 2015, 2016, 2018, 2020, 0.5, 1.5, 10, 0, 1, -3]),
    st.booleans(),
    st.none(),
)
ORDERED = st.one_of(
    st.sampled_from(["biology", "d", "en", "2016", "ü"]), st.integers(-5, 2025), st.floats(0, 3)
)
CONDS = st.one_of(
    VALUES,
    st.builds(lambda op, v: {op: v}, st.sampled_from(["$eq", "$ne"]), VALUES),
    st.builds(lambda op, v: {op: v}, st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), ORDERED),
    st.builds(
        lambda op, v: {op: v}, st.sampled_from(["$in", "$nin"]), st.lists(VALUES, max_size=4)
    ),
    st.builds(lambda v: {"$exists": v}, st.booleans()),
)
LEAVES = st.dictionaries(FIELDS, CONDS, min_size=1, max_size=2)
FILTERS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"$and": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"$or": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"$not": x}, inner),
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(flt=FILTERS)
def test_sql_agrees_with_the_reference_evaluator(store, flt):
    expected = [
        i
        for i, (d, m) in enumerate(zip(DOCS, METAS, strict=True))
        if reference(flt, m, d, f"{d}#{i}")
    ]
    assert rows(store, flt) == expected
