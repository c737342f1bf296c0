"""`Rerank`: a first stage's top candidates rescored by a second stage, as one retriever.

The first stage may be any `Retriever`; the second is a library retriever, which scores exactly
the candidates through `StoreRetriever.rerank` without reading the rest of its store (in-context
retrieval attends only to the candidates' stored K/V, INTRA takes them as its pool and its C0
from the first stage's best, generative retrieval constrains its trie to them).
"""

from __future__ import annotations

import time
from os import PathLike
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..protocol import Filter
from ..types import Hit
from .pipeline import Pipeline, StageSpec


class Rerank(Pipeline):
    """``Rerank("bm25", {"name": "incontext", "store_dtype": "int8"}, candidates=50,
    path="idx")``: BM25's top 50 chunks reranked by in-context retrieval.

    Stages are retriever objects, registry names or ``{"name": ..., **options}`` mappings (built
    under `path`/first and `path`/second). `candidates`: first-stage hits handed to the second
    stage (`search` refuses ``k > candidates``). Filters apply in the first stage (and mask the
    second stage's chunks as well). Hits are the second stage's chunks and scores.
    """

    name = "rerank"

    def __init__(
        self,
        first: StageSpec,
        second: StageSpec,
        *,
        candidates: int = 50,
        path: str | PathLike[str] | None = None,
        check_stages: bool = True,
        show_progress: bool | None = None,
    ) -> None:
        if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
            raise InvalidInputError(f"candidates must be an int >= 1, got {candidates!r}")
        super().__init__(
            {"first": first, "second": second},
            {"candidates": candidates},
            path=path,
            check_stages=check_stages,
            show_progress=show_progress,
        )
        problem = None
        if not callable(getattr(self.second, "rerank", None)):
            problem = (
                f"the second stage must score a candidate subset of its own index (a library "
                f"retriever); {type(self.second).__name__} has no rerank()"
            )
        limit = getattr(self.first, "max_k", None)
        if isinstance(limit, int) and candidates > limit:
            problem = f"candidates={candidates} exceeds the {limit} hits the first stage can return"
        if problem:
            self._close_owned()
            raise InvalidInputError(problem)
        self.candidates = candidates

    @property
    def max_k(self) -> int:
        return self.candidates

    @property
    def first(self) -> Any:
        return self.stages["first"]

    @property
    def second(self) -> Any:
        return self.stages["second"]

    def _returning_role(self) -> str:
        return "second"

    def _search(self, queries: list[str], k: int, filter: Filter | None) -> list[list[Hit]]:
        if k > self.candidates:
            raise InvalidInputError(
                f"k={k} exceeds the {self.candidates} candidates the first stage hands on; "
                "ask for fewer or build the pipeline with more candidates"
            )
        t0 = time.perf_counter()
        firsts = self.first.search_batch(queries, k=self.candidates, filter=filter)
        self._time("first", time.perf_counter() - t0, len(queries))
        out = []
        for query, hits in zip(queries, firsts, strict=True):
            t0 = time.perf_counter()
            out.append(self.second.rerank(query, hits, k=k, filter=filter) if hits else [])
            self._time("second", time.perf_counter() - t0, 1)
        return out

    @classmethod
    def _from_stages(cls, stages: dict[str, Any], options: dict[str, Any], *, path: Path) -> Rerank:
        return cls(stages["first"], stages["second"], **options, path=path)
