"""`IntrinsicRetriever`: any intrinsic-retrieval `Retriever` as a LlamaIndex `BaseRetriever`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.schema import (
    BaseNode,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

from intrinsic_retrieval import Filter, Hit, InvalidFilterError, Retriever
from intrinsic_retrieval.adapters import (
    arun_locked,
    check_k,
    check_retriever,
    load_with_config,
    resolve_retriever,
    run_locked,
    save_with_config,
)
from intrinsic_retrieval.types import as_document

from .filters import to_library_filter

#: Settings file written next to the index by `IntrinsicRetriever.persist`.
CONFIG_FILE = "llama_index_retriever.json"

#: Metadata keys added to every node; kept out of LLM prompts and embeddings.
RESULT_METADATA_KEYS = ["document_id", "chunk_id", "rank"]


def hit_to_node(hit: Hit) -> NodeWithScore:
    """A `TextNode` whose id is the chunk id, whose SOURCE relationship (``ref_doc_id``) is the
    parent document, and whose metadata keeps the original metadata plus ids and rank."""
    node = TextNode(
        id_=hit.chunk_id,
        text=hit.text,
        metadata={
            **hit.metadata,
            "document_id": hit.document_id,
            "chunk_id": hit.chunk_id,
            "rank": hit.rank,
        },
        excluded_llm_metadata_keys=list(RESULT_METADATA_KEYS),
        excluded_embed_metadata_keys=list(RESULT_METADATA_KEYS),
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=hit.document_id)},
    )
    return NodeWithScore(node=node, score=hit.score)


def _filters_to_json(filters: MetadataFilters | Filter | None) -> dict[str, Any] | None:
    if filters is None:
        return None
    if isinstance(filters, MetadataFilters):
        return {"kind": "metadata_filters", "value": filters.model_dump(mode="json")}
    return {"kind": "library", "value": filters}


def _filters_from_json(obj: Mapping[str, Any] | None) -> MetadataFilters | Filter | None:
    if not obj:
        return None
    if obj.get("kind") == "metadata_filters":
        return MetadataFilters.model_validate(obj["value"])
    return dict(obj["value"])


class IntrinsicRetriever(BaseRetriever):
    """LlamaIndex retriever over any intrinsic-retrieval retriever (BM25, dense, INTRA, ...).

    ``aretrieve`` runs the search in a worker thread under the model's lock, so it never blocks
    the event loop. Node ids are chunk ids; ``node.ref_doc_id`` is the parent document id.

    Args:
        retriever: the wrapped `intrinsic_retrieval.Retriever`.
        similarity_top_k: number of nodes to return.
        filters: `MetadataFilters` (translated to the library's filters, applied before
            scoring) or a library filter dict.
    """

    def __init__(
        self,
        retriever: Retriever,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        filters: MetadataFilters | MetadataFilter | Filter | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        self._retriever = check_retriever(retriever)
        self.similarity_top_k = check_k(similarity_top_k, "similarity_top_k")
        if isinstance(filters, MetadataFilter):
            filters = MetadataFilters(filters=[filters])
        if filters is not None and not isinstance(filters, MetadataFilters | dict):
            raise InvalidFilterError(
                f"filters must be MetadataFilters or a dict, got {type(filters).__name__}"
            )
        self.filters = filters
        self._library_filter = to_library_filter(filters)  # fail early on unsupported operators
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def retriever(self) -> Retriever:
        return self._retriever

    # ------------------------------------------------------------------ retrieval
    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = run_locked(
            self._retriever,
            self._retriever.search,
            query_bundle.query_str,
            k=self.similarity_top_k,
            filter=self._library_filter,
        )
        return [hit_to_node(h) for h in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = await arun_locked(
            self._retriever,
            self._retriever.search,
            query_bundle.query_str,
            k=self.similarity_top_k,
            filter=self._library_filter,
        )
        return [hit_to_node(h) for h in hits]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_defaults(
        cls,
        *,
        nodes: Iterable[BaseNode] | None = None,
        documents: Iterable[Any] | None = None,
        retriever: str | Retriever = "bm25",
        retriever_kwargs: Mapping[str, Any] | None = None,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        filters: MetadataFilters | MetadataFilter | Filter | None = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
        on_duplicate: str = "error",
    ) -> IntrinsicRetriever:
        """Build (by registry name) or take a retriever, index `nodes` and/or `documents` into
        it, and wrap it. The library chunks text itself, so whole documents are fine."""
        inner = resolve_retriever(retriever, retriever_kwargs)
        items = [*(nodes or []), *(documents or [])]
        if items:
            run_locked(inner, inner.add, [as_document(x) for x in items], on_duplicate=on_duplicate)
        return cls(
            inner,
            similarity_top_k=similarity_top_k,
            filters=filters,
            callback_manager=callback_manager,
            verbose=verbose,
        )

    # ------------------------------------------------------------------ index maintenance
    def add(self, items: Iterable[Any], *, on_duplicate: str = "error") -> list[str]:
        """Index LlamaIndex `Document`s / nodes (or strings); returns the document ids added."""
        docs = [as_document(x) for x in items]
        return run_locked(self._retriever, self._retriever.add, docs, on_duplicate=on_duplicate)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove documents (document id / ``ref_doc_id``) or chunks (node id); returns the
        number of chunks removed."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        return run_locked(self._retriever, self._retriever.delete, ids)

    # ------------------------------------------------------------------ persistence
    def persist(self, persist_dir: str | PathLike[str]) -> Path:
        """Save the index and every constructor argument but `callback_manager` to
        `persist_dir`. The directory remains a plain index that `load_retriever` can open."""
        config = {
            "similarity_top_k": self.similarity_top_k,
            "filters": _filters_to_json(self.filters),
            "verbose": bool(self._verbose),
        }
        return save_with_config(self._retriever, persist_dir, CONFIG_FILE, config)

    @classmethod
    def from_persist_dir(
        cls,
        persist_dir: str | PathLike[str],
        *,
        retriever_overrides: Mapping[str, Any] | None = None,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> IntrinsicRetriever:
        """Reopen what `persist` wrote (or any saved index). `retriever_overrides` go to the
        retriever's ``load`` (e.g. ``{"device": "cuda"}``); `kwargs` override saved arguments."""
        inner, config = load_with_config(persist_dir, CONFIG_FILE, retriever_overrides)
        args: dict[str, Any] = {
            "similarity_top_k": config.get("similarity_top_k", DEFAULT_SIMILARITY_TOP_K),
            "filters": _filters_from_json(config.get("filters")),
            "verbose": config.get("verbose", False),
        }
        args.update(kwargs)
        return cls(inner, callback_manager=callback_manager, **args)
