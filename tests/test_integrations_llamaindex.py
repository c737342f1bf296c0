"""LlamaIndex adapter: node ids and scores, `similarity_top_k`, `MetadataFilters` mapped onto the
library's filters, persistence restoring every constructor argument, and a non-blocking
`aretrieve` — for every registered retriever where it matters."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.schema import (
    Document,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    TextNode,
)
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)
from llama_index.retrievers.intrinsic import IntrinsicRetriever, to_library_filter
from support.frameworks import WAIT_S, ListRetriever
from support.retrievers import CORPUS, FACTORIES, QUERY, build_filled

from intrinsic_retrieval import (
    EmptyQueryError,
    InvalidFilterError,
    InvalidInputError,
    available,
    create_retriever,
)

ROOT = Path(__file__).resolve().parents[1]


def F(key, value, op="==") -> MetadataFilter:
    return MetadataFilter(key=key, value=value, operator=FilterOperator(op))


@pytest.fixture(scope="module")
def bm25():
    r = create_retriever("bm25", show_progress=False)
    r.add(CORPUS)
    return r


def _ids(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.ref_doc_id for n in nodes]


# ---------------------------------------------------------------------- every retriever
@pytest.fixture(params=available())
def filled(request):
    if request.param not in FACTORIES:
        pytest.skip(f"no small test factory for retriever {request.param!r}")
    return build_filled(request.param)


def test_retrieve_and_aretrieve_for_every_retriever(filled):
    r = IntrinsicRetriever(filled, similarity_top_k=3)
    nodes = r.retrieve(QUERY)
    hits = filled.search(QUERY, k=3)
    assert all(isinstance(n, NodeWithScore) and isinstance(n.node, TextNode) for n in nodes)
    assert [n.node.node_id for n in nodes] == [h.chunk_id for h in hits]
    assert [n.score for n in nodes] == [h.score for h in hits]
    assert asyncio.run(r.aretrieve(QUERY)) == nodes
    assert r.retrieve(QueryBundle(QUERY)) == nodes


def test_persist_then_load_in_new_process_gives_identical_results(filled, tmp_path):
    r = IntrinsicRetriever(filled, similarity_top_k=4)
    expected = [(n.node.node_id, n.score) for n in r.retrieve(QUERY)]
    r.persist(tmp_path / "p")
    code = (
        "import json; from llama_index.retrievers.intrinsic import IntrinsicRetriever; "
        f"r = IntrinsicRetriever.from_persist_dir({str(tmp_path / 'p')!r}, "
        "retriever_overrides={'show_progress': False}); "
        f"print(json.dumps([(n.node.node_id, n.score) for n in r.retrieve({QUERY!r})]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    got = [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]
    assert got == expected


# ---------------------------------------------------------------------- nodes
def test_nodes_carry_chunk_ids_parent_ids_scores_and_metadata(bm25):
    nodes = IntrinsicRetriever(bm25, similarity_top_k=3).retrieve(QUERY)
    top = nodes[0]
    assert top.node.node_id == "photo#0"
    assert top.node.ref_doc_id == "photo"
    assert top.node.relationships[NodeRelationship.SOURCE].node_id == "photo"
    assert top.score == bm25.search(QUERY, k=1)[0].score
    assert top.node.metadata["topic"] == "biology"
    assert [n.node.metadata["rank"] for n in nodes] == [1, 2, 3]
    # ids and ranks stay out of the LLM prompt; the document's own metadata goes in
    from llama_index.core.schema import MetadataMode

    prompt_text = top.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "topic: biology" in prompt_text and "chunk_id" not in prompt_text


def test_similarity_top_k(bm25):
    assert len(IntrinsicRetriever(bm25).retrieve(QUERY)) == 2  # LlamaIndex's default
    assert len(IntrinsicRetriever(bm25, similarity_top_k=5).retrieve(QUERY)) == 5
    with pytest.raises(InvalidInputError):
        IntrinsicRetriever(bm25, similarity_top_k=0)
    with pytest.raises(InvalidInputError):
        IntrinsicRetriever(object())
    with pytest.raises(EmptyQueryError):
        IntrinsicRetriever(bm25).retrieve(" ")


# ---------------------------------------------------------------------- filters
@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (MetadataFilters(filters=[F("topic", "biology")]), {"photo", "insulin", "antibiotic"}),
        (MetadataFilters(filters=[F("year", 2015, ">=")]), {"insulin", "antibiotic", "jupiter"}),
        (MetadataFilters(filters=[F("year", 2010, "<")]), {"photo"}),
        (MetadataFilters(filters=[F("year", 2010, "<=")]), {"photo", "volcano"}),
        (MetadataFilters(filters=[F("year", 2018, ">")]), {"jupiter"}),
        (MetadataFilters(filters=[F("topic", "biology", "!=")]), {"volcano", "jupiter"}),
        (
            MetadataFilters(filters=[F("topic", ["geology", "astronomy"], "in")]),
            {"volcano", "jupiter"},
        ),
        (
            MetadataFilters(filters=[F("topic", ["biology", "geology"], "nin")]),
            {"jupiter"},
        ),
        (
            MetadataFilters(
                filters=[F("topic", "biology"), F("year", 2010, ">")],
                condition=FilterCondition.AND,
            ),
            {"insulin", "antibiotic"},
        ),
        (
            MetadataFilters(
                filters=[F("topic", "geology"), F("topic", "astronomy")],
                condition=FilterCondition.OR,
            ),
            {"volcano", "jupiter"},
        ),
        (
            MetadataFilters(
                filters=[F("topic", "biology"), F("year", 2020)], condition=FilterCondition.NOT
            ),
            {"volcano"},
        ),
        (
            MetadataFilters(
                filters=[
                    F("topic", "biology"),
                    MetadataFilters(
                        filters=[F("year", 2001), F("year", 2018)], condition=FilterCondition.OR
                    ),
                ]
            ),
            {"photo", "antibiotic"},
        ),
        (F("document_id", ["photo", "jupiter"], "in"), {"photo", "jupiter"}),
        ({"topic": "geology"}, {"volcano"}),  # a library filter passes through
    ],
)
def test_metadata_filters_are_candidate_masks(bm25, filters, expected):
    nodes = IntrinsicRetriever(bm25, similarity_top_k=10, filters=filters).retrieve(QUERY)
    assert set(_ids(nodes)) == expected


def test_missing_keys_follow_llamaindex_semantics():
    r = IntrinsicRetriever.from_defaults(
        documents=[
            Document(doc_id="a", text="apple pie", metadata={"c": "red"}),
            Document(doc_id="b", text="apple juice", metadata={}),
            Document(doc_id="e", text="apple tart", metadata={"c": ""}),
        ],
        retriever_kwargs={"show_progress": False},
        similarity_top_k=10,
    )

    def ids(*fs, condition=FilterCondition.AND) -> set[str]:
        r2 = IntrinsicRetriever(
            r.retriever,
            similarity_top_k=10,
            filters=MetadataFilters(filters=list(fs), condition=condition),
        )
        return set(_ids(r2.retrieve("apple")))

    assert ids(F("c", "red", "!=")) == {"b", "e"}
    assert ids(F("c", ["red"], "nin")) == {"b", "e"}
    assert ids(MetadataFilter(key="c", value=None, operator=FilterOperator.IS_EMPTY)) == {"b", "e"}
    assert ids(F("c", "red")) == {"a"}


@pytest.mark.parametrize("op", ["any", "all", "contains", "text_match", "text_match_insensitive"])
def test_unsupported_operators_are_refused_early(bm25, op):
    value = ["x"] if op in ("any", "all") else "x"
    with pytest.raises(InvalidFilterError, match=op):
        IntrinsicRetriever(bm25, filters=MetadataFilters(filters=[F("topic", value, op)]))


def test_filter_translation():
    assert to_library_filter(None) is None
    assert to_library_filter(MetadataFilters(filters=[])) is None
    assert to_library_filter(MetadataFilters(filters=[F("a", 1), F("b", 2, ">")])) == {
        "$and": [{"a": {"$eq": 1}}, {"b": {"$gt": 2}}]
    }
    with pytest.raises(InvalidFilterError):
        to_library_filter("topic == biology")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- construction & upkeep
def test_from_defaults_with_nodes_and_documents_then_add_and_delete():
    r = IntrinsicRetriever.from_defaults(
        nodes=[TextNode(id_="n1", text="Jupiter is a gas giant.", metadata={"k": 1})],
        documents=[Document(doc_id="d1", text="Insulin regulates blood glucose.")],
        retriever_kwargs={"show_progress": False},
        similarity_top_k=1,
    )
    assert r.retrieve("gas giant")[0].node.node_id == "n1#0"
    assert r.add([Document(doc_id="d2", text="Volcanoes eject magma.")]) == ["d2"]
    assert r.retrieve("magma")[0].node.ref_doc_id == "d2"
    assert r.delete(["d2"]) == 1
    assert r.retrieve("magma")[0].node.ref_doc_id != "d2"


def test_any_protocol_implementation_works(tmp_path):
    r = IntrinsicRetriever.from_defaults(
        documents=[Document(doc_id="a", text="red apple"), Document(doc_id="p", text="green pear")],
        retriever=ListRetriever(),
        similarity_top_k=1,
    )
    assert r.retrieve("red")[0].node.node_id == "a"
    r.persist(tmp_path / "p")
    again = IntrinsicRetriever.from_persist_dir(tmp_path / "p")
    assert isinstance(again.retriever, ListRetriever)
    assert again.retrieve("green") == r.retrieve("green")


# ---------------------------------------------------------------------- persistence
@pytest.mark.parametrize(
    "filters",
    [
        None,
        MetadataFilters(
            filters=[F("topic", "biology"), MetadataFilters(filters=[F("year", 2015, ">=")])],
            condition=FilterCondition.AND,
        ),
        {"peer_reviewed": True},
    ],
)
def test_persist_restores_every_constructor_argument(bm25, tmp_path, filters):
    r = IntrinsicRetriever(bm25, similarity_top_k=3, filters=filters, verbose=True)
    r.persist(tmp_path / "p")
    again = IntrinsicRetriever.from_persist_dir(
        tmp_path / "p", retriever_overrides={"show_progress": False}
    )
    assert again.similarity_top_k == 3
    assert again.filters == filters
    assert again._verbose is True
    assert again.retriever.init_args() == bm25.init_args()
    assert again.retrieve(QUERY) == r.retrieve(QUERY)
    assert (
        IntrinsicRetriever.from_persist_dir(tmp_path / "p", similarity_top_k=1).similarity_top_k
        == 1
    )


# ---------------------------------------------------------------------- async & packaging
def test_ten_concurrent_aretrieve_overlap():
    """A barrier that all ten calls must reach together: passes only if they overlap."""
    barrier = threading.Barrier(10, timeout=WAIT_S)
    retrievers = []
    for _ in range(10):
        model = ListRetriever(hook=barrier.wait)
        model.add(["red apple", "green pear"])
        retrievers.append(IntrinsicRetriever(model, similarity_top_k=1))

    async def main() -> list[list[NodeWithScore]]:
        return await asyncio.gather(*(r.aretrieve("red apple") for r in retrievers))

    assert all(res[0].node.text == "red apple" for res in asyncio.run(main()))
    assert not barrier.broken


def test_namespace_package_layout():
    """`llama_index` and `llama_index.retrievers` stay implicit namespace packages."""
    spec = importlib.util.find_spec("llama_index")
    assert spec is not None and spec.origin in (None, "namespace")
    pkg = ROOT / "integrations/llama-index-retrievers-intrinsic/llama_index"
    assert not (pkg / "__init__.py").exists()
    assert not (pkg / "retrievers/__init__.py").exists()
    import llama_index.core  # still importable next to this integration  # noqa: F401
