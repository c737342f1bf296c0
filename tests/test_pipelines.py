"""Composed retrievers: a second stage scores exactly the first stage's candidates (equal to its
own search restricted to them), `Rerank` and `Fusion` behave as retrievers (persist, reload,
write to every stage), and bad compositions are refused with typed errors."""

from __future__ import annotations

import json

import pytest
import torch
from support.decoder import save_causal_lm
from support.generative import MEMORISE, tiny_retriever
from support.intra import save as save_intra_model
from support.retrievers import CORPUS, QUERIES, QUERY

from intrinsic_retrieval import (
    Document,
    DuplicateIdError,
    Fusion,
    Hit,
    InvalidInputError,
    Rerank,
    StageMismatchError,
    StoreCorruptedError,
    create_retriever,
    load_retriever,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"show_progress": False}


def bm25(path=None, **kw):
    return create_retriever("bm25", path=None if path is None else str(path), **QUIET, **kw)


def same(a: list[Hit], b: list[Hit]) -> None:
    assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
    assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- second stages
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_causal_lm(root, "llama", 0),
        "t5": save_intra_model("t5", root),
    }


def second_stage(kind: str, models) -> object:
    if kind == "bm25":
        return bm25()
    if kind == "incontext":
        return create_retriever("incontext", model=models["llama"], max_doc_tokens=96, **QUIET)
    if kind == "intra":
        r = create_retriever("intra", model=models["t5"], rerank_context="encoder", **QUIET)
        return r
    if kind == "generative":
        return tiny_retriever("t5", docids="atomic", num_beams=5, chunk_size=64)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["bm25", "incontext", "intra", "generative"])
def test_rerank_scores_exactly_the_candidates(kind, models):
    """`rerank` equals the retriever's own search with the store masked to the candidates:
    in-context attends to their stored K/V only, INTRA pools them, DSI's trie holds them."""
    r = second_stage(kind, models)
    r.add(CORPUS)
    if kind == "generative":
        r.fit(**{**MEMORISE, "epochs": 1})
    if kind == "intra":
        r.fit(QUERIES, epochs=5, batch_size=5, lr=3e-2, show_progress=False)
    candidates = ["antibiotic", "photo", "jupiter"]
    got = r.rerank(QUERY, candidates, k=3)
    want = r.search(QUERY, k=3, filter={"document_id": {"$in": candidates}})
    same(got, want)
    assert {h.document_id for h in got} <= set(candidates)
    # hits from another retriever work as candidates, their order does not change the scores
    hits = bm25_hits(candidates)
    same(r.rerank(QUERY, hits[::-1], k=3), want)
    r.close()


def bm25_hits(doc_ids: list[str]) -> list[Hit]:
    return [Hit(f"{d}#9", d, "", 0.0, i + 1) for i, d in enumerate(doc_ids)]


def test_intra_takes_its_initial_context_from_the_first_stage(models):
    r = create_retriever("intra", model=models["t5"], k0=2, **QUIET)
    r.add(CORPUS)
    r.fit(QUERIES, epochs=5, batch_size=5, lr=3e-2, show_progress=False)
    order = ["volcano", "insulin", "photo", "jupiter"]
    got = r.rerank(QUERY, order, k=4)
    rows = torch.tensor([r.store.rows_for_ids([d])[0] for d in order])
    mask = torch.zeros(r.store.num_rows, dtype=torch.bool)
    mask[rows] = True
    with torch.no_grad():
        folded = r.retrieval_pass(QUERY, rows[:2].tolist())  # C0 = the first stage's top 2
    want_rows, want_scores = r.score_folded(folded, mask, 4, rows[:2])
    assert [h.document_id for h in got] == [c.document_id for c in r.store.get(want_rows.tolist())]
    assert [h.score for h in got] == pytest.approx(want_scores.tolist(), rel=1e-5)
    with r.using(rerank_context="encoder"):
        same(
            r.rerank(QUERY, order, k=4),
            r.search(QUERY, k=4, filter={"document_id": {"$in": order}}),
        )
    r.close()


