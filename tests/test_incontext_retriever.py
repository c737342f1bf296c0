"""InContextRetriever end to end on a tiny random Llama (and Qwen3) saved to disk."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from support.decoder import save_causal_lm

from intrinsic_retrieval.errors import (
    EmptyQueryError,
    IdSpaceExhaustedError,
    InvalidInputError,
    ModelMismatchError,
)
from intrinsic_retrieval.retrievers.incontext import InContextRetriever
from intrinsic_retrieval.retrievers.incontext.codes import NULL_QUERY
from intrinsic_retrieval.retrievers.incontext.kv import read_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return save_causal_lm(tmp_path_factory.mktemp("models"), "llama", 0)


@pytest.fixture(scope="module")
def tiny_llama_other(tmp_path_factory) -> str:
    return save_causal_lm(tmp_path_factory.mktemp("models"), "llama", 1)


DOCS = [
    {"id": "a", "text": "the quick brown fox", "metadata": {"topic": "animal"}},
    {"id": "b", "text": "cancer cells protein gene study", "metadata": {"topic": "bio"}},
    {"id": "c", "text": "vitamin blood risk patients", "metadata": {"topic": "bio"}},
    {"id": "d", "text": "lazy dog jumps over the fox", "metadata": {"topic": "animal"}},
]


def make(model: str, tmp_path: Path, **kw) -> InContextRetriever:
    kw.setdefault("max_doc_tokens", 64)
    return InContextRetriever(model, path=str(tmp_path / "idx"), show_progress=False, **kw)


def test_add_search_delete_save_load(tiny_llama: str, tmp_path: Path) -> None:
    r = make(tiny_llama, tmp_path)
    assert r.add(DOCS) == ["a", "b", "c", "d"]
    hits = r.search("fox dog", k=3)
    assert len(hits) == 3 and [h.rank for h in hits] == [1, 2, 3]
    assert len({h.document_id for h in hits}) == 3
    # a filter restricts candidates; deleted documents never come back
    bio = r.search("cells", k=4, filter={"topic": "bio"})
    assert {h.document_id for h in bio} == {"b", "c"}
    assert r.delete(["b"]) == 1
    assert "b" not in {h.document_id for h in r.search("cells", k=4)}
    before = [(h.document_id, round(h.score, 5)) for h in r.search("blood risk", k=3)]
    r.save(tmp_path / "copy")
    r2 = InContextRetriever.load(tmp_path / "copy", show_progress=False)
    after = [(h.document_id, round(h.score, 5)) for h in r2.search("blood risk", k=3)]
    assert before == after
    # adding one document prefills only that document and reuses the freed code
    r2.add([{"id": "e", "text": "fox fox fox"}])
    codes = r2.store.fixed("code")[r2.store.live_rows()].tolist()
    assert sorted(codes) == [0, 2, 3, 1] or sorted(codes) == [0, 1, 2, 3]


def test_stored_kv_matches_fresh_prefill_and_ram_equals_mmap(
    tiny_llama: str, tmp_path: Path
) -> None:
    r = make(tiny_llama, tmp_path)
    r.add(DOCS)
    ram = make(tiny_llama, tmp_path, kv_source="ram")  # reopens the same store
    q = "protein gene"
    a = [(h.document_id, h.score) for h in r.search(q, k=4)]
    b = [(h.document_id, h.score) for h in ram.search(q, k=4)]
    assert [x for x, _ in a] == [x for x, _ in b]
    assert torch.allclose(
        torch.tensor([s for _, s in a]), torch.tensor([s for _, s in b]), atol=1e-5
    )


@pytest.mark.parametrize(
    "opts",
    [
        {"store_dtype": "int8"},
        {"ssmax": "auto"},
        {"ssmax": 0.5, "ssmax_count": "docs"},
        {"route_layer": 1, "route_top": 2},
        {"calibrate": False, "readout_layers": [1, 2], "readout_heads": [0, 3]},
        {"readout_tokens": "query", "kv_layers": 2},
        {"scoring": "codes", "num_beams": 3},
    ],
)
def test_scoring_options_return_valid_rankings(tiny_llama: str, tmp_path: Path, opts) -> None:
    r = make(tiny_llama, tmp_path, **opts)
    r.add(DOCS)
    hits = r.search("fox cells", k=4)
    assert sorted(h.document_id for h in hits) == ["a", "b", "c", "d"]
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    "opts",
    [{}, {"ssmax": "auto", "store_dtype": "int8"}, {"readout_tokens": "query", "kv_source": "ram"}],
)
def test_search_batch_shares_one_pass_and_equals_single_searches(
    tiny_llama: str, tmp_path: Path, opts
) -> None:
    """Queries of different lengths right-padded into one pass rank exactly as one by one,
    whether they fit one query batch or several, and with a filter."""
    r = make(tiny_llama, tmp_path, query_batch=2, **opts)
    r.add(DOCS)
    queries = ["fox", "cancer cells protein gene study of mice", "blood risk", "dog jumps"]
    for flt in (None, {"topic": "bio"}):
        batch = r.search_batch(queries, k=3, filter=flt)
        for q, got in zip(queries, batch, strict=True):
            one = r.search(q, k=3, filter=flt)
            assert [h.chunk_id for h in got] == [h.chunk_id for h in one]
            for a, b in zip(got, one, strict=True):
                assert a.score == pytest.approx(b.score, abs=1e-5)
    with pytest.raises(InvalidInputError):
        r.configure(query_batch=0)


def test_packed_search_batch_keeps_sliding_windows_and_positions(tmp_path: Path) -> None:
    """Gemma 3 (sliding-window layers of 10 tokens, scalable softmax): queries packed into one
    row see the blocks through the window from their own positions and only their own earlier
    tokens, exactly as when searched one by one (queries longer than the window included)."""
    model = save_causal_lm(tmp_path / "models", "gemma3", 0)
    r = make(model, tmp_path, max_doc_tokens=20, query_batch=3, ssmax="auto")
    r.add(DOCS)
    queries = [
        "fox",
        "cancer cells protein gene study of mice and men in the blood of dogs",
        "blood risk",
        "dog jumps over a lazy fox near the river bank today",
    ]
    for q, got in zip(queries, r.search_batch(queries, k=4), strict=True):
        one = r.search(q, k=4)
        assert [h.chunk_id for h in got] == [h.chunk_id for h in one]
        for a, b in zip(got, one, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)


TOPIC_DOCS = [
    {"id": f"t{i}", "text": f"topic {w} number {i} about {w}"}
    for i, w in enumerate(["fox", "cells", "blood", "dog", "solar", "river", "jazz", "gene"])
]
TOPIC_QUERIES = {f"what about {d['text'].split()[1]}?": d["id"] for d in TOPIC_DOCS}


def test_readout_fit_trains_a_query_lora_that_persists(tiny_llama: str, tmp_path: Path) -> None:
    """BlockSearch-style training on stored blocks: the loss falls, the stored K/V are not
    touched, the query LoRA reloads with the store, batch and single searches agree with it,
    and a checkpoint from another corpus is refused."""
    from intrinsic_retrieval.errors import CheckpointMismatchError

    r = make(tiny_llama, tmp_path, max_doc_tokens=32, ssmax="auto", route_layer=0, route_top=4)
    r.add(TOPIC_DOCS)
    k_before = r.store.varlen("k-0", [0])[0].clone()
    fp = r.fingerprint
    report = r.fit(
        TOPIC_QUERIES, objective="readout", candidates=6, hard_negatives=2, epochs=20,
        lr=1e-2, batch_size=4, show_progress=False, checkpoint_dir=str(tmp_path / "ck"),
    )  # fmt: skip
    losses = report.losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    # rank 8 on every layer's query projection, nothing else
    assert report.trainable_params == sum(
        8 * (p.in_features + p.out_features) for p in r.query_projs()
    )
    assert torch.equal(r.store.varlen("k-0", [0])[0], k_before) and r.fingerprint == fp
    assert r.query_lora is not None
    queries = list(TOPIC_QUERIES)
    before = [[(h.chunk_id, h.score) for h in r.search(q, k=3)] for q in queries]
    r2 = InContextRetriever.load(tmp_path / "idx", show_progress=False)
    assert r2.query_lora is not None
    after = [[(h.chunk_id, h.score) for h in r2.search(q, k=3)] for q in queries]
    assert [[c for c, _ in x] for x in after] == [[c for c, _ in x] for x in before]
    r2.configure(route_layer=None)
    batch = r2.search_batch(queries, k=3)
    for q, got in zip(queries, batch, strict=True):
        assert [h.chunk_id for h in got] == [h.chunk_id for h in r2.search(q, k=3)]
    # the same checkpoint folder with another corpus: refused, not resumed
    other = make(tiny_llama, tmp_path / "o", max_doc_tokens=32)
    other.add(TOPIC_DOCS[:5])
    with pytest.raises(CheckpointMismatchError):
        other.fit(
            {q: d for q, d in TOPIC_QUERIES.items() if d in {"t0", "t1"}}, objective="readout",
            candidates=3, hard_negatives=1, show_progress=False,
            checkpoint_dir=str(tmp_path / "ck"),
        )  # fmt: skip


def test_readout_fit_refusals(tiny_llama: str, tmp_path: Path) -> None:
    r = make(tiny_llama, tmp_path, max_doc_tokens=32)
    r.add(TOPIC_DOCS)
    with pytest.raises(InvalidInputError, match="objective"):
        r.fit(TOPIC_QUERIES, objective="bogus")
    with pytest.raises(InvalidInputError, match="candidates"):
        r.fit(TOPIC_QUERIES, objective="readout", candidates=1)
    with pytest.raises(InvalidInputError, match="temperature"):
        r.fit(TOPIC_QUERIES, objective="readout", temperature=0)
    r.fit(TOPIC_QUERIES, objective="readout", candidates=4, max_steps=1, show_progress=False)
    # a query LoRA recorded for another model is refused when the store opens
    tensors, meta = r.store.get_aux("query_lora")
    r.store.put_aux(
        "query_lora", {k: v.clone() for k, v in tensors.items()}, {**meta, "model": "x"}
    )
    with pytest.raises(ModelMismatchError):
        InContextRetriever.load(tmp_path / "idx", show_progress=False)


def test_query_lora_moves_between_indexes_of_the_same_model(
    tiny_llama: str, tiny_llama_other: str, tmp_path: Path
) -> None:
    """A query LoRA saved from one index and loaded into another index of the same model ranks
    there exactly as where it was trained (on the same documents), persists in its new store,
    and is refused, the store untouched, for another model or a bad file."""
    from intrinsic_retrieval.errors import NotTrainedError

    trained = make(tiny_llama, tmp_path / "t", max_doc_tokens=32)
    trained.add(TOPIC_DOCS)
    with pytest.raises(NotTrainedError):
        trained.save_query_lora(tmp_path / "none.safetensors")
    trained.fit(
        TOPIC_QUERIES, objective="readout", candidates=4, hard_negatives=1, epochs=3,
        lr=1e-2, batch_size=4, show_progress=False,
    )  # fmt: skip
    trained.save_query_lora(tmp_path / "lora.safetensors")
    queries = list(TOPIC_QUERIES)[:3]

    def ranked(r: InContextRetriever) -> list[list[tuple[str, float]]]:
        return [[(h.document_id, h.score) for h in r.search(q, k=5)] for q in queries]

    fresh = make(tiny_llama, tmp_path / "f", max_doc_tokens=32)
    fresh.add(TOPIC_DOCS)
    untrained = ranked(fresh)
    fresh.load_query_lora(tmp_path / "lora.safetensors")
    got, want = ranked(fresh), ranked(trained)
    assert [[d for d, _ in x] for x in got] == [[d for d, _ in x] for x in want]
    for g, w in zip(got, want, strict=True):
        assert [s for _, s in g] == pytest.approx([s for _, s in w], abs=1e-5)
    assert got != untrained  # the update is in force
    reopened = InContextRetriever.load(tmp_path / "f" / "idx", show_progress=False)
    assert reopened.query_lora is not None and ranked(reopened) == got
    with reopened.using(use_query_lora=False):  # zero-shot again, the LoRA kept
        assert ranked(reopened) == untrained
    assert ranked(reopened) == got
    with pytest.raises(InvalidInputError, match="use_query_lora"):
        reopened.configure(use_query_lora="no")
    other = make(tiny_llama_other, tmp_path / "o", max_doc_tokens=32)
    other.add(TOPIC_DOCS[:2])
    with pytest.raises(ModelMismatchError):
        other.load_query_lora(tmp_path / "lora.safetensors")
    assert other.query_lora is None and "query_lora" not in other.store.aux_names()
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # no metadata
    with pytest.raises(InvalidInputError, match="not an in-context query LoRA"):
        fresh.load_query_lora(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(InvalidInputError, match="safetensors"):
        fresh.load_query_lora(tmp_path / "bad.safetensors")
    with pytest.raises(InvalidInputError, match="no query LoRA file"):
        fresh.load_query_lora(tmp_path / "missing.safetensors")
    assert ranked(fresh) == got


def test_routing_with_all_documents_equals_no_routing(tiny_llama: str, tmp_path: Path) -> None:
    plain = make(tiny_llama, tmp_path / "p")
    plain.add(DOCS)
    routed = make(tiny_llama, tmp_path / "r", route_layer=0, route_top=len(DOCS))
    routed.add(DOCS)
    a = [(h.document_id, round(h.score, 5)) for h in plain.search("dog", k=4)]
    b = [(h.document_id, round(h.score, 5)) for h in routed.search("dog", k=4)]
    assert a == b


def test_mass_routing_keeps_the_early_layers_readout_top(tiny_llama: str, tmp_path: Path) -> None:
    """route_score="mass" routes by the calibrated readout of the layers before the first routed
    one: the routed set is the top of a plain search that reads those layers only."""
    docs = [*DOCS, {"id": "e", "text": "gene study of mice"}, {"id": "f", "text": "dog blood"}]
    early = make(tiny_llama, tmp_path / "early", readout_layers=[0, 1])
    early.add(docs)
    routed = make(tiny_llama, tmp_path / "r", route_layer=1, route_top=3, route_score="mass")
    routed.add(docs)
    for q in ("fox dog", "protein gene cells"):
        top = {h.document_id for h in early.search(q, k=3)}
        assert {h.document_id for h in routed.search(q, k=6)[:3]} == top
    # routing every document is no routing at all
    plain = make(tiny_llama, tmp_path / "p")
    plain.add(docs)
    routed.configure(route_top=len(docs))
    _same_ranking(_ranked(routed, "fox dog", 6), _ranked(plain, "fox dog", 6))
    with pytest.raises(InvalidInputError, match="route_score"):
        routed.configure(route_score="qk")
    with pytest.raises(InvalidInputError, match="readout_layers has none"):
        routed.configure(readout_layers=[2])
    routed.configure(readout_layers=[1, 2])  # layer 1 routes after its attention: it counts
    with pytest.raises(InvalidInputError, match="readout_layers has none"):
        routed.configure(route_before_attend=True, readout_layers=[1, 2])  # now it does not


def test_readout_fit_with_mass_routing(tiny_llama: str, tmp_path: Path) -> None:
    """Training with route_score="mass" adds the routing cross-entropy on the early layers'
    readout (the loss is larger than without it) and still lowers it."""
    losses = {}
    for score in ("maxsim", "mass"):
        r = make(tiny_llama, tmp_path / score, max_doc_tokens=32, route_layer=0, route_score=score)
        r.add(TOPIC_DOCS)
        report = r.fit(
            TOPIC_QUERIES, objective="readout", candidates=6, hard_negatives=2, epochs=12,
            lr=1e-2, batch_size=4, show_progress=False, route_weight=1.0,
        )  # fmt: skip
        losses[score] = report.losses
    mass = losses["mass"]
    assert sum(mass[-3:]) / 3 < sum(mass[:3]) / 3
    assert mass[0] != pytest.approx(losses["maxsim"][0])


def test_bad_input(tiny_llama: str, tiny_llama_other: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no room"):
        make(tiny_llama, tmp_path / "x", max_doc_tokens=12)
    r = make(tiny_llama, tmp_path, max_doc_tokens=40)
    long = {"id": "long", "text": " ".join(["protein"] * 100)}
    with pytest.warns(UserWarning, match="truncated"):
        r.add([long, DOCS[0]])
    assert r.truncated_ids == ["long#0"]
    assert int(r.store.varlen_lengths("ids").max()) <= 40
    with pytest.raises(EmptyQueryError):
        r.search("   ")
    assert len(r.search("fox", k=50)) == 2  # k > N returns every document
    with pytest.raises(InvalidInputError):
        r.search("fox", k=0)
    r.close()
    with pytest.raises(ModelMismatchError):
        make(tiny_llama_other, tmp_path, max_doc_tokens=40)
    small = InContextRetriever(tiny_llama, code_digits=1, max_doc_tokens=40, show_progress=False)
    with pytest.raises(IdSpaceExhaustedError, match="code_digits=2"):
        small.add([f"doc number {i}" for i in range(11)])
    assert len(small) == 0  # nothing was half-added
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small.add([f"doc number {i}" for i in range(10)])
    with pytest.raises(IdSpaceExhaustedError):
        small.add(["one more"])
    with pytest.raises(InvalidInputError):
        InContextRetriever(tiny_llama, scoring="nope", show_progress=False)


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fit_to_emit_codes_lowers_loss_and_rebuilds_index(
    tiny_llama: str, tmp_path: Path, lora: bool
) -> None:
    r = make(tiny_llama, tmp_path, scoring="codes", code_digits=2, num_beams=4)
    r.add(DOCS)
    queries = ["quick brown", "cancer gene", "vitamin blood", "lazy dog"]
    stats = r.fit(
        queries,
        ["a", "b", "c", "d"],
        epochs=15,
        batch_size=4,
        corpus_size=4,
        lr=3e-3 if not lora else 1e-2,
        lora=lora,
        save_model_to=str(tmp_path / "tuned"),
    )
    losses = stats.losses
    assert len(losses) == 15
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert len(r) == 4  # index rebuilt with the tuned weights
    hits = r.search("lazy dog", k=2)
    assert len(hits) == 2
    r2 = InContextRetriever.load(r.path, show_progress=False)  # reopens with the tuned model
    assert [h.document_id for h in r2.search("lazy dog", k=2)] == [h.document_id for h in hits]


@pytest.mark.slow
def test_smollm2_gguf_readout_and_prefill_equivalence(smollm2_gguf: Path, tmp_path: Path) -> None:
    from intrinsic_retrieval.retrievers.incontext.prefill import prefill_blocks, prefill_packed

    r = InContextRetriever(
        str(smollm2_gguf),
        path=str(tmp_path / "idx"),
        max_doc_tokens=48,
        kv_layers=8,
        show_progress=False,
    )
    docs = [
        {"id": "vit", "text": "Vitamin D deficiency is associated with higher fracture risk."},
        {"id": "dog", "text": "The dog chased a ball across the park."},
        {"id": "gene", "text": "The BRCA1 gene mutation increases breast cancer risk."},
    ]
    r.add(docs)
    hits = r.search("Which gene mutation raises breast cancer risk?", k=3)
    assert sorted(h.document_id for h in hits) == ["dog", "gene", "vit"]
    blocks = [ids.tolist() for ids in r.store.varlen("ids", range(3))]
    with torch.no_grad():
        a = prefill_packed(r.arch, blocks, 8)
        b = prefill_blocks(r.arch, blocks, 8)
    stored_k = read_blocks(r.store, "layer", "k", r.kv_layers, range(3))  # (T, L, Hkv, D) each
    for (ka, va), (kb, vb), stored in zip(a, b, stored_k, strict=True):
        torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(stored.float(), ka, atol=2e-2, rtol=1e-2)  # fp16 storage


@pytest.mark.slow
def test_default_is_gemma3_and_ranks_a_toy_corpus(tmp_path: Path) -> None:
    from intrinsic_retrieval.models import gemma3_gguf_path

    if gemma3_gguf_path() is None:
        pytest.skip("Gemma 3 GGUF not found (run `make models`)")
    r = InContextRetriever(path=str(tmp_path / "idx"), max_doc_tokens=48, show_progress=False)
    assert r.model_name == "gemma3" and type(r.model).__name__ == "Gemma3ForCausalLM"
    r.add(
        [
            {"id": "vit", "text": "Vitamin D deficiency is associated with higher fracture risk."},
            {"id": "dog", "text": "The dog chased a ball across the park."},
            {"id": "gene", "text": "The BRCA1 gene mutation increases breast cancer risk."},
        ]
    )
    assert r.search("Which gene mutation raises breast cancer risk?", k=1)[0].document_id == (
        "gene"
    )
    r.close()
    again = InContextRetriever.load(str(tmp_path / "idx"), show_progress=False)
    assert again.model_name == "gemma3"  # recorded resolved, not as "the default"


def test_flex_backend_ranks_like_einsum(tiny_llama: str, tmp_path: Path) -> None:
    r = make(tiny_llama, tmp_path, ssmax="auto")
    r.add(DOCS)
    ref = r.search("solar panels on roofs", k=4)
    r.configure(attention_backend="flex")
    got = r.search("solar panels on roofs", k=4)
    assert [h.chunk_id for h in got] == [h.chunk_id for h in ref]
    for a, b in zip(got, ref, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    with pytest.raises(InvalidInputError):
        r.configure(attention_backend="sdpa")
    with pytest.raises(InvalidInputError):
        make(tiny_llama, tmp_path / "x", attention_backend="triton")


def _ranked(r: InContextRetriever, query: str, k: int = 4) -> list[tuple[str, float]]:
    return [(h.document_id, h.score) for h in r.search(query, k=k)]


def _same_ranking(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> None:
    assert [x for x, _ in a] == [x for x, _ in b]
    for (_, sa), (_, sb) in zip(a, b, strict=True):
        assert sa == pytest.approx(sb, abs=1e-4)


@pytest.mark.parametrize(
    "opts",
    [
        {"route_layer": 1},
        {"route_layer": 0, "ssmax": "auto", "kv_source": "ram"},
        {"route_layer": 1, "store_dtype": "int8", "calibrate": False},
        {"route_layer": 1, "scoring": "codes", "num_beams": 3},
        {"route_layer": 1, "route_score": "mass"},
    ],
)
def test_routing_keys_storage_ranks_like_full_storage(
    tiny_llama: str, tmp_path: Path, opts
) -> None:
    docs = [*DOCS, {"id": "e", "text": "gene study of mice"}, {"id": "f", "text": "dog blood"}]
    full = make(tiny_llama, tmp_path / "full", route_top=3, route_before_attend=True, **opts)
    full.add(docs)
    part = make(tiny_llama, tmp_path / "part", route_top=3, kv_storage="routing", **opts)
    part.add(docs)
    for q in ("fox dog", "protein gene cells"):
        _same_ranking(_ranked(part, q, 6), _ranked(full, q, 6))
    # the routed blocks of a repeated query come from the cache, not another prefill
    corpus = part.corpus()
    before = corpus.recomputed_blocks
    assert before > 0
    _ranked(part, "fox dog", 6)
    assert corpus.recomputed_blocks == before


def test_routing_keys_storage_routing_everything_equals_no_routing(
    tiny_llama: str, tmp_path: Path
) -> None:
    plain = make(tiny_llama, tmp_path / "p")
    plain.add(DOCS)
    part = make(tiny_llama, tmp_path / "r", kv_storage="routing", route_layer=1, route_top=4)
    part.add(DOCS)
    for q in ("dog", "vitamin blood"):
        _same_ranking(_ranked(part, q), _ranked(plain, q))


def test_routing_keys_storage_bytes_roundtrip_and_refusals(tiny_llama: str, tmp_path: Path) -> None:
    full = make(tiny_llama, tmp_path / "full")
    full.add(DOCS)
    part = make(tiny_llama, tmp_path / "part", kv_storage="routing", route_layer=0, route_top=2)
    part.add(DOCS)
    assert set(part.store.specs) == {"ids", "k-0", "code", "span"}  # r = 0: no values at all
    fb, pb = full.bytes_per_chunk(), part.bytes_per_chunk()
    assert fb["tokens"] == pb["tokens"]
    assert pb["kv"] * 5 < fb["kv"]  # keys of 1 of 3 layers vs keys and values of 3
    assert pb["stored"] * 3 < fb["stored"]
    before = _ranked(part, "blood risk")
    part.save(tmp_path / "copy")
    again = InContextRetriever.load(tmp_path / "copy", show_progress=False)
    assert again.kv_storage == "routing" and again.route_layer == 0
    _same_ranking(_ranked(again, "blood risk"), before)
    again.add([{"id": "e", "text": "fox fox fox"}])  # appends keep working (and the cache)
    assert "e" in {h.document_id for h in again.search("fox", k=5)}
    again.configure(route_top=5, route_layer=0, recompute_cache_docs=0)  # same layer: fine
    assert len(again.search("fox", k=5)) == 5
    with pytest.raises(InvalidInputError, match="index-defining"):
        again.configure(route_layer=1)
    with pytest.raises(InvalidInputError, match="route_before_attend"):
        again.configure(route_before_attend=False)
    part.close()
    full.close()
    with pytest.raises(ModelMismatchError):  # a full store is not a routing-keys store
        make(tiny_llama, tmp_path / "full", kv_storage="routing", route_layer=0)
    with pytest.raises(ModelMismatchError):  # nor is one routed at another layer
        make(tiny_llama, tmp_path / "part", kv_storage="routing", route_layer=1)
    with pytest.raises(InvalidInputError, match="route_layer"):
        make(tiny_llama, tmp_path / "x", kv_storage="routing")
    with pytest.raises(InvalidInputError, match="kv_storage"):
        make(tiny_llama, tmp_path / "x", kv_storage="keys")
    with pytest.raises(InvalidInputError, match="route_before_attend"):
        make(
            tiny_llama,
            tmp_path / "x",
            kv_storage="routing",
            route_layer=0,
            route_before_attend=False,
        )
    with pytest.raises(InvalidInputError, match="recompute_cache_docs"):
        make(tiny_llama, tmp_path / "x", recompute_cache_docs=-1)


@pytest.mark.parametrize("store_dtype", ["float16", "int8"])
def test_layer_and_token_layouts_rank_identically(
    tiny_llama: str, tmp_path: Path, store_dtype: str
) -> None:
    """The layer-major layout moves the same numbers: every read path (memory-mapped, in RAM,
    routed) gives exactly the token layout's ids and scores."""
    docs = [*DOCS, {"id": "e", "text": "gene study of mice"}, {"id": "f", "text": "dog blood"}]
    layer = make(tiny_llama, tmp_path / "layer", store_dtype=store_dtype, block_docs=2)
    token = make(
        tiny_llama, tmp_path / "token", store_dtype=store_dtype, block_docs=2, kv_layout="token"
    )
    for r in (layer, token):
        r.add(docs[:3])
        r.add(docs[3:])  # two shards: a block batch spans both
        r.delete(["b"])  # and skips a tombstone
    assert "k" in token.store.specs and "k-0" in layer.store.specs and "k" not in layer.store.specs
    assert layer.bytes_per_chunk()["kv"] == token.bytes_per_chunk()["kv"]
    ram = make(
        tiny_llama, tmp_path / "layer", store_dtype=store_dtype, kv_source="ram", block_docs=2
    )
    for q in ("fox dog", "protein gene cells"):
        want = _ranked(token, q, 5)
        assert _ranked(layer, q, 5) == want
        assert _ranked(ram, q, 5) == want
        with token.using(route_layer=1, route_top=3), layer.using(route_layer=1, route_top=3):
            assert _ranked(layer, q, 5) == _ranked(token, q, 5)


