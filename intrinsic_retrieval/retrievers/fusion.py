"""`Fusion`: reciprocal-rank fusion of several retrievers (the INTRA paper's hybrid baseline).

Each retriever ranks the corpus on its own; a document scores ``sum_i w_i / (rrf_k + rank_i)``
over the retrievers that returned it (rank of its best chunk, from 1; Cormack et al., 2009).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..protocol import Filter
from ..types import Hit
from .pipeline import Pipeline, StageSpec


class Fusion(Pipeline):
    """``Fusion(["bm25", "dense"], path="idx")``: RRF of BM25 and dense retrieval.

    `retrievers`: retriever objects, registry names or ``{"name": ..., **options}`` mappings
    (built under `path`/stage0, stage1, ...). Each is asked for its top `depth` hits (`search`
    refuses ``k > depth``); `rrf_k` damps the top ranks; `weights` (default 1 each) scale each
    retriever's votes. A fused hit is the best chunk of its document from the first retriever
    that returned it, with the fused score.
    """

    name = "fusion"

    def __init__(
        self,
        retrievers: Sequence[StageSpec],
        *,
        rrf_k: float = 60.0,
        depth: int = 100,
        weights: Sequence[float] | None = None,
        path: str | PathLike[str] | None = None,
        check_stages: bool = True,
        show_progress: bool | None = None,
    ) -> None:
        if isinstance(retrievers, str) or not isinstance(retrievers, Sequence) or not retrievers:
            raise InvalidInputError("retrievers must be a non-empty list of retrievers or names")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise InvalidInputError(f"depth must be an int >= 1, got {depth!r}")
        if isinstance(rrf_k, bool) or not isinstance(rrf_k, int | float) or rrf_k < 0:
            raise InvalidInputError(f"rrf_k must be a number >= 0, got {rrf_k!r}")
        if weights is None:
            weights = [1.0] * len(retrievers)
        if len(weights) != len(retrievers) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in weights
        ):
            raise InvalidInputError(
                f"weights must be one number >= 0 per retriever ({len(retrievers)}), "
                f"got {weights!r}"
            )
        super().__init__(
            {f"stage{i}": r for i, r in enumerate(retrievers)},
            {"rrf_k": float(rrf_k), "depth": depth, "weights": [float(w) for w in weights]},
            path=path,
            check_stages=check_stages,
            show_progress=show_progress,
        )
        self.rrf_k, self.depth = float(rrf_k), depth
        self.weights = [float(w) for w in weights]

    @property
    def max_k(self) -> int:
        return self.depth

    def _search(self, queries: list[str], k: int, filter: Filter | None) -> list[list[Hit]]:
        if k > self.depth:
            raise InvalidInputError(
                f"k={k} exceeds the depth of {self.depth} hits asked of each retriever; ask for "
                "fewer or build the fusion with a larger depth"
            )
        runs = []
        for role, r in self.stages.items():
            t0 = time.perf_counter()
            runs.append(r.search_batch(queries, k=self.depth, filter=filter))
            self._time(role, time.perf_counter() - t0, len(queries))
        return [self.fuse([run[i] for run in runs], k) for i in range(len(queries))]

    def fuse(self, rankings: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
        """RRF of one query's rankings, at document level."""
        scores: dict[str, float] = {}
        best: dict[str, Hit] = {}
        for w, hits in zip(self.weights, rankings, strict=True):
            rank = 0
            seen: set[str] = set()
            for h in hits:  # a document ranks where its best chunk does
                if h.document_id in seen:
                    continue
                seen.add(h.document_id)
                rank += 1
                scores[h.document_id] = scores.get(h.document_id, 0.0) + w / (self.rrf_k + rank)
                best.setdefault(h.document_id, h)
        top = sorted(scores, key=lambda d: (-scores[d], d))[:k]
        return [
            Hit(
                chunk_id=best[d].chunk_id,
                document_id=d,
                text=best[d].text,
                score=scores[d],
                rank=i + 1,
                metadata=dict(best[d].metadata),
            )
            for i, d in enumerate(top)
        ]

    @classmethod
    def _from_stages(cls, stages: dict[str, Any], options: dict[str, Any], *, path: Path) -> Fusion:
        roles = [f"stage{i}" for i in range(len(stages))]
        if sorted(stages) != sorted(roles):
            from ..errors import StoreCorruptedError

            raise StoreCorruptedError(
                path / "pipeline.json", f"a fusion's stages are {roles}, not {list(stages)}"
            )
        return cls([stages[role] for role in roles], **options, path=path)
