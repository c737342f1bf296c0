"""Fakes shared by the integration tests: protocol implementations that are not `StoreRetriever`s,
so the adapters are shown to depend on the `Retriever` protocol only."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from intrinsic_retrieval import Hit
from intrinsic_retrieval.types import as_documents

#: Deadlock guard for the concurrency fakes: a blocked event loop makes them time out and fail.
WAIT_S = 20.0


class ListRetriever:
    """Minimal `Retriever`: scores by shared words. `hook` runs inside every search."""

    def __init__(self, hook: Any = None, lock: Any = "default") -> None:
        self.docs: dict[str, Any] = {}
        self.hook = hook
        if lock != "default":
            self.lock = lock

    def add(self, documents: Iterable[Any], *, on_duplicate: str = "error") -> list[str]:
        docs = as_documents(documents)
        for d in docs:
            self.docs[str(d.id)] = d
        return [str(d.id) for d in docs]

    def delete(self, ids: Iterable[str]) -> int:
        return sum(self.docs.pop(i, None) is not None for i in ids)

    def search(self, query: str, k: int = 10, filter: dict | None = None) -> list[Hit]:
        if self.hook is not None:
            self.hook()
        words = set(query.lower().split())
        scored = sorted(
            ((len(words & set(d.text.lower().split())), i) for i, d in self.docs.items()),
            key=lambda t: (-t[0], t[1]),
        )[:k]
        return [
            Hit(i, i, self.docs[i].text, float(s), r + 1, dict(self.docs[i].metadata))
            for r, (s, i) in enumerate(scored)
        ]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, filter: dict | None = None
    ) -> list[list[Hit]]:
        return [self.search(q, k, filter) for q in queries]

    def save(self, path: Any) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        data = [
            {"id": i, "text": d.text, "metadata": dict(d.metadata)} for i, d in self.docs.items()
        ]
        (Path(path) / "docs.json").write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Any, **overrides: Any) -> ListRetriever:
        r = cls(**overrides)
        r.add(json.loads((Path(path) / "docs.json").read_text()))
        return r

    def __len__(self) -> int:
        return len(self.docs)


class ConcurrencyProbe:
    """Counts how many searches are inside the model at once."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self.inside = 0
        self.max_inside = 0

    def enter(self) -> None:
        with self._guard:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)

    def leave(self) -> None:
        with self._guard:
            self.inside -= 1