def test_convert_kv_layout_copies_and_resumes(
    tiny_llama: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token-layout store (as built before layouts existed, manifest without the option)
    reopens as such and converts to the layer layout without the model running: same ids and
    scores, its query LoRA along, the same fingerprint as a store built that way, and an
    interrupted conversion resumes without duplicates."""
    import json

    from intrinsic_retrieval.models.query_lora import LowRankUpdate

    old = make(tiny_llama, tmp_path / "old", kv_layout="token")
    old.add(DOCS)
    old.delete(["c"])
    projs = old.query_projs()
    torch.manual_seed(0)
    old.set_query_lora(
        LowRankUpdate(
            0.1 * torch.randn(len(projs), 2, projs[0].in_features),
            0.1 * torch.randn(len(projs), projs[0].out_features, 2),
        )
    )
    old.close()
    manifest = tmp_path / "old" / "idx" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["config"]["init"]["kv_layout"]  # what an older version recorded
    manifest.write_text(json.dumps(data))
    again = make(tiny_llama, tmp_path / "old")  # the constructor, no layout named: the store's
    assert again.kv_layout == "token"
    again.close()
    old = InContextRetriever.load(tmp_path / "old" / "idx", show_progress=False)
    assert old.kv_layout == "token" and "k" in old.store.specs
    want = {q: _ranked(old, q) for q in ("fox dog", "blood risk")}

    calls = 0
    real_append = type(old.store).append

    def failing_append(self, chunks, tensors):  # the second batch dies mid-conversion
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real_append(self, chunks, tensors)

    monkeypatch.setattr(type(old.store), "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        old.convert_kv_layout(tmp_path / "new", batch_rows=2)
    monkeypatch.undo()
    new = old.convert_kv_layout(tmp_path / "new", batch_rows=2)  # resumes
    assert new.kv_layout == "layer" and "k-0" in new.store.specs
    assert sorted(c.document_id for _, c in new.store.iter_chunks()) == ["a", "b", "d"]
    assert new.query_lora is not None
    for q, ranked in want.items():
        assert _ranked(new, q) == ranked
    fresh = make(tiny_llama, tmp_path / "fresh")
    assert new.fingerprint == fresh.fingerprint != old.fingerprint
    with pytest.raises(InvalidInputError, match="path outside"):
        old.convert_kv_layout(tmp_path / "old" / "idx")
    with pytest.raises(InvalidInputError, match="path outside"):  # inside the source
        old.convert_kv_layout(tmp_path / "old" / "idx" / "copy")
    with pytest.raises(InvalidInputError, match="already in the 'token'"):
        old.convert_kv_layout(tmp_path / "y", kv_layout="token")
    with pytest.raises(InvalidInputError, match="kv_layout"):
        old.convert_kv_layout(tmp_path / "x", kv_layout="rows")
    with pytest.raises(ModelMismatchError):  # a layer store is not opened as a token store
        make(tiny_llama, tmp_path / "fresh", kv_layout="token")


def test_convert_command_line(tiny_llama: str, tmp_path: Path, capsys) -> None:
    """`intrinsic-retrieval convert` copies a token-layout store into the layer layout and back
    (same ids and scores), resumes when rerun, and refuses in one typed line, before any model
    loads: a store of another retriever, a missing store, the layout the store already has,
    and a destination that is the source or inside it."""
    from intrinsic_retrieval.cli import main

    old = make(tiny_llama, tmp_path / "old", kv_layout="token")
    old.add(DOCS)
    want = {q: _ranked(old, q) for q in ("fox dog", "blood risk")}
    old.close()
    src, dest, back = tmp_path / "old" / "idx", tmp_path / "new", tmp_path / "back"
    assert main(["convert", "--store", str(src), "--out", str(dest)]) == 0
    assert "4 chunks, kv_layout=layer" in capsys.readouterr().out
    assert main(["convert", "--store", str(src), "--out", str(dest)]) == 0  # nothing left to do
    assert "4 chunks, kv_layout=layer" in capsys.readouterr().out
    assert main(["convert", "--store", str(dest), "--out", str(back), "--kv-layout", "token"]) == 0
    for path, layout in ((dest, "layer"), (back, "token")):
        r = InContextRetriever.load(path, show_progress=False)
        assert r.kv_layout == layout and len(r.store) == 4
        for q, ranked in want.items():
            assert _ranked(r, q) == ranked
        r.close()
    capsys.readouterr()
    bm25 = tmp_path / "bm25"
    assert main(["index", str(_jsonl(tmp_path)), "--store", str(bm25)]) == 0
    capsys.readouterr()
    refused = {
        "K/V layout to convert (bm25)": ["--store", str(bm25), "--out", str(tmp_path / "x")],
        "StoreNotFoundError": ["--store", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
        "already in the 'layer'": ["--store", str(dest), "--out", str(tmp_path / "x")],
        "path outside": ["--store", str(src), "--out", str(src / "inside")],
    }
    for expected, argv in refused.items():
        assert main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "x").exists() and not (src / "inside").exists()


def _jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"_id": d["id"], "text": d["text"]}) + "\n" for d in DOCS))
    return path


def test_content_free_pass_is_cached_across_using_blocks(tiny_llama: str, tmp_path: Path) -> None:
    """The calibration's content-free pass costs as much as a query: a ``using(...)`` block
    gets its own cached pass and leaves the default one, so the search after it does not pay it
    again (it did: any option change cleared the cache). Adding documents still clears it."""
    r = make(tiny_llama, tmp_path)
    r.add(DOCS)
    null_ids = r._query_ids(NULL_QUERY)[0]
    calls = []
    real_pass = r._pass

    def counting_pass(ids, *args, **kw):
        whole = not kw.get("start_layer")  # routed searches resume it over their own set
        calls.append(whole and ids.shape == null_ids.shape and bool((ids == null_ids).all()))
        return real_pass(ids, *args, **kw)

    r._pass = counting_pass
    first = _ranked(r, "fox dog")
    assert calls.count(True) == 1
    with r.using(route_layer=0, route_top=2):
        r.search("fox dog", k=2)
        r.search("blood risk", k=2)
    assert calls.count(True) == 2  # one for the routed options, reused by its second search
    assert _ranked(r, "fox dog") == first
    assert calls.count(True) == 2  # the default options' pass was kept
    r.add([{"id": "e", "text": "a new document about foxes"}])
    r.search("fox dog", k=2)
    assert calls.count(True) == 3  # new documents: computed again
