"""Every registered retriever honours the `Retriever` protocol the same way.

Each runs in its full mode on a small instance (`support.retrievers`): bm25, dense, INTRA on a
tiny T5 with a trained head, in-context retrieval with SmolLM2 and DSI on a tiny T5; INTRA's
encoder stage alone runs on its BERT2BERT (all-MiniLM-L6-v2) fallback as well. One filled
instance per retriever serves the tests that do not change it (`shared`); tests that do get a
copy of it (`filled`) or build their own (`make`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.retrievers import CORPUS, FACTORIES, QUERY, VARIANTS, build_filled, index

from intrinsic_retrieval import (
    Document,
    DuplicateIdError,
    EmptyCorpusError,
    EmptyQueryError,
    Hit,
    InvalidFilterError,
    InvalidInputError,
    ModelMismatchError,
    Retriever,
    StoreCorruptedError,
    create_retriever,
    load_retriever,
)

ROOT = Path(__file__).resolve().parents[1]

#: every registered retriever, and further configurations of some
CONFORMANCE = {**FACTORIES, **VARIANTS}
#: factories whose model takes long to build: their conformance runs are marked slow (the
#: LangChain standard suite and the new-process reload tests of the integrations still run the
#: registered ones by default)
SLOW_FACTORIES = {"incontext", "intra-encoder"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FACTORIES else n
        for n in sorted(CONFORMANCE)
    ],
)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shared(name, tmp_path_factory):
    """The filled (and, where needed, trained) instance of `name`, built once per module, for
    the tests that leave it as it is."""
    r = build_filled(name, str(tmp_path_factory.mktemp(name) / "store"))
    yield r
    r.close()


@pytest.fixture
def filled(shared, tmp_path):
    """A private copy of `shared`, for tests that change the index."""
    shared.save(tmp_path / "store")
    r = load_retriever(tmp_path / "store", show_progress=False)
    yield r
    r.close()


@pytest.fixture
def make(name) -> Callable:
    """The factory of `name`: a fresh, empty instance."""
    return CONFORMANCE[name]


def test_is_a_retriever(shared):
    assert isinstance(shared, Retriever)
    assert len(shared) == len(CORPUS)


def test_search_ranks_relevant_document_first(shared):
    hits = shared.search(QUERY, k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].document_id == "photo"
    assert hits[0].chunk_id == "photo#0"
    assert "chloroplasts" in hits[0].text
    assert hits[0].metadata["topic"] == "biology"
    assert all(isinstance(h, Hit) for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_search_batch_matches_single(shared):
    queries = [QUERY, "largest planet gas giant", "blood glucose hormone"]
    batch = shared.search_batch(queries, k=2)
    assert [b[0].document_id for b in batch] == ["photo", "jupiter", "insulin"]
    for q, b in zip(queries, batch, strict=True):
        single = shared.search(q, k=2)
        assert [h.chunk_id for h in single] == [h.chunk_id for h in b]
        assert [h.score for h in single] == pytest.approx([h.score for h in b], rel=1e-5)


def test_k_larger_than_corpus_returns_everything(shared):
    hits = shared.search(QUERY, k=50)
    assert len(hits) == len(CORPUS)
    assert len({h.chunk_id for h in hits}) == len(CORPUS)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_query_is_refused(shared, bad):
    with pytest.raises(EmptyQueryError):
        shared.search(bad)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_refused(shared, k):
    with pytest.raises(InvalidInputError):
        shared.search(QUERY, k=k)


def test_empty_corpus_is_refused_and_search_on_empty_returns_nothing(make, tmp_path):
    r = make(str(tmp_path / "s"))
    with pytest.raises(EmptyCorpusError):
        r.add([])
    assert r.search(QUERY) == []
    assert len(r) == 0


def test_duplicate_ids(filled):
    with pytest.raises(DuplicateIdError):
        filled.add([Document(id="photo", text="something else")])
    with pytest.raises(DuplicateIdError):
        filled.add([Document(id="x", text="a"), Document(id="x", text="b")])
    assert len(filled) == len(CORPUS)  # nothing was written
    added = filled.add(
        [
            Document(id="photo", text="dup"),
            Document(id="new", text="A new document on ocean tides."),
        ],
        on_duplicate="skip",
    )
    assert added == ["new"]
    assert len(filled) == len(CORPUS) + 1


def test_filters_are_candidate_masks(shared):
    hits = shared.search(QUERY, k=10, filter={"topic": "geology"})
    assert [h.document_id for h in hits] == ["volcano"]
    hits = shared.search(QUERY, k=10, filter={"year": {"$gte": 2015}, "peer_reviewed": True})
    assert {h.document_id for h in hits} == {"insulin", "antibiotic"}
    hits = shared.search(QUERY, k=10, filter={"document_id": {"$in": ["jupiter", "photo"]}})
    assert {h.document_id for h in hits} == {"jupiter", "photo"}
    assert shared.search(QUERY, k=10, filter={"topic": "chemistry"}) == []
    with pytest.raises(InvalidFilterError):
        shared.search(QUERY, filter={"year": {"$regex": "x"}})


def test_delete_then_compact(filled):
    assert filled.delete(["photo"]) == 1
    assert all(h.document_id != "photo" for h in filled.search(QUERY, k=10))
    assert len(filled) == len(CORPUS) - 1
    assert filled.delete(["insulin#0"]) == 1
    assert filled.delete(["does-not-exist"]) == 0
    before = [(h.chunk_id, round(h.score, 4)) for h in filled.search("planet", k=10)]
    filled.compact()
    after = [(h.chunk_id, round(h.score, 4)) for h in filled.search("planet", k=10)]
    assert [c for c, _ in before] == [c for c, _ in after]
    for r in getattr(filled, "stages", {"": filled}).values():  # a pipeline: every stage
        assert r.store.num_rows == len(CORPUS) - 2


def test_save_and_reload_in_new_process_gives_identical_results(shared, tmp_path):
    dest = tmp_path / "saved"
    shared.save(dest)
    expected = [(h.chunk_id, h.score) for h in shared.search(QUERY, k=5)]
    code = (  # the same intra-op threads as here: the same float reductions, the same scores
        f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
        "import json, sys; from intrinsic_retrieval import load_retriever; "
        f"r = load_retriever({str(dest)!r}, show_progress=False); "
        f"print(json.dumps([(h.chunk_id, h.score) for h in r.search({QUERY!r}, k=5)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    got = [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-6, abs=1e-6)


def test_reload_restores_type_and_config(shared, tmp_path):
    shared.save(tmp_path / "saved")
    again = load_retriever(tmp_path / "saved", show_progress=False)
    assert type(again) is type(shared)
    assert again.init_args() == shared.init_args()
    assert len(again) == len(shared)


def test_truncated_shard_is_reported_with_its_file(shared, tmp_path):
    shared.save(tmp_path / "saved")
    shard = next((tmp_path / "saved").rglob("shards/*.safetensors"))  # a pipeline: a stage's
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreCorruptedError) as err:
        load_retriever(tmp_path / "saved", show_progress=False)
    assert shard.name in str(err.value)


def test_store_from_other_model_is_refused(tmp_path):
    r = create_retriever("bm25", path=str(tmp_path / "s"), show_progress=False)
    r.add(CORPUS)
    with pytest.raises(ModelMismatchError):
        create_retriever("bm25", path=str(tmp_path / "s"), stemmer=None, show_progress=False)
    # the store is still readable by the right model
    assert (
        load_retriever(tmp_path / "s", show_progress=False).search(QUERY)[0].document_id == "photo"
    )


def test_long_documents_are_chunked_with_parent_ids(name, make, tmp_path):
    r = make(str(tmp_path / "s"))
    long_text = " ".join(f"sentence {i} about glaciers and ice sheets." for i in range(400))
    r.add([Document(id="long", text=long_text, metadata={"k": 1})])
    index(name, r)
    assert len(r) > 1
    hits = r.search("glaciers", k=100)
    assert {h.document_id for h in hits} == {"long"}
    assert all(h.metadata == {"k": 1} for h in hits)
    assert all(h.chunk_id.startswith("long#") for h in hits)
