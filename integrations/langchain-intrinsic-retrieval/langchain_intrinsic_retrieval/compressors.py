"""`IntrinsicReranker`: a library retriever as a LangChain document compressor (second stage).

Put it in a `ContextualCompressionRetriever` over any first stage: it rescores only the documents
the first stage returned, each found in its own index by its ``chunk_id`` / ``document_id``
metadata (what `IntrinsicRetriever` sets) or its `Document.id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from pydantic import ConfigDict, Field, field_validator

from intrinsic_retrieval import load_retriever
from intrinsic_retrieval.adapters import arun_locked, check_reranker, rerank_records

#: metadata key of the second stage's score (the key LangChain's rerankers use)
SCORE_KEY = "relevance_score"


def _key(doc: Document) -> tuple[str | None, str | None, str]:
    meta = doc.metadata or {}
    chunk = meta.get("chunk_id") or doc.id
    doc_id = meta.get("document_id")
    return (
        None if chunk is None else str(chunk),
        None if doc_id is None else str(doc_id),
        doc.page_content,
    )


class IntrinsicReranker(BaseDocumentCompressor):
    """Rerank retrieved documents with an intrinsic-retrieval retriever (in-context, INTRA,
    generative, dense, BM25) that has indexed the same documents.

    Example:
        .. code-block:: python

            from langchain_classic.retrievers import ContextualCompressionRetriever

            first = IntrinsicRetriever.from_documents(docs, retriever="bm25", k=50)
            reranker = IntrinsicReranker(retriever=incontext, top_n=5)
            retriever = ContextualCompressionRetriever(
                base_compressor=reranker, base_retriever=first
            )

    Returned documents keep their content and metadata, plus ``relevance_score`` (the second
    stage's score). A document the reranker has not indexed raises `StageMismatchError`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Any
    """The second stage: a library retriever with `rerank` (or a pipeline's stage)."""
    top_n: int = Field(default=4, ge=1)
    """Number of documents to keep."""

    @field_validator("retriever")
    @classmethod
    def _check_retriever(cls, value: Any) -> Any:
        return check_reranker(value)

    @classmethod
    def from_path(
        cls, path: str | PathLike[str], *, top_n: int = 4, **overrides: Any
    ) -> IntrinsicReranker:
        """The reranker over an index saved at `path` (`overrides` go to `load_retriever`)."""
        return cls(retriever=load_retriever(path, **overrides), top_n=top_n)

    def _ranked(self, documents: Sequence[Document], pairs: list) -> list[Document]:
        return [
            Document(
                id=documents[i].id,
                page_content=documents[i].page_content,
                metadata={**documents[i].metadata, SCORE_KEY: hit.score},
            )
            for i, hit in pairs
        ]

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        docs = list(documents)
        pairs = rerank_records(self.retriever, query, [_key(d) for d in docs], self.top_n)
        return self._ranked(docs, pairs)

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        docs = list(documents)
        pairs = await arun_locked(
            self.retriever,
            rerank_records,
            self.retriever,
            query,
            [_key(d) for d in docs],
            self.top_n,
        )
        return self._ranked(docs, pairs)
