"""Retriever implementations and the registry that maps names (CLI, manifests) to classes:
the five retrievers, and the pipelines that compose them (``rerank``, ``fusion``).

Classes are imported lazily so that `import intrinsic_retrieval` does not load every model stack.
"""

from __future__ import annotations

import inspect
from importlib import import_module
from os import PathLike
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from .base import StoreRetriever
    from .pipeline import Pipeline

#: registry name -> "module:Class" (relative to this package)
REGISTRY: dict[str, str] = {
    "bm25": ".bm25:BM25Retriever",
    "dense": ".dense:DenseRetriever",
    "intra": ".intra:IntraRetriever",
    "incontext": ".incontext:InContextRetriever",
    "generative": ".generative:GenerativeDocidRetriever",
    "rerank": ".rerank:Rerank",
    "fusion": ".fusion:Fusion",
}


def available() -> list[str]:
    return sorted(REGISTRY)


def retriever_class(name: str) -> type[Any]:
    if name not in REGISTRY:
        raise InvalidInputError(f"unknown retriever {name!r}; available: {', '.join(available())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(import_module(module, __name__), cls)


def create_retriever(name: str, **kwargs: Any) -> Any:
    """Build a retriever by registry name, e.g. ``create_retriever("dense", path="idx")`` or
    ``create_retriever("rerank", first="bm25", second="incontext", path="idx")``; an option the
    retriever does not take is an `InvalidInputError` naming the ones it does."""
    cls = retriever_class(name)
    known = {
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise InvalidInputError(
            f"the {name} retriever has no option {', '.join(unknown)}; options: "
            f"{', '.join(sorted(known))}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # an option of the wrong type (e.g. from the CLI)
        raise InvalidInputError(f"bad option value for the {name} retriever: {exc}") from exc


def load_retriever(path: str | PathLike[str], **overrides: Any) -> StoreRetriever | Pipeline:
    """Reopen any saved index or pipeline; its manifest says which retriever made it."""
    from .base import StoreRetriever
    from .pipeline import Pipeline, is_pipeline

    if is_pipeline(path):
        return Pipeline.load(path, **overrides)

    return StoreRetriever.load(path, **overrides)


__all__ = ["REGISTRY", "available", "create_retriever", "load_retriever", "retriever_class"]
