"""LangChain adapter: standard retriever tests for every registered retriever, results that keep
scores and metadata, callbacks, persistence across processes, and a non-blocking `ainvoke`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.documents import Document
from langchain_intrinsic_retrieval import IntrinsicRetriever
from langchain_tests.integration_tests import RetrieversIntegrationTests
from pydantic import ValidationError
from support.frameworks import WAIT_S, ConcurrencyProbe, ListRetriever
from support.retrievers import CORPUS, FACTORIES, QUERY, build_filled

from intrinsic_retrieval import (
    EmptyQueryError,
    InvalidInputError,
    available,
    create_retriever,
    load_retriever,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- standard test suite
def _standard_tests(name: str) -> type:
    """A `RetrieversIntegrationTests` subclass for registry retriever `name`, built on the small
    instance that `support.retrievers.FACTORIES` defines for it."""
    cache: dict[str, Any] = {}

    def inner() -> Any:
        if name not in FACTORIES:
            pytest.skip(f"no small test factory for retriever {name!r} in FACTORIES")
        if "r" not in cache:
            cache["r"] = build_filled(name)
        return cache["r"]

    class Standard(RetrieversIntegrationTests):
        @property
        def retriever_constructor(self) -> type[IntrinsicRetriever]:
            return IntrinsicRetriever

        @property
        def retriever_constructor_params(self) -> dict:
            return {"retriever": inner(), "k": 2}

        @property
        def retriever_query_example(self) -> str:
            return QUERY

    Standard.__name__ = Standard.__qualname__ = f"TestLangChainStandard_{name}"
    # the suite has an async test; without asyncio_mode=auto it needs the mark, which pytest-asyncio
    # then reports on the sync tests of the class
    Standard.pytestmark = [
        pytest.mark.asyncio,
        pytest.mark.filterwarnings("ignore:.*is marked with '@pytest.mark.asyncio'"),
    ]
    return Standard


for _name in available():
    globals()[f"TestLangChainStandard_{_name}"] = _standard_tests(_name)


# ---------------------------------------------------------------------- results
@pytest.fixture(scope="module")
def bm25():
    r = create_retriever("bm25", show_progress=False)
    r.add(CORPUS)
    return r


def test_documents_carry_ids_scores_ranks_and_metadata(bm25):
    docs = IntrinsicRetriever(retriever=bm25, k=3).invoke(QUERY)
    hits = bm25.search(QUERY, k=3)
    assert [d.id for d in docs] == [h.chunk_id for h in hits]
    top = docs[0]
    assert top.id == "photo#0"
    assert top.page_content == hits[0].text
    assert top.metadata["document_id"] == "photo"
    assert top.metadata["chunk_id"] == "photo#0"
    assert top.metadata["score"] == hits[0].score
    assert [d.metadata["rank"] for d in docs] == [1, 2, 3]
    assert top.metadata["topic"] == "biology"
    assert top.metadata["year"] == 2001
    assert top.metadata["peer_reviewed"] is True


def test_k_and_filter_fields_and_per_call_overrides(bm25):
    r = IntrinsicRetriever(retriever=bm25, k=5, filter={"topic": "biology"})
    assert {d.metadata["document_id"] for d in r.invoke(QUERY)} == {
        "photo",
        "insulin",
        "antibiotic",
    }
    assert len(r.invoke(QUERY, k=1)) == 1
    docs = r.invoke(QUERY, filter={"topic": "geology"})
    assert [d.metadata["document_id"] for d in docs] == ["volcano"]
    with pytest.raises(InvalidInputError, match="unexpected search argument"):
        r.invoke(QUERY, top_k=3)
    with pytest.raises(InvalidInputError):
        r.invoke(QUERY, k=0)


def test_k_defaults_to_langchain_convention_and_is_validated(bm25):
    assert len(IntrinsicRetriever(retriever=bm25).invoke(QUERY)) == 4
    with pytest.raises(ValidationError):
        IntrinsicRetriever(retriever=bm25, k=0)
    with pytest.raises(ValidationError, match="expected an intrinsic_retrieval Retriever"):
        IntrinsicRetriever(retriever=object())


def test_batch_matches_invoke(bm25):
    r = IntrinsicRetriever(retriever=bm25, k=2)
    queries = [QUERY, "largest planet gas giant", "blood glucose hormone"]
    assert r.batch(queries) == [r.invoke(q) for q in queries]


# ---------------------------------------------------------------------- callbacks
class _Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_retriever_start(self, serialized: Any, query: str, **kw: Any) -> None:
        self.events.append(("start", query))

    def on_retriever_end(self, documents: Any, **kw: Any) -> None:
        self.events.append(("end", [d.id for d in documents]))

    def on_retriever_error(self, error: BaseException, **kw: Any) -> None:
        self.events.append(("error", type(error).__name__))


class _AsyncRecorder(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    async def on_retriever_start(self, serialized: Any, query: str, **kw: Any) -> None:
        self.events.append(("start", query))

    async def on_retriever_end(self, documents: Any, **kw: Any) -> None:
        self.events.append(("end", [d.id for d in documents]))

    async def on_retriever_error(self, error: BaseException, **kw: Any) -> None:
        self.events.append(("error", type(error).__name__))


def test_callbacks_fire_on_success_and_error(bm25):
    r = IntrinsicRetriever(retriever=bm25, k=2)
    rec = _Recorder()
    docs = r.invoke(QUERY, config={"callbacks": [rec]})
    assert rec.events == [("start", QUERY), ("end", [d.id for d in docs])]
    rec.events.clear()
    with pytest.raises(EmptyQueryError):
        r.invoke("   ", config={"callbacks": [rec]})
    assert rec.events == [("start", "   "), ("error", "EmptyQueryError")]


def test_async_callbacks_fire_on_success_and_error(bm25):
    r = IntrinsicRetriever(retriever=bm25, k=2)
    rec = _AsyncRecorder()

    async def main() -> list[Document]:
        docs = await r.ainvoke(QUERY, config={"callbacks": [rec]})
        with pytest.raises(EmptyQueryError):
            await r.ainvoke("", config={"callbacks": [rec]})
        return docs

    docs = asyncio.run(main())
    assert rec.events == [
        ("start", QUERY),
        ("end", [d.id for d in docs]),
        ("start", ""),
        ("error", "EmptyQueryError"),
    ]


# ---------------------------------------------------------------------- construction & upkeep
def test_from_texts_add_and_delete():
    r = IntrinsicRetriever.from_texts(
        ["Insulin regulates blood glucose.", "Jupiter is a gas giant planet."],
        metadatas=[{"topic": "biology"}, {"topic": "astronomy"}],
        ids=["insulin", "jupiter"],
        retriever_kwargs={"show_progress": False},
        k=1,
    )
    assert len(r.retriever) == 2
    top = r.invoke("gas giant")[0]
    assert top.metadata.pop("score") > 0
    assert top.metadata == {
        "topic": "astronomy",
        "document_id": "jupiter",
        "chunk_id": "jupiter#0",
        "rank": 1,
    }
    added = r.add_documents(
        [Document(page_content="Volcanoes eject magma and ash.", metadata={"topic": "geology"})],
        ids=["volcano"],
    )
    assert added == ["volcano"]
    assert r.invoke("magma ash")[0].id == "volcano#0"
    # a LangChain Document's own id becomes the document id
    assert r.add_documents([Document(id="tides", page_content="Ocean tides follow the moon.")])
    assert r.invoke("ocean tides moon")[0].metadata["document_id"] == "tides"
    assert r.delete(["volcano"]) == 1
    assert r.delete("tides#0") == 1
    assert all(d.metadata["document_id"] != "volcano" for d in r.invoke("magma ash", k=5))
    with pytest.raises(InvalidInputError):
        r.add_documents([Document(page_content="x")], ids=["a", "b"])


def test_async_add_and_delete():
    r = IntrinsicRetriever.from_texts(
        ["Insulin regulates blood glucose."], retriever_kwargs={"show_progress": False}
    )

    async def main() -> tuple[list[str], int]:
        added = await r.aadd_documents([Document(id="v", page_content="Volcanic ash clouds.")])
        return added, await r.adelete(["v"])

    assert asyncio.run(main()) == (["v"], 1)


def test_registry_name_or_instance_only():
    with pytest.raises(InvalidInputError, match="retriever_kwargs only apply"):
        IntrinsicRetriever.from_texts(["a"], retriever=ListRetriever(), retriever_kwargs={"x": 1})
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        IntrinsicRetriever.from_texts(["a"], retriever="no-such-retriever")


def test_any_protocol_implementation_works():
    r = IntrinsicRetriever.from_texts(
        ["red apple", "green pear", "red cherry"], ids=["a", "p", "c"], retriever=ListRetriever()
    )
    docs = r.invoke("red apple", k=2)
    assert [d.id for d in docs] == ["a", "c"]
    assert docs[0].metadata["score"] == 2.0


# ---------------------------------------------------------------------- persistence
def test_save_and_load_restore_settings(bm25, tmp_path):
    r = IntrinsicRetriever(
        retriever=bm25, k=3, filter={"peer_reviewed": True}, tags=["t1"], metadata={"m": 1}
    )
    r.save(tmp_path / "saved")
    again = IntrinsicRetriever.load(
        tmp_path / "saved", retriever_overrides={"show_progress": False}
    )
    assert (again.k, again.filter, again.tags, again.metadata) == (
        3,
        {"peer_reviewed": True},
        ["t1"],
        {"m": 1},
    )
    assert again.retriever.init_args() == bm25.init_args()
    assert again.invoke(QUERY) == r.invoke(QUERY)
    assert IntrinsicRetriever.load(tmp_path / "saved", k=1).k == 1
    # the directory is still a plain index
    assert len(load_retriever(tmp_path / "saved", show_progress=False)) == len(bm25)


def test_save_and_load_a_protocol_implementation(tmp_path):
    r = IntrinsicRetriever.from_texts(["red apple", "green pear"], retriever=ListRetriever(), k=1)
    r.save(tmp_path / "s")
    again = IntrinsicRetriever.load(tmp_path / "s")
    assert isinstance(again.retriever, ListRetriever)
    assert again.invoke("green") == r.invoke("green")


@pytest.mark.parametrize("name", available())
def test_save_then_load_in_new_process_gives_identical_results(name, tmp_path):
    if name not in FACTORIES:
        pytest.skip(f"no small test factory for retriever {name!r}")
    inner = build_filled(name)
    r = IntrinsicRetriever(retriever=inner, k=5)
    expected = [(d.id, d.metadata["score"]) for d in r.invoke(QUERY)]
    r.save(tmp_path / "saved")
    code = (
        "import json; from langchain_intrinsic_retrieval import IntrinsicRetriever; "
        f"r = IntrinsicRetriever.load({str(tmp_path / 'saved')!r}, "
        "retriever_overrides={'show_progress': False}); "
        f"print(json.dumps([(d.id, d.metadata['score']) for d in r.invoke({QUERY!r})]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    got = [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]
    assert got == expected  # identical ranked ids and scores (JSON round-trips floats exactly)


# ---------------------------------------------------------------------- async
def test_ten_concurrent_ainvoke_on_ten_models_overlap():
    """Every call must be inside its model at the same time for any to finish (a barrier), so
    this passes only if the ten `ainvoke` calls overlap; a blocking call would break it."""
    barrier = threading.Barrier(10, timeout=WAIT_S)
    models = [ListRetriever(hook=barrier.wait) for _ in range(10)]
    for m in models:
        m.add(["red apple", "green pear"])
    adapters = [IntrinsicRetriever(retriever=m, k=1) for m in models]

    async def main() -> list[list[Document]]:
        return await asyncio.gather(*(a.ainvoke("red apple") for a in adapters))

    results = asyncio.run(main())
    assert all(r[0].page_content == "red apple" for r in results)
    assert not barrier.broken


def test_ten_concurrent_ainvoke_on_one_thread_safe_model_overlap():
    barrier = threading.Barrier(10, timeout=WAIT_S)
    model = ListRetriever(hook=barrier.wait, lock=None)  # lock=None: declares itself thread-safe
    model.add(["red apple", "green pear"])
    r = IntrinsicRetriever(retriever=model, k=1)

    async def main() -> list[list[Document]]:
        return await asyncio.gather(*(r.ainvoke("red apple") for _ in range(10)))

    assert len(asyncio.run(main())) == 10


def test_ainvoke_keeps_the_event_loop_free_and_serialises_one_model():
    """Ten calls on one model: the event loop keeps running coroutines while the model works
    (it is the loop that releases the model), and the model's lock lets one call in at a time."""
    release = threading.Event()
    entered = threading.Event()
    probe = ConcurrencyProbe()

    def hook() -> None:
        probe.enter()
        entered.set()
        try:
            if not release.wait(WAIT_S):
                raise TimeoutError("event loop blocked: nobody released the model")
        finally:
            probe.leave()

    model = ListRetriever(hook=hook)
    model.lock = threading.RLock()
    model.add(["red apple", "green pear"])
    r = IntrinsicRetriever(retriever=model, k=1)
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while not entered.is_set():  # a search is now blocked inside the model...
            await asyncio.sleep(0.001)
        for _ in range(10):  # ...and the loop still runs other coroutines
            ticks += 1
            await asyncio.sleep(0)
        release.set()

    async def main() -> list[list[Document]]:
        calls = [asyncio.create_task(r.ainvoke("red apple")) for _ in range(10)]
        await heartbeat()
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    assert ticks == 10
    assert len(results) == 10 and all(x[0].page_content == "red apple" for x in results)
    assert probe.max_inside == 1


def test_concurrent_ainvoke_on_a_store_retriever_matches_invoke(bm25):
    r = IntrinsicRetriever(retriever=bm25, k=3)
    queries = [QUERY, "largest planet gas giant", "blood glucose hormone", "magma ash"] * 3

    async def main() -> list[list[Document]]:
        return await asyncio.gather(*(r.ainvoke(q) for q in queries))

    assert asyncio.run(main()) == [r.invoke(q) for q in queries]
