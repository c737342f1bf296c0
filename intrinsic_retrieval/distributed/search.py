"""Search over store parts held by Ray actors: one index too large for one machine.

Each part is opened by one actor (`load_retriever`, on whatever node Ray places it); a query fans
out to all of them and their top-k lists are merged by score. That equals the single store's
top-k exactly when a chunk's score depends only on the query and the chunk
(`StoreRetriever.local_scores`: dense retrieval), or on the query, the chunk and corpus
statistics that the parts can sum (`StoreRetriever.shares_statistics`: BM25's document
frequencies, row count and mean length are gathered from every part first, then every part
scores with the sums). INTRA's full pass reads a context C0 drawn from the whole corpus, so it
runs in phases (`distributed_scoring() == "context"`): every part proposes its encoder-stage
top-k0, the merged top-k0 is C0, its stored token states are gathered from the parts that hold
them, one decoder pass (on the first part's actor) folds the query over them, and every part
scores its chunks with the folded queries. In-context retrieval (the query attends to every block
at once; the attention of one layer feeds the next) is refused: merging per-part lists would rank
by something other than what one store computes (docs/scale-out.md says what an exact version
needs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from ..errors import InvalidInputError, ModelMismatchError, RetrievalError
from ..protocol import Filter, check_queries
from ..types import DocumentLike, Hit
from .indexing import connect
from .parts import PartsError, part_name, part_paths


class _PartServer:
    """One store part, opened once and searched many times (a Ray actor)."""

    def __init__(self, path: str, threads: int | None, overrides: dict[str, Any]) -> None:
        import torch

        from ..retrievers import load_retriever

        if threads:
            torch.set_num_threads(threads)
        self.retriever = load_retriever(path, show_progress=False, **overrides)

    def info(self) -> dict[str, Any]:
        r = self.retriever
        info = {
            "name": r.name,
            "scoring": r.distributed_scoring(),
            "fingerprint": r.fingerprint,
            "init": r.init_args(),
        }
        if info["scoring"] == "context":
            info["head"] = r.head_digest()
            info["k0"] = int(r.k0)
        return info

    def context(self, queries: list[str], k0: int, filter: Filter | None) -> list[list[Hit]]:
        with self.retriever.using(mode="encoder"):
            return self.retriever.search_batch(queries, k=k0, filter=filter)

    def context_states(self, chunk_ids: list[str]) -> list[Any]:
        return self.retriever.context_states(chunk_ids)

    def fold_query(self, query: str, states: list[Any]) -> Any:
        return self.retriever.fold_query(query, states)

    def search_folded(
        self, folded: Any, k: int, filter: Filter | None, context_ids: list[str]
    ) -> list[Hit]:
        return self.retriever.search_folded(folded, k, filter, context_ids)

    def corpus_statistics(self, queries: list[str]) -> dict[str, Any]:
        return self.retriever.corpus_statistics(queries)

    def search_batch(
        self, queries: list[str], k: int, filter: Filter | None, statistics: Any = None
    ) -> list[list[Hit]]:
        return self.retriever.search_batch(queries, k=k, filter=filter, statistics=statistics)

    def delete(self, ids: list[str]) -> int:
        return self.retriever.delete(ids)

    def add(self, documents: list[Any], on_duplicate: str) -> list[str]:
        return self.retriever.add(documents, on_duplicate=on_duplicate)

    def document_ids(self, ids: list[str]) -> list[str]:
        return sorted(self.retriever.existing_document_ids(ids))

    def save(self, path: str) -> None:
        self.retriever.save(path)

    def size(self) -> int:
        return len(self.retriever)


def best_of_parts(per_part: Sequence[Sequence[Hit]], k: int) -> list[tuple[int, Hit]]:
    """The best `k` of several parts' ranked hits with the part each came from, by score (ties:
    earlier part, then rank, as one store's row order would break them)."""
    pool = [(p, h) for p, hits in enumerate(per_part) for h in hits]
    pool.sort(key=lambda x: (-x[1].score, x[0], x[1].rank))
    return pool[:k]


