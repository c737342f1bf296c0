"""Labeled queries in every shape users hold them, normalised once for every retriever's `fit`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InvalidInputError

#: ``{qid: text}`` + qrels ``{qid: {doc_id: relevance}}`` (BEIR), parallel lists of queries and
#: positives (an id, a list of ids or a relevance mapping each), ``{query: doc_id | [doc_ids]}``
#: or ``[(query, doc_id), ...]`` with no qrels
LabeledQueries = Mapping[str, Any] | Sequence[Any]


def _positive_ids(pos: Any) -> list[str]:
    if isinstance(pos, Mapping):
        return [str(d) for d, rel in pos.items() if rel and float(rel) > 0]
    if isinstance(pos, str):
        return [pos]
    if isinstance(pos, Sequence):
        return [str(d) for d in pos]
    raise InvalidInputError(
        f"a query's positives must be an id, a list of ids or a {{id: relevance}} mapping, "
        f"got {type(pos).__name__}"
    )


def labeled_pairs(queries: LabeledQueries, qrels: Any = None) -> list[tuple[str, list[str]]]:
    """``[(query text, [positive ids])]`` from any `LabeledQueries` shape; ids are document or
    chunk ids as the caller stored them. Queries with no positive are dropped (BEIR qrels list
    non-relevant judgements too); mismatched shapes raise `InvalidInputError`."""
    if isinstance(queries, str) or queries is None:
        raise InvalidInputError("queries must be a mapping or a sequence, not a single string")
    if qrels is None:
        if isinstance(queries, Mapping):  # {query text: doc_id | [doc_ids]}
            pairs = [(str(q), _positive_ids(p)) for q, p in queries.items()]
        else:  # [(query text, doc_id), ...]
            pairs = []
            for item in queries:
                if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                    raise InvalidInputError(
                        "without qrels, queries must be {query: doc ids} or (query, doc id) pairs"
                    )
                pairs.append((str(item[0]), _positive_ids(item[1])))
    elif isinstance(queries, Mapping):
        if not isinstance(qrels, Mapping):
            raise InvalidInputError("with queries given as a mapping, qrels must be one too")
        pairs = [(str(queries[q]), _positive_ids(qrels[q])) for q in queries if q in qrels]
    else:
        if isinstance(qrels, Mapping | str) or len(queries) != len(qrels):
            raise InvalidInputError("queries and their positives must have the same length")
        pairs = [(str(q), _positive_ids(p)) for q, p in zip(queries, qrels, strict=True)]
    return [(q, ids) for q, ids in pairs if ids]
