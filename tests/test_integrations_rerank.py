"""The rerankers of both frameworks: `IntrinsicReranker` inside LangChain's own
`ContextualCompressionRetriever`, `IntrinsicRerank` inside a LlamaIndex query engine. Each
reranks a first stage's results with a second library retriever and returns what that retriever's
own `rerank` ranks, in the framework's records."""

from __future__ import annotations

import asyncio

import pytest
from support.frameworks import ListRetriever
from support.retrievers import CORPUS, QUERY

from intrinsic_retrieval import (
    InvalidInputError,
    StageMismatchError,
    create_retriever,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stages(tmp_path):
    """BM25 as first stage; a second BM25 with other parameters as the reranker (what is
    reranked is the plumbing here; test_pipelines.py shows every second stage equals its own
    masked search)."""
    first = create_retriever("bm25", path=str(tmp_path / "first"), show_progress=False)
    second = create_retriever("bm25", path=str(tmp_path / "second"), k1=0.3, show_progress=False)
    first.add(CORPUS)
    second.add(CORPUS)
    yield first, second
    first.close()
    second.close()


# ---------------------------------------------------------------- LangChain
def test_langchain_compression_retriever(stages):
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_intrinsic_retrieval import IntrinsicReranker, IntrinsicRetriever

    first, second = stages
    pipeline = ContextualCompressionRetriever(
        base_compressor=IntrinsicReranker(retriever=second, top_n=2),
        base_retriever=IntrinsicRetriever(retriever=first, k=4),
    )
    docs = pipeline.invoke(QUERY)
    want = second.rerank(QUERY, first.search(QUERY, k=4), k=2)
    assert [d.metadata["document_id"] for d in docs] == [h.document_id for h in want]
    assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([h.score for h in want])
    assert docs[0].metadata["topic"] == "biology"  # the first stage's metadata is kept
    assert [d.id for d in asyncio.run(pipeline.ainvoke(QUERY))] == [d.id for d in docs]


def test_langchain_reranker_finds_documents_by_id_and_refuses_unknown_ones(stages):
    from langchain_core.documents import Document
    from langchain_intrinsic_retrieval import IntrinsicReranker

    _, second = stages
    reranker = IntrinsicReranker(retriever=second, top_n=3)
    docs = [Document(id=i, page_content="") for i in ("jupiter", "photo", "volcano")]
    assert reranker.compress_documents(docs, QUERY)[0].id == "photo"
    with pytest.raises(StageMismatchError, match="mars"):
        reranker.compress_documents([*docs, Document(id="mars", page_content="")], QUERY)
    with pytest.raises(InvalidInputError, match="no id"):
        reranker.compress_documents([Document(page_content="anonymous")], QUERY)
    with pytest.raises(InvalidInputError):
        reranker.compress_documents(docs, "  ")
    assert reranker.compress_documents([], QUERY) == []
    with pytest.raises(ValueError, match="rerank"):  # pydantic's ValidationError
        IntrinsicReranker(retriever=ListRetriever())


def test_langchain_reranker_from_a_saved_index(stages, tmp_path):
    from langchain_core.documents import Document
    from langchain_intrinsic_retrieval import IntrinsicReranker

    _, second = stages
    second.save(tmp_path / "saved")
    reranker = IntrinsicReranker.from_path(tmp_path / "saved", top_n=1)
    docs = [Document(id=i, page_content="") for i in ("jupiter", "insulin")]
    assert reranker.compress_documents(docs, "blood glucose")[0].id == "insulin"
    reranker.retriever.close()


# ---------------------------------------------------------------- LlamaIndex
def test_llamaindex_query_engine_with_postprocessor(stages):
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.retrievers.intrinsic import IntrinsicRerank, IntrinsicRetriever

    first, second = stages
    engine = RetrieverQueryEngine.from_args(
        IntrinsicRetriever(retriever=first, similarity_top_k=4),
        llm=MockLLM(max_tokens=8),
        node_postprocessors=[IntrinsicRerank(retriever=second, top_n=2)],
    )
    response = engine.query(QUERY)
    want = second.rerank(QUERY, first.search(QUERY, k=4), k=2)
    got = response.source_nodes
    assert [n.node.metadata["document_id"] for n in got] == [h.document_id for h in want]
    assert [n.score for n in got] == pytest.approx([h.score for h in want])
    again = asyncio.run(engine.aquery(QUERY)).source_nodes
    assert [n.node.node_id for n in again] == [n.node.node_id for n in got]


def test_llamaindex_postprocessor_by_node_ids_and_errors(stages):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.retrievers.intrinsic import IntrinsicRerank

    _, second = stages
    rerank = IntrinsicRerank(retriever=second, top_n=2)
    nodes = [NodeWithScore(node=TextNode(id_=i, text=""), score=0.0) for i in ("jupiter", "photo")]
    out = rerank.postprocess_nodes(nodes, query_str=QUERY)
    assert out[0].node.node_id == "photo"
    with pytest.raises(StageMismatchError):
        rerank.postprocess_nodes(
            [NodeWithScore(node=TextNode(id_="mars", text=""))], QueryBundle("x")
        )
    with pytest.raises(InvalidInputError, match="query"):
        rerank.postprocess_nodes(nodes)
    with pytest.raises(ValueError, match="rerank"):  # pydantic's ValidationError
        IntrinsicRerank(retriever=ListRetriever())


# ---------------------------------------------------------------- pipelines as retrievers
def test_a_pipeline_is_a_retriever_in_both_frameworks(tmp_path):
    from langchain_intrinsic_retrieval import IntrinsicRetriever as LCRetriever
    from llama_index.retrievers.intrinsic import IntrinsicRetriever as LIRetriever

    from intrinsic_retrieval import Rerank

    pipeline = Rerank("bm25", {"name": "bm25", "k1": 0.3}, candidates=4)
    pipeline.add(CORPUS)
    lc = LCRetriever(retriever=pipeline, k=2)
    docs = lc.invoke(QUERY)
    assert [d.id for d in docs] == [h.chunk_id for h in pipeline.search(QUERY, k=2)]
    lc.save(tmp_path / "lc")
    again = LCRetriever.load(tmp_path / "lc")
    assert isinstance(again.retriever, Rerank) and again.k == 2
    assert [d.id for d in again.invoke(QUERY)] == [d.id for d in docs]
    li = LIRetriever(retriever=again.retriever, similarity_top_k=2)
    assert [n.node.node_id for n in li.retrieve(QUERY)] == [d.id for d in docs]
    again.retriever.close()
    pipeline.close()