def merge_top_k(per_part: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """`best_of_parts`, re-ranked from 1."""
    return [
        Hit(h.chunk_id, h.document_id, h.text, h.score, i + 1, dict(h.metadata))
        for i, (_, h) in enumerate(best_of_parts(per_part, k))
    ]


class DistributedRetriever:
    """A `Retriever` over store parts, each served by a Ray actor (see the module docstring).

    `parts`: a parts directory (``<store>.parts``, as `index_distributed(...,
    combine_parts=False)` leaves it) or a list of store paths. `address` is the Ray cluster
    (None: the one this process is connected to, or a local one). New documents go to the part
    with the fewest chunks; deletions go to every part.
    """

    name = "distributed"

    def __init__(
        self,
        parts: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        address: str | None = None,
        cpus_per_part: float = 1,
        gpus_per_part: float = 0,
        **overrides: Any,
    ) -> None:
        if isinstance(parts, str | os.PathLike):
            self.paths = part_paths(Path(parts))
        else:
            self.paths = [Path(p) for p in parts]
        if not self.paths:
            raise PartsError("no parts to search")
        ray = connect(address)
        self._ray = ray
        actor = ray.remote(_PartServer).options(num_cpus=cpus_per_part, num_gpus=gpus_per_part)
        threads = max(1, int(cpus_per_part))
        self._actors = [actor.remote(str(p), threads, dict(overrides)) for p in self.paths]
        try:
            infos = ray.get([a.info.remote() for a in self._actors])
        except Exception as exc:  # a part that does not open: its own typed error, if any
            self.close()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, RetrievalError):
                raise cause from None
            raise PartsError(f"a part could not be opened: {exc}") from exc
        first = infos[0]
        for path, info in zip(self.paths, infos, strict=True):
            if info["fingerprint"] != first["fingerprint"]:
                self.close()
                raise ModelMismatchError(
                    path, expected=first["fingerprint"], found=info["fingerprint"]
                )
            if info["init"] != first["init"]:
                self.close()
                raise PartsError(
                    f"part {path} was built with other options than {self.paths[0]}; parts "
                    "must share every index option"
                )
            if info.get("head") != first.get("head"):
                self.close()
                raise PartsError(
                    f"part {path} scores with another INTRA retrieval head than "
                    f"{self.paths[0]}; load the same head into every part (load_head, save)"
                )
            if info["scoring"] == "none":
                self.close()
                raise InvalidInputError(
                    f"{info['name']} scores depend on the whole corpus through more than "
                    f"shareable statistics (attention across chunks), so merging per-part top-k "
                    f"lists would not give the single store's ranking; combine the parts into "
                    f"one store instead (intrinsic_retrieval.distributed.combine)"
                )
        self.retriever = first["name"]
        self.scoring = first["scoring"]
        self.k0 = int(first.get("k0", 0))

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        return self.search_batch([query], k=k, filter=filter)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, filter: Filter | None = None
    ) -> list[list[Hit]]:
        queries, k = check_queries(queries, k)
        if not queries:
            return []
        if self.scoring == "context":
            return self._search_in_context(list(queries), k, filter)
        stats = None
        if self.scoring == "statistics":  # first the corpus statistics, summed over every part
            from ..retrievers import retriever_class

            parts = self._ray.get([a.corpus_statistics.remote(list(queries)) for a in self._actors])
            stats = retriever_class(self.retriever).merge_statistics(parts)
        refs = [a.search_batch.remote(list(queries), k, filter, stats) for a in self._actors]
        per_part = self._ray.get(refs)  # [part][query] -> hits
        return [merge_top_k([p[i] for p in per_part], k) for i in range(len(queries))]

    def _search_in_context(
        self, queries: list[str], k: int, filter: Filter | None
    ) -> list[list[Hit]]:
        """INTRA's phases over the parts (module docstring)."""
        ray, actors = self._ray, self._actors
        if self.k0 == 0:  # C0 = {}: no proposals to gather
            proposals: list[list[list[Hit]]] = [[[] for _ in queries] for _ in actors]
        else:
            proposals = ray.get([a.context.remote(queries, self.k0, filter) for a in actors])
        contexts = []  # per query: [(part, chunk id)] in C0 order
        for i in range(len(queries)):
            best = best_of_parts([hits[i] for hits in proposals], self.k0)
            contexts.append([(p, h.chunk_id) for p, h in best])
        wanted = [
            sorted({c for ctx in contexts for p, c in ctx if p == j}) for j in range(len(actors))
        ]
        fetched = ray.get([a.context_states.remote(w) for a, w in zip(actors, wanted, strict=True)])
        states = {}
        for ids, got in zip(wanted, fetched, strict=True):
            states.update(zip(ids, got, strict=True))
        folds = [
            actors[0].fold_query.remote(q, [states[c] for _, c in ctx])
            for q, ctx in zip(queries, contexts, strict=True)
        ]
        refs = [
            [a.search_folded.remote(f, k, filter, [c for _, c in ctx]) for a in actors]
            for f, ctx in zip(folds, contexts, strict=True)
        ]
        return [merge_top_k(ray.get(r), k) for r in refs]

    def add(self, documents: Iterable[DocumentLike], *, on_duplicate: str = "error") -> list[str]:
        from ..types import as_documents

        docs = as_documents(documents)
        ids = [str(d.id) for d in docs if d.id is not None]
        present = set()
        for found in self._ray.get([a.document_ids.remote(ids) for a in self._actors]):
            present |= set(found)
        if present and on_duplicate == "error":
            from ..errors import DuplicateIdError

            raise DuplicateIdError(sorted(present))
        docs = [d for d in docs if d.id not in present]
        if not docs:
            return []
        sizes = self._ray.get([a.size.remote() for a in self._actors])
        target = self._actors[sizes.index(min(sizes))]
        return self._ray.get(target.add.remote(docs, on_duplicate))

    def delete(self, ids: Iterable[str]) -> int:
        ids = [ids] if isinstance(ids, str) else list(ids)
        return sum(self._ray.get([a.delete.remote(ids) for a in self._actors]))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Copy every part to ``path/part-NNNNN`` (each part atomically)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._ray.get([a.save.remote(str(root / part_name(i))) for i, a in enumerate(self._actors)])

    @classmethod
    def load(cls, path: str | os.PathLike[str], **overrides: Any) -> Self:
        root = Path(path)
        if (root / "plan.json").exists():
            return cls(root, **overrides)
        return cls(sorted(p for p in root.iterdir() if (p / "manifest.json").exists()), **overrides)

    def __len__(self) -> int:
        return sum(self._ray.get([a.size.remote() for a in self._actors]))

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        self._actors = []