def test_rerank_refuses_bad_candidates():
    r = bm25()
    r.add(CORPUS)
    with pytest.raises(StageMismatchError) as err:
        r.rerank(QUERY, ["photo", "not-indexed"], k=2)
    assert err.value.ids == ["not-indexed"]
    with pytest.raises(InvalidInputError):
        r.rerank(QUERY, "photo", k=2)
    with pytest.raises(InvalidInputError):
        r.rerank(QUERY, [3], k=2)
    with pytest.raises(InvalidInputError):
        r.rerank(QUERY, ["photo"], k=0)
    assert r.rerank(QUERY, ["photo", "jupiter"], k=5, filter={"topic": "geology"}) == []
    r.close()


# ---------------------------------------------------------------- Rerank
def rerank(path=None, **kw) -> Rerank:
    kw.setdefault("candidates", 3)
    kw.setdefault("first", {"name": "bm25", **QUIET})
    kw.setdefault("second", {"name": "bm25", "k1": 0.5, **QUIET})
    return create_retriever("rerank", path=None if path is None else str(path), **kw)


def test_rerank_is_the_second_stage_over_the_first_stages_candidates(tmp_path):
    p = rerank(tmp_path / "idx")
    assert p.add(CORPUS) == [d.id for d in CORPUS]
    got = p.search(QUERY, k=2)
    candidates = p.first.search(QUERY, k=3)
    same(got, p.second.rerank(QUERY, candidates, k=2))
    assert p.search_batch([QUERY, "gas giant"], k=2)[0] == got
    assert len(p) == len(p.second)
    assert set(p.median_stage_ms()) == {"first", "second"}
    with pytest.raises(InvalidInputError, match="exceeds the 3 candidates"):
        p.search(QUERY, k=4)
    flt = {"topic": "biology"}
    assert {h.document_id for h in p.search(QUERY, k=3, filter=flt)} <= {
        "photo",
        "insulin",
        "antibiotic",
    }
    p.close()
    again = load_retriever(tmp_path / "idx")
    assert isinstance(again, Rerank) and again.candidates == 3
    same(again.search(QUERY, k=2), got)
    again.save(tmp_path / "copy")
    again.close()
    copy = load_retriever(tmp_path / "copy", candidates=5)
    assert copy.candidates == 5
    assert json.loads((tmp_path / "copy/pipeline.json").read_text())["options"] == {"candidates": 3}
    same(copy.search(QUERY, k=2), got)
    copy.close()


def test_rerank_writes_to_both_stages(tmp_path):
    p = rerank(tmp_path / "idx")
    p.add(CORPUS[:3])
    with pytest.raises(DuplicateIdError):
        p.add(CORPUS[:1])
    assert p.add(CORPUS, on_duplicate="skip") == [d.id for d in CORPUS[3:]]
    assert p.delete(["photo"]) == 1
    for stage in p.stages.values():
        assert "photo" not in stage.store.document_ids()
    assert all(h.document_id != "photo" for h in p.search(QUERY, k=3))
    p.close()


def _failing_encoder(stage, after: int, exc: BaseException):
    """Make `stage` raise `exc` when encoding its batch number `after` (from 0)."""
    calls = {"n": 0}
    real = stage._encode_chunks

    def encode(chunks):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return real(chunks)

    stage._encode_chunks = encode


