"""GenerativeDocidRetriever on the store: add/fit/search/delete/save/load, filters as trie
restrictions, incremental add, explain(), and the bad-input errors (tiny random models)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.generative import DOCS, MEMORISE, tiny_retriever

from intrinsic_retrieval.errors import (
    CheckpointMismatchError,
    DocidVocabularyError,
    IdSpaceExhaustedError,
    InvalidInputError,
    NotTrainedError,
)
from intrinsic_retrieval.retrievers.generative import GenerativeDocidRetriever

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = ["atomic", "naive", "semantic"]
TEXTS = [d["text"] for d in DOCS]
IDS = [d["id"] for d in DOCS]


def _trained(scheme: str, kind: str = "t5", path=None, **fit_kw):
    r = tiny_retriever(kind, docids=scheme, semantic_k=2, semantic_c=2, num_beams=6, path=path)
    r.add(DOCS)
    r.fit(**{**MEMORISE, **fit_kw})
    return r


_CACHE: dict[str, GenerativeDocidRetriever] = {}


def _shared(scheme: str) -> GenerativeDocidRetriever:
    """One trained retriever per scheme for read-only tests."""
    if scheme not in _CACHE:
        _CACHE[scheme] = _trained(scheme)
    return _CACHE[scheme]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_memorises_a_handful_of_documents(scheme):
    r = _shared(scheme)
    hits = r.search_batch(TEXTS, k=3)
    assert [h[0].document_id for h in hits] == IDS
    for h in hits:
        assert [x.rank for x in h] == list(range(1, len(h) + 1))
        assert [x.score for x in h] == sorted((x.score for x in h), reverse=True)
    top = hits[1][0]
    assert top.text == DOCS[1]["text"] and top.metadata == DOCS[1]["metadata"]
    assert top.chunk_id == "d1#0"


@pytest.mark.parametrize("kind", ["llama", "bert2bert"])
def test_other_backbones_memorise_with_atomic_ids(kind):
    r = _trained("atomic", kind)
    assert [h[0].document_id for h in r.search_batch(TEXTS, k=1)] == IDS


@pytest.mark.parametrize("scheme", SCHEMES)
def test_filters_restrict_the_trie(scheme):
    r = _shared(scheme)
    hits = r.search(TEXTS[0], k=10, filter={"g": 1})
    assert hits and {h.document_id for h in hits} <= {"d1", "d3", "d5"}
    hits = r.search(TEXTS[2], k=10, filter={"y": {"$gte": 2002}, "g": 0})
    assert [h.document_id for h in hits][:1] == ["d2"]
    assert {h.document_id for h in hits} <= {"d2", "d4"}
    assert r.search(TEXTS[0], filter={"g": 7}) == []


def test_untrained_retriever_refuses_to_search(tmp_path):
    r = tiny_retriever(docids="naive", path=str(tmp_path / "s"))
    r.add(DOCS)
    with pytest.raises(NotTrainedError, match="fit"):
        r.search("quick fox")
    # the untrained index still saves and reloads, and still refuses
    r.save(tmp_path / "copy")
    r2 = GenerativeDocidRetriever.load(tmp_path / "copy")
    with pytest.raises(NotTrainedError):
        r2.search("quick fox")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_delete_removes_docid_from_the_trie_for_good(scheme, tmp_path):
    r = _trained(scheme, path=str(tmp_path / "s"))
    assert r.search(TEXTS[3], k=1)[0].document_id == "d3"
    assert r.delete(["d3"]) == 1
    for q in TEXTS:
        assert all(h.document_id != "d3" for h in r.search(q, k=10))
    r.compact()
    r2 = GenerativeDocidRetriever.load(tmp_path / "s")
    for q in TEXTS:
        assert all(h.document_id != "d3" for h in r2.search(q, k=10))
    assert r2.search(TEXTS[1], k=1)[0].document_id == "d1"


@pytest.mark.parametrize("scheme", ["atomic", "naive"])
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    deleted=st.sets(st.sampled_from(IDS), max_size=5),
    group=st.sampled_from([None, 0, 1]),
    query=st.sampled_from([*TEXTS, "unrelated words", "42"]),
    k=st.integers(1, 8),
)
def test_no_invalid_or_deleted_id_is_ever_returned(
    scheme, deleted, group, query, k, tmp_path_factory
):
    r = _shared(scheme)
    if deleted:  # work on a copy so the shared retriever stays intact
        r = GenerativeDocidRetriever.load(_saved(scheme, tmp_path_factory))
        r.delete(sorted(deleted))
    flt = None if group is None else {"g": group}
    hits = r.search(query, k=k, filter=flt)
    ids = [h.document_id for h in hits]
    assert len(ids) == len(set(ids)) <= k
    assert not set(ids) & deleted
    assert set(ids) <= set(IDS)
    if group is not None:
        assert all(h.metadata["g"] == group for h in hits)
    if set(IDS) - deleted and not flt:
        assert hits


_SAVED: dict[str, Path] = {}


def _saved(scheme: str, factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the shared retriever's saved index, under pytest's own temp dirs."""
    import shutil

    if scheme not in _SAVED:
        saved = factory.mktemp("gen-saved") / "s"
        _shared(scheme).save(saved)
        _SAVED[scheme] = saved
    copy = factory.mktemp("gen-copy") / "s"
    shutil.copytree(_SAVED[scheme], copy)
    return copy


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_restores_model_and_docids(scheme, tmp_path):
    r = _shared(scheme)
    r.save(tmp_path / "idx")
    aux = json.loads((tmp_path / "idx" / "manifest.json").read_text())["aux"]
    assert {"model", "tokenizer", "docids"} <= set(aux)
    assert all(a["file"].endswith(".safetensors") for a in aux.values())
    assert aux["docids"]["meta"]["map"]["scheme"] == scheme
    r2 = GenerativeDocidRetriever.load(tmp_path / "idx")
    assert r2.scheme == scheme and r2.docid_map.strings == r.docid_map.strings
    a = [[(h.chunk_id, round(h.score, 3)) for h in hs] for hs in r.search_batch(TEXTS, k=3)]
    b = [[(h.chunk_id, round(h.score, 3)) for h in hs] for hs in r2.search_batch(TEXTS, k=3)]
    assert a == b


