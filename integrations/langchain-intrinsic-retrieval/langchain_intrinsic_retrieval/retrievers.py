"""`IntrinsicRetriever`: any intrinsic-retrieval `Retriever` as a LangChain `BaseRetriever`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field, field_validator

from intrinsic_retrieval import Document as IRDocument
from intrinsic_retrieval import Filter, Hit, InvalidInputError, Retriever
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

#: Settings file written next to the index by `IntrinsicRetriever.save`.
CONFIG_FILE = "langchain_retriever.json"

# search kwargs LangChain itself may forward through `invoke(..., **kwargs)`
_IGNORED_KWARGS = frozenset({"verbose"})


def hit_to_document(hit: Hit) -> Document:
    """A LangChain `Document` keeping everything the hit knows: the original metadata plus
    ``score``, ``rank``, ``document_id`` (the parent) and ``chunk_id`` (= ``Document.id``)."""
    return Document(
        id=hit.chunk_id,
        page_content=hit.text,
        metadata={
            **hit.metadata,
            "document_id": hit.document_id,
            "chunk_id": hit.chunk_id,
            "score": hit.score,
            "rank": hit.rank,
        },
    )


def _to_library(docs: Iterable[Any], ids: Sequence[str] | None) -> list[IRDocument]:
    out = [as_document(d) for d in docs]
    if ids is not None:
        ids = list(ids)
        if len(ids) != len(out):
            raise InvalidInputError(f"got {len(ids)} ids for {len(out)} documents")
        out = [
            IRDocument(text=d.text, id=str(i), metadata=d.metadata)
            for d, i in zip(out, ids, strict=True)
        ]
    return out


class IntrinsicRetriever(BaseRetriever):
    """LangChain retriever over any intrinsic-retrieval retriever (BM25, dense, INTRA, ...).

    Searches run in a worker thread under the wrapped retriever's model lock, so ``ainvoke``
    never blocks the event loop and concurrent calls on one model never interleave inside it.

    Example:
        .. code-block:: python

            retriever = IntrinsicRetriever.from_documents(docs, retriever="bm25", k=4)
            retriever.invoke("query", k=2, filter={"topic": "biology"})
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Any
    """The wrapped `intrinsic_retrieval.Retriever`."""
    k: int = Field(default=4, ge=1)
    """Number of documents to return; ``invoke(query, k=...)`` overrides it per call."""
    filter: dict[str, Any] | None = None
    """Library metadata filter (``{"topic": "biology", "year": {"$gte": 2015}}``); a per-call
    ``filter=`` replaces it."""

    @field_validator("retriever")
    @classmethod
    def _check_retriever(cls, value: Any) -> Any:
        return check_retriever(value)

    # ------------------------------------------------------------------ search
    def _search_args(
        self, k: int | None, filter: Filter | None, kwargs: Mapping[str, Any]
    ) -> tuple[int, Filter | None]:
        unknown = set(kwargs) - _IGNORED_KWARGS
        if unknown:
            raise InvalidInputError(
                f"unexpected search argument(s) {sorted(unknown)}; supported: k, filter"
            )
        return check_k(self.k if k is None else k), self.filter if filter is None else filter

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        filter: Filter | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        k_, flt = self._search_args(k, filter, kwargs)
        hits = run_locked(self.retriever, self.retriever.search, query, k=k_, filter=flt)
        return [hit_to_document(h) for h in hits]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
        filter: Filter | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        k_, flt = self._search_args(k, filter, kwargs)
        hits = await arun_locked(self.retriever, self.retriever.search, query, k=k_, filter=flt)
        return [hit_to_document(h) for h in hits]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_documents(
        cls,
        documents: Iterable[Any],
        *,
        retriever: str | Retriever = "bm25",
        retriever_kwargs: Mapping[str, Any] | None = None,
        ids: Sequence[str] | None = None,
        on_duplicate: str = "error",
        **kwargs: Any,
    ) -> IntrinsicRetriever:
        """Index `documents` (LangChain `Document`s, strings, ...) and wrap the retriever.

        `retriever` is a registry name (built with `retriever_kwargs`) or a retriever instance;
        `kwargs` are this class's fields (``k``, ``filter``, ``tags``, ...).
        """
        inner = resolve_retriever(retriever, retriever_kwargs)
        run_locked(inner, inner.add, _to_library(documents, ids), on_duplicate=on_duplicate)
        return cls(retriever=inner, **kwargs)

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str],
        metadatas: Iterable[Mapping[str, Any]] | None = None,
        ids: Sequence[str] | None = None,
        *,
        retriever: str | Retriever = "bm25",
        retriever_kwargs: Mapping[str, Any] | None = None,
        on_duplicate: str = "error",
        **kwargs: Any,
    ) -> IntrinsicRetriever:
        """Like `from_documents` for raw texts with optional per-text metadata and ids."""
        texts = list(texts)
        metas = [{} for _ in texts] if metadatas is None else [dict(m) for m in metadatas]
        if len(metas) != len(texts):
            raise InvalidInputError(f"got {len(metas)} metadatas for {len(texts)} texts")
        docs = [Document(page_content=t, metadata=m) for t, m in zip(texts, metas, strict=True)]
        return cls.from_documents(
            docs,
            retriever=retriever,
            retriever_kwargs=retriever_kwargs,
            ids=ids,
            on_duplicate=on_duplicate,
            **kwargs,
        )

    # ------------------------------------------------------------------ index maintenance
    def add_documents(
        self,
        documents: Iterable[Any],
        *,
        ids: Sequence[str] | None = None,
        on_duplicate: str = "error",
    ) -> list[str]:
        """Index more documents; returns the ids of those added. A document's ``id`` (or the
        matching entry of `ids`) becomes its document id; without one a content hash is used."""
        docs = _to_library(documents, ids)
        return run_locked(self.retriever, self.retriever.add, docs, on_duplicate=on_duplicate)

    async def aadd_documents(
        self,
        documents: Iterable[Any],
        *,
        ids: Sequence[str] | None = None,
        on_duplicate: str = "error",
    ) -> list[str]:
        docs = _to_library(documents, ids)
        return await arun_locked(
            self.retriever, self.retriever.add, docs, on_duplicate=on_duplicate
        )

    def delete(self, ids: Iterable[str]) -> int:
        """Remove documents (by document id) or single chunks (by chunk id, i.e. the ``id`` of a
        returned `Document`); returns the number of chunks removed."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        return run_locked(self.retriever, self.retriever.delete, ids)

    async def adelete(self, ids: Iterable[str]) -> int:
        ids = [ids] if isinstance(ids, str) else list(ids)
        return await arun_locked(self.retriever, self.retriever.delete, ids)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | PathLike[str]) -> Path:
        """Save the index and this wrapper's settings (k, filter, name, tags, metadata) to
        `path`. The directory remains a plain index that `load_retriever` can open."""
        config = {
            "k": self.k,
            "filter": self.filter,
            "name": self.name,
            "tags": self.tags,
            "metadata": self.metadata,
        }
        return save_with_config(self.retriever, path, CONFIG_FILE, config)

    @classmethod
    def load(
        cls,
        path: str | PathLike[str],
        *,
        retriever_overrides: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> IntrinsicRetriever:
        """Reopen what `save` wrote (or any saved index). `retriever_overrides` go to the
        retriever's ``load`` (e.g. ``{"device": "cuda"}``); `kwargs` override saved fields."""
        inner, config = load_with_config(path, CONFIG_FILE, retriever_overrides)
        fields = {k: v for k, v in config.items() if v is not None}
        return cls(retriever=inner, **{**fields, **kwargs})