def test_a_failing_stage_leaves_no_document_behind(tmp_path):
    """The second stage commits two one-document batches, then fails: every stage is rolled
    back to what it held before this add."""
    p = Rerank({"name": "bm25", **QUIET}, {"name": "bm25", "index_batch_size": 1, **QUIET})
    p.add(CORPUS[:2])
    _failing_encoder(p.second, 2, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        p.add(CORPUS[2:])
    for stage in p.stages.values():
        assert stage.document_ids() == {"photo", "volcano"}
    p.close()


def test_an_interrupted_add_keeps_its_work_and_resumes(tmp_path):
    p = rerank(tmp_path / "idx", second={"name": "bm25", "index_batch_size": 1, **QUIET})
    _failing_encoder(p.second, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        p.add(CORPUS)
    assert len(p.first.document_ids()) == 5 and len(p.second.document_ids()) == 2
    p.close()
    with pytest.raises(StageMismatchError, match="second stage"):
        load_retriever(tmp_path / "idx")
    again = load_retriever(tmp_path / "idx", check_stages=False)
    assert again.add(CORPUS, on_duplicate="skip") == [d.id for d in CORPUS[2:]]
    again.check_stages()
    again.close()


def test_mismatched_stages_are_refused(tmp_path):
    first, second = bm25(tmp_path / "a"), bm25(tmp_path / "b")
    first.add(CORPUS)
    second.add(CORPUS[:4])
    with pytest.raises(StageMismatchError, match="lacks 1 document") as err:
        Rerank(first, second)
    assert err.value.ids == ["antibiotic"]
    # opened anyway, a candidate the second stage lacks is a typed error at query time
    p = Rerank(first, second, candidates=5, check_stages=False)
    with pytest.raises(StageMismatchError, match="antibiotic"):
        p.search("bacteria antibiotics", k=2)
    second.add(CORPUS, on_duplicate="skip")  # finishing the add makes it whole
    p.check_stages()
    assert p.search("bacteria antibiotics", k=1)[0].document_id == "antibiotic"
    p.close()


def test_bad_compositions_are_refused(tmp_path):
    class Foreign:  # a protocol retriever that cannot score a subset of its own index
        def add(self, docs, **kw):
            return []

        def delete(self, ids):
            return 0

        def search_batch(self, queries, k=10, filter=None):
            return [[] for _ in queries]

        def save(self, path):
            pass

    with pytest.raises(InvalidInputError, match="no rerank"):
        Rerank("bm25", Foreign())
    with pytest.raises(InvalidInputError, match="own index"):
        Rerank(bm25(), "bm25", path=tmp_path / "x")
    with pytest.raises(InvalidInputError, match="candidates"):
        Rerank("bm25", "bm25", candidates=0)
    with pytest.raises(InvalidInputError, match="'name'"):
        Rerank({"k1": 1.0}, "bm25")
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        Rerank("bm26", "bm25")
    with pytest.raises(InvalidInputError, match="first stage can return"):
        Rerank(Fusion(["bm25"], depth=20), "bm25", candidates=50)
    rerank(tmp_path / "r").close()
    with pytest.raises(Exception, match="'rerank' pipeline"):
        Fusion(["bm25", "bm25"], path=tmp_path / "r")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/file").write_text("x")
    with pytest.raises(Exception, match="not empty"):
        rerank(tmp_path / "full")


def test_damaged_pipelines_are_reported(tmp_path):
    p = rerank(tmp_path / "idx")
    p.add(CORPUS)
    p.close()
    manifest = tmp_path / "idx/pipeline.json"
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(StoreCorruptedError, match=r"pipeline\.json"):
        load_retriever(tmp_path / "idx")
    manifest.write_text(good.replace('"candidates": 3', '"candidatez": 3'))
    with pytest.raises(InvalidInputError, match="candidatez"):
        load_retriever(tmp_path / "idx")
    manifest.write_text(good)
    import shutil

    shutil.rmtree(tmp_path / "idx/second")
    with pytest.raises(StoreCorruptedError, match="second stage is missing"):
        load_retriever(tmp_path / "idx")
    # building it again with the same stages finishes it
    p = rerank(tmp_path / "idx", check_stages=False)
    p.add(CORPUS, on_duplicate="skip")
    p.check_stages()
    assert p.search(QUERY, k=1)[0].document_id == "photo"
    p.close()


# ---------------------------------------------------------------- Fusion
def test_fusion_is_reciprocal_rank_fusion(tmp_path):
    f = create_retriever(
        "fusion",
        retrievers=[{"name": "bm25", **QUIET}, {"name": "bm25", "k1": 0.2, **QUIET}],
        rrf_k=10,
        depth=5,
        weights=[1.0, 2.0],
        path=str(tmp_path / "idx"),
    )
    f.add(CORPUS)
    runs = [r.search(QUERY, k=5) for r in f.stages.values()]
    want: dict[str, float] = {}
    for w, run in zip([1.0, 2.0], runs, strict=True):
        for rank, h in enumerate(run, start=1):
            want[h.document_id] = want.get(h.document_id, 0.0) + w / (10 + rank)
    got = f.search(QUERY, k=5)
    assert [h.document_id for h in got] == sorted(want, key=lambda d: (-want[d], d))
    assert [h.score for h in got] == pytest.approx(sorted(want.values(), reverse=True))
    assert [h.rank for h in got] == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidInputError, match="depth"):
        f.search(QUERY, k=6)
    f.close()
    again = load_retriever(tmp_path / "idx")
    assert isinstance(again, Fusion) and again.weights == [1.0, 2.0]
    same(again.search(QUERY, k=5), got)
    assert again.delete(["photo"]) == 1
    assert all(h.document_id != "photo" for h in again.search(QUERY, k=4))
    again.close()


@pytest.mark.parametrize(
    "kw",
    [
        {"retrievers": []},
        {"retrievers": "bm25"},
        {"retrievers": ["bm25"], "depth": 0},
        {"retrievers": ["bm25"], "rrf_k": -1},
        {"retrievers": ["bm25", "bm25"], "weights": [1.0]},
    ],
)
def test_fusion_refuses_bad_options(kw):
    with pytest.raises(InvalidInputError):
        Fusion(**kw)


def test_pipelines_nest(tmp_path):
    """A fusion of a rerank pipeline and BM25: every level persists and reloads as one."""
    inner = rerank()
    f = Fusion([inner, bm25()], depth=3)
    f.add([*CORPUS, Document("Chloroplasts hold chlorophyll.", "chloro", {"topic": "biology"})])
    got = f.search(QUERY, k=3)
    f.save(tmp_path / "nested")
    f.close()
    again = load_retriever(tmp_path / "nested")
    assert isinstance(again.stages["stage0"], Rerank)
    same(again.search(QUERY, k=3), got)
    again.close()


# ---------------------------------------------------------------- command line
def test_cli_builds_searches_and_describes_a_pipeline(tmp_path, capsys):
    from intrinsic_retrieval.cli import main

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"_id": d.id, "text": d.text}) for d in CORPUS), encoding="utf-8"
    )
    store = str(tmp_path / "idx")
    args = ["index", str(corpus), "--store", store, "--retriever", "rerank"]
    opts = ["--option", "first=bm25", "--option", 'second={"name": "bm25", "k1": 0.5}']
    assert main([*args, *opts, "--option", "candidates=3"]) == 0
    assert main([*args, *opts]) == 0  # the same command again: nothing new to index
    assert "0 new documents" in capsys.readouterr().out
    assert main([*args]) == 0  # without the stage options: reopens as recorded
    assert "0 new documents" in capsys.readouterr().out
    assert main(["search", QUERY, "--store", store, "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]
    assert hits[0]["document_id"] == "photo"
    assert main(["info", "--store", store]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["retriever"] == "rerank" and set(info["stages"]) == {"first", "second"}
    assert info["stages"]["second"]["init"]["k1"] == 0.5
    assert main(["search", QUERY, "--store", store, "-k", "4"]) == 2
    assert "exceeds the 3 candidates" in capsys.readouterr().err
    labels = tmp_path / "q.jsonl"
    labels.write_text(json.dumps({"_id": "q", "text": QUERY}), encoding="utf-8")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq\tphoto\t1\n", encoding="utf-8")
    fit = ["fit", "--store", store, "--queries", str(labels), "--qrels", str(qrels)]
    assert main(fit) == 2
    assert "trains stage by stage" in capsys.readouterr().err


def test_stages_that_chunk_differently(tmp_path):
    """First-stage chunks the second stage does not hold (other ids, or the same id over other
    text) stand for their whole document there."""
    long = [Document(d.text + " " + d.text, d.id, d.metadata) for d in CORPUS]
    first = bm25(chunk_size=6, chunk_overlap=0)
    second = bm25(chunk_size=9, chunk_overlap=0)
    first.add(long)
    second.add(long)
    hits = first.search(QUERY, k=4)
    assert any(h.chunk_id in second.store.rows_by_id([h.chunk_id]) for h in hits)
    docs = list(dict.fromkeys(h.document_id for h in hits))
    same(
        second.rerank(QUERY, hits, k=5),
        second.search(QUERY, k=5, filter={"document_id": {"$in": docs}}),
    )
    # with the same chunking, a hit stands for its own chunk only
    twin = bm25(chunk_size=6, chunk_overlap=0)
    twin.add(long)
    assert [h.chunk_id for h in twin.rerank(QUERY, hits[:1], k=5)] == [hits[0].chunk_id]
    for r in (first, second, twin):
        r.close()


def test_nested_stages_are_checked_for_agreement():
    inner = rerank()
    inner.add(CORPUS)
    other = bm25()
    other.add(CORPUS[:3])
    with pytest.raises(StageMismatchError):
        Fusion([inner, other], depth=3)
    other.add(CORPUS, on_duplicate="skip")
    f = Fusion([inner, other], depth=3, show_progress=False)
    assert f.document_ids() == {d.id for d in CORPUS}
    f.close()
