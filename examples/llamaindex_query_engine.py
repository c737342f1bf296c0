"""A LlamaIndex query engine over intrinsic-retrieval, fully offline (MockLLM).

    retriever = IntrinsicRetriever.from_defaults(documents=DOCS, retriever="bm25")  # "dense", ...

Run:  python examples/llamaindex_query_engine.py                 # bm25, dense, intra if available
      python examples/llamaindex_query_engine.py --retriever dense
"""

from __future__ import annotations

import argparse
import asyncio

from llama_index.core import Settings
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import Document
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters
from llama_index.retrievers.intrinsic import IntrinsicRetriever

from intrinsic_retrieval import ModelLoadError, NotTrainedError, available

DOCS = [
    Document(
        doc_id="photosynthesis",
        text="Photosynthesis converts light energy into chemical energy in chloroplasts.",
        metadata={"topic": "biology", "year": 2001},
    ),
    Document(
        doc_id="insulin",
        text="Insulin is a hormone that lowers blood glucose by helping cells absorb it.",
        metadata={"topic": "biology", "year": 2015},
    ),
    Document(
        doc_id="volcano",
        text="Volcanic eruptions release ash and sulfur dioxide that can cool the climate.",
        metadata={"topic": "geology", "year": 2010},
    ),
    Document(
        doc_id="jupiter",
        text="Jupiter is the largest planet in the solar system, a gas giant with many moons.",
        metadata={"topic": "astronomy", "year": 2020},
    ),
    Document(
        doc_id="antibiotics",
        text="Overuse of antibiotics lets resistant bacteria survive and spread.",
        metadata={"topic": "biology", "year": 2018},
    ),
]

DEFAULT_RETRIEVERS = ("bm25", "dense", "intra")
OPTIONAL = {"intra"}


def run(name: str) -> None:
    Settings.llm = MockLLM(max_tokens=16)  # offline: never resolve a hosted default LLM
    retriever = IntrinsicRetriever.from_defaults(
        documents=DOCS,
        retriever=name,
        retriever_kwargs={"show_progress": False},
        similarity_top_k=2,
    )
    engine = RetrieverQueryEngine.from_args(retriever, llm=Settings.llm)
    print(f"== {name}: {type(retriever.retriever).__name__}")
    if getattr(retriever.retriever, "trained", True) is False:
        print(
            "   note: untrained retrieval head: zero-shot INTRA ranks at chance on this backbone,"
            " so the sources below are not expected to be right (docs/intra.md)"
        )
    question = "Which hormone controls blood sugar?"
    response = engine.query(question)
    print(f"Q: {question}\nA: {str(response).strip()[:80]!r}")
    for n in response.source_nodes:
        print(
            f"   #{n.node.metadata['rank']} {n.node.node_id:<18} doc={n.node.ref_doc_id} "
            f"score={n.score:.4f}"
        )

    # metadata filters run before scoring: only biology papers after 2010 are candidates
    filtered = IntrinsicRetriever(
        retriever.retriever,
        similarity_top_k=3,
        filters=MetadataFilters(
            filters=[
                MetadataFilter(key="topic", value="biology"),
                MetadataFilter(key="year", value=2010, operator=FilterOperator.GT),
            ]
        ),
    )
    response = asyncio.run(
        RetrieverQueryEngine.from_args(filtered, llm=Settings.llm).aquery("energy and cells")
    )
    print("   filtered (async):", [n.node.ref_doc_id for n in response.source_nodes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retriever", action="append", help="registry name (repeatable)")
    args = parser.parse_args()
    for name in args.retriever or DEFAULT_RETRIEVERS:
        if name in OPTIONAL and not args.retriever:
            if name not in available():
                print(f"== {name}: skipped (not available in this version of intrinsic-retrieval)")
                continue
            try:
                run(name)
            except (ModelLoadError, NotTrainedError) as exc:
                print(f"== {name}: skipped ({type(exc).__name__}: {exc})")
            continue
        run(name)


if __name__ == "__main__":
    main()