def test_incremental_add_is_searchable_only_after_fit(tmp_path):
    r = _trained("atomic", path=str(tmp_path / "s"))
    new = {"id": "d6", "text": "jupiter planet gas giant", "metadata": {"g": 0, "y": 2006}}
    r.add([new])
    with pytest.warns(UserWarning, match="not searchable"):
        hits = r.search(new["text"], k=10)
    assert "d6" not in {h.document_id for h in hits}
    report = r.fit(full=False, replay_ratio=1.0, **{**MEMORISE, "epochs": 40})
    assert report.example_kinds == {"firstp": 2}  # the new doc + one replayed old example
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert r.search(new["text"], k=1)[0].document_id == "d6"


def test_semantic_incremental_add_places_new_docs_without_renaming_old(tmp_path):
    r = tiny_retriever(docids="semantic", semantic_k=2, semantic_c=3, path=str(tmp_path / "s"))
    r.add(DOCS)
    r.fit(**{**MEMORISE, "epochs": 2})
    before = list(r.docid_map.strings)
    r.add([{"id": "d6", "text": "jupiter planet gas giant"}])
    assert r.docid_map.strings[:6] == before
    assert r.docid_map.strings[6] is not None and r.docid_map.strings[6] not in before


def test_explain_traces_gold_rank_per_layer():
    r = _shared("atomic")
    out = r.explain(TEXTS[4], "d4")
    n_layers = 2  # the tiny T5 decoder
    assert [x["layer"] for x in out["layers"]] == list(range(n_layers + 1))
    assert out["final_rank"] == 1 and out["layers"][-1]["top_doc_id"] == "d4"
    assert all(1 <= x["rank"] <= out["num_docids"] for x in out["layers"])
    hit = r.search(TEXTS[4], k=1)[0]
    assert out["layers"][-1]["logit"] == pytest.approx(hit.score, rel=1e-4)
    with pytest.raises(InvalidInputError):
        _shared("naive").explain(TEXTS[4], "d4")
    with pytest.raises(KeyError):
        r.explain(TEXTS[4], "nope")


# ---------------------------------------------------------------------- bad input
def test_corpus_larger_than_atomic_id_space_is_refused_before_writing():
    r = tiny_retriever(docids="atomic", capacity=4)
    with pytest.raises(IdSpaceExhaustedError, match="capacity 4"):
        r.add(DOCS)
    assert len(r) == 0
    r.add(DOCS[:4])
    with pytest.raises(IdSpaceExhaustedError):
        r.add(DOCS[4:5])


def test_corpus_larger_than_semantic_id_space_is_refused():
    r = tiny_retriever(docids="semantic", semantic_k=2, semantic_c=1, semantic_max_depth=2)
    r.add(DOCS)  # 6 > 2**2 * 1
    with pytest.raises(IdSpaceExhaustedError):
        r.fit(**MEMORISE)


def test_docid_map_that_does_not_match_the_vocabulary_is_refused(tmp_path):
    r = _trained("naive", path=str(tmp_path / "s"), max_steps=2)
    m = r.docid_map.to_json()
    m["tokens"][0] = [10_000, 1]  # beyond the 320-token vocabulary
    r.store.put_aux("docids", r.docid_map.centroid_tensors(), {"map": m})
    r.close()
    with pytest.raises(DocidVocabularyError, match="outside the model vocabulary"):
        GenerativeDocidRetriever.load(tmp_path / "s")


def test_atomic_head_smaller_than_docid_map_is_refused(tmp_path):
    r = _trained("atomic", path=str(tmp_path / "s"), max_steps=2)
    m = r.docid_map.to_json()
    m["trained"] = list(range(50))
    m["strings"] = [f"<{i}>" for i in range(50)]
    m["tokens"] = [None] * 50
    r.store.put_aux("docids", r.docid_map.centroid_tensors(), {"map": m})
    r.close()
    with pytest.raises(DocidVocabularyError, match="head"):
        GenerativeDocidRetriever.load(tmp_path / "s")


def test_resuming_from_a_checkpoint_of_another_corpus_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r = tiny_retriever(docids="atomic")
    r.add(DOCS[:3])
    r.fit(**{**MEMORISE, "max_steps": 2, "checkpoint_dir": ckpt, "checkpoint_every": 1})
    other = tiny_retriever(docids="atomic")
    other.add(DOCS[3:])
    with pytest.raises(CheckpointMismatchError, match="corpus"):
        other.fit(**{**MEMORISE, "max_steps": 4, "checkpoint_dir": ckpt})


def test_bad_constructor_and_fit_arguments():
    with pytest.raises(InvalidInputError):
        tiny_retriever(docids="random")
    with pytest.raises(InvalidInputError):
        tiny_retriever(docids="naive", capacity=3)
    with pytest.raises(InvalidInputError):
        GenerativeDocidRetriever(torch.nn.Linear(2, 2))  # model object without tokenizer
    r = tiny_retriever()
    r.add(DOCS)
    with pytest.raises(InvalidInputError):
        r.fit(inputs=("firstp", "bogus"))
    with pytest.raises(InvalidInputError):
        r.fit(train_mode="encoder_only", max_steps=1)
