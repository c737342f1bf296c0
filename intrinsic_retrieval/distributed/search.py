"""Search over store parts held by Ray actors: one index too large for one machine.

Each part is opened by one actor (`load_retriever`, on whatever node Ray places it); a query fans
out to all of them and their top-k lists are merged by score. That equals the single store's
top-k exactly when a chunk's score depends only on the query and the chunk
(`StoreRetriever.local_scores`: dense retrieval). BM25 (IDF and mean length are corpus
statistics), INTRA (its decoder reads the corpus-wide C0) and in-context retrieval (the query
attends to every block at once) are refused: merging their per-part lists would rank by
something other than what one store computes (docs/scale-out.md says what exact versions need).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from ..errors import InvalidInputError, ModelMismatchError
from ..protocol import Filter, check_queries
from ..types import DocumentLike, Hit
from .indexing import connect
from .parts import PartsError, part_paths


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
        return {
            "name": r.name,
            "local": bool(getattr(r, "local_scores", False)),
            "fingerprint": r.fingerprint,
            "chunks": len(r),
        }

    def search_batch(self, queries: list[str], k: int, filter: Filter | None) -> list[list[Hit]]:
        return self.retriever.search_batch(queries, k=k, filter=filter)

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


def merge_top_k(per_part: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The best `k` of several parts' ranked hits, by score (ties: earlier part, then rank,
    as one store's row order would break them), re-ranked from 1."""
    pool = [(h.score, p, h.rank, h) for p, hits in enumerate(per_part) for h in hits]
    pool.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [
        Hit(h.chunk_id, h.document_id, h.text, h.score, i + 1, dict(h.metadata))
        for i, (_, _, _, h) in enumerate(pool[:k])
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
        infos = ray.get([a.info.remote() for a in self._actors])
        first = infos[0]
        for path, info in zip(self.paths, infos, strict=True):
            if info["fingerprint"] != first["fingerprint"]:
                self.close()
                raise ModelMismatchError(
                    path, expected=first["fingerprint"], found=info["fingerprint"]
                )
            if not info["local"]:
                self.close()
                raise InvalidInputError(
                    f"{info['name']} scores depend on the whole corpus (corpus statistics or "
                    f"attention across chunks), so merging per-part top-k lists would not give "
                    f"the single store's ranking; combine the parts into one store instead "
                    f"(intrinsic_retrieval.distributed.combine)"
                )
        self.retriever = first["name"]

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        return self.search_batch([query], k=k, filter=filter)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, filter: Filter | None = None
    ) -> list[list[Hit]]:
        queries, k = check_queries(queries, k)
        if not queries:
            return []
        refs = [a.search_batch.remote(list(queries), k, filter) for a in self._actors]
        per_part = self._ray.get(refs)  # [part][query] -> hits
        return [merge_top_k([p[i] for p in per_part], k) for i in range(len(queries))]

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
        self._ray.get(
            [
                a.save.remote(str(root / p.name))
                for a, p in zip(self._actors, self.paths, strict=True)
            ]
        )

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
