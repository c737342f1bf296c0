"""`IntrinsicRerank`: a library retriever as a LlamaIndex node postprocessor (second stage).

Give it to a query engine (``node_postprocessors=[IntrinsicRerank(...)]``) over any first-stage
retriever: it rescores only the retrieved nodes, each found in its own index by its
``chunk_id`` / ``document_id`` metadata (what `IntrinsicRetriever` sets) or its node id and
``ref_doc_id``.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle
from pydantic import Field, field_validator

from intrinsic_retrieval import InvalidInputError, load_retriever
from intrinsic_retrieval.adapters import arun_locked, check_reranker, rerank_records


def _key(n: NodeWithScore) -> tuple[str | None, str | None, str]:
    meta = n.node.metadata or {}
    chunk = meta.get("chunk_id") or n.node.node_id
    doc = meta.get("document_id") or n.node.ref_doc_id
    return (
        None if chunk is None else str(chunk),
        None if doc is None else str(doc),
        n.node.get_content(),
    )


class IntrinsicRerank(BaseNodePostprocessor):
    """Rerank retrieved nodes with an intrinsic-retrieval retriever (in-context, INTRA,
    generative, dense, BM25) that has indexed the same documents; a node's score becomes the
    second stage's. A node the reranker has not indexed raises `StageMismatchError`."""

    retriever: Any = Field(description="The second stage: a library retriever with rerank().")
    top_n: int = Field(default=4, ge=1, description="Number of nodes to keep.")

    @field_validator("retriever")
    @classmethod
    def _check_retriever(cls, value: Any) -> Any:
        return check_reranker(value)

    @classmethod
    def class_name(cls) -> str:
        return "IntrinsicRerank"

    @classmethod
    def from_path(
        cls, path: str | PathLike[str], *, top_n: int = 4, **overrides: Any
    ) -> IntrinsicRerank:
        """The reranker over an index saved at `path` (`overrides` go to `load_retriever`)."""
        return cls(retriever=load_retriever(path, **overrides), top_n=top_n)

    def _query(self, query_bundle: QueryBundle | None) -> str:
        if query_bundle is None:
            raise InvalidInputError("IntrinsicRerank needs the query (a query_bundle)")
        return query_bundle.query_str

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        pairs = rerank_records(
            self.retriever, self._query(query_bundle), [_key(n) for n in nodes], self.top_n
        )
        return [NodeWithScore(node=nodes[i].node, score=hit.score) for i, hit in pairs]

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        pairs = await arun_locked(
            self.retriever,
            rerank_records,
            self.retriever,
            self._query(query_bundle),
            [_key(n) for n in nodes],
            self.top_n,
        )
        return [NodeWithScore(node=nodes[i].node, score=hit.score) for i, hit in pairs]
