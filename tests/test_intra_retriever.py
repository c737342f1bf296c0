"""IntraRetriever on tiny random backbones: exact scoring, C0, ANN candidates, filters,
persistence, bad input, generation from stored states, and fit with checkpoint/resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from support.intra import gemma3_adapter, save

from intrinsic_retrieval.errors import (
    CheckpointMismatchError,
    EmptyQueryError,
    InvalidInputError,
    ModelMismatchError,
    UnsupportedArchitectureError,
)
from intrinsic_retrieval.retrievers.intra import IntraRetriever
from intrinsic_retrieval.retrievers.intra.generate import generate_from_text, select_context
from intrinsic_retrieval.retrievers.intra.qwk import QueryTap, folded_logits, key_rnorm

TOPICS = ["protein folding", "solar panels", "river ecology", "vaccine trials", "jazz history"]
DOCS = [
    {
        "id": f"d{i}",
        "text": f"note {i} on {TOPICS[i % 5]} and {TOPICS[(i * 3) % 5]} ({i * 7})",
        "metadata": {"topic": TOPICS[i % 5], "n": i},
    }
    for i in range(15)
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny models are saved (with the tiny tokenizer), once per module."""
    return tmp_path_factory.mktemp("intra-models")


def make(models: Path, tmp_path: Path, arch: str = "t5", seed: int = 0, **kw) -> IntraRetriever:
    kw.setdefault("k0", 2)
    kw.setdefault("pooled", 4)
    kw.setdefault("retrieval_tokens", 3)
    kw.setdefault("store_dtype", "float32")
    if arch == "t5gemma2-gemma3":
        kw.setdefault("memory_adapter", gemma3_adapter(models, seed))
    return IntraRetriever(
        save(arch, models, seed), path=tmp_path / f"idx-{arch}-{seed}", show_progress=False, **kw
    )


def brute_force(r: IntraRetriever, query: str, k: int) -> tuple[list[int], list[float]]:
    """INTRA by the definitions, chunk by chunk, with no shared scoring code."""
    live = r.store.live_rows().tolist()
    qs = r.encode_states([query])[0].float()
    pooled = r.store.fixed("pooled").float()
    c0_scores = {row: float((qs @ pooled[row].t()).amax(1).sum()) for row in live}
    c0 = sorted(live, key=lambda x: -c0_scores[x])[: r.k0]
    with torch.no_grad():
        folded = r.retrieval_pass(query, c0)
    scores = {}
    for row in live:
        p = pooled[row]
        rn = key_rnorm(p, r.layers) if r.arch.key_norm else None
        total = 0.0
        for li, layer in enumerate(r.layers):
            lg = folded_logits(
                folded.vectors[li][None],
                folded.const[li][None],
                p[None],
                layer,
                None if rn is None else rn[None, :, li],
            )[0]
            total += float((lg.amax(-1) * r.head.alpha.detach()[li][:, None]).sum())
        scores[row] = total
    top = sorted(live, key=lambda x: -scores[x])[:k]
    return top, [scores[x] for x in top]


@pytest.mark.parametrize("arch", ["t5", "t5gemma2", "t5gemma2-gemma3", "bert2bert"])
def test_search_equals_brute_force(models: Path, tmp_path: Path, arch: str) -> None:
    r = make(models, tmp_path, arch)
    r.add(DOCS)
    hits = r.search("vaccine trials on solar panels", k=6)
    rows = [r.store.row_of(h.chunk_id) for h in hits]
    want_rows, want_scores = brute_force(r, "vaccine trials on solar panels", 6)
    assert rows == want_rows
    assert [h.score for h in hits] == pytest.approx(want_scores, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize(
    ("arch", "mode", "positions"),
    [
        ("t5gemma2", "encoder", "retrieval"),
        ("t5gemma2", "intra", "retrieval"),
        ("t5gemma2-gemma3", "intra", "retrieval"),
        ("t5gemma2-gemma3", "intra", "query+retrieval"),
        ("t5", "intra", "query+retrieval"),
        ("bart", "intra", "retrieval"),
        ("t5gemma", "intra", "retrieval"),
        ("bert2bert", "intra", "retrieval"),
    ],
)
def test_search_batch_shares_encoder_and_scan_and_equals_single_searches(
    models: Path, tmp_path: Path, arch: str, mode: str, positions: str
) -> None:
    """Batched decoder passes (queries of different lengths right-padded, C0s of different
    lengths padded and masked) score exactly like one query at a time."""
    r = make(models, tmp_path, arch, query_positions=positions)
    r.add(DOCS)
    queries = ["vaccine", "river ecology of fish in the north", "solar panels", "gene"]
    with r.using(mode=mode):
        for flt in (None, {"topic": "vaccine trials"}):
            batch = r.search_batch(queries, k=4, filter=flt)
            for q, got in zip(queries, batch, strict=True):
                one = r.search(q, k=4, filter=flt)
                assert [h.chunk_id for h in got] == [h.chunk_id for h in one]
                assert [h.score for h in got] == pytest.approx([h.score for h in one], abs=1e-4)


@pytest.mark.parametrize("arch", ["t5gemma2", "t5gemma2-gemma3"])
def test_precomputed_cross_kv_equal_the_models_own_forward(
    models: Path, tmp_path: Path, arch: str
) -> None:
    """T5Gemma2's retrieval pass gets its cross K/V precomputed (memory adapter folded into
    W_K and W_V) and skips the LM head; its taps equal the model's own forward pass, which
    projects the memory itself."""
    r = make(models, tmp_path, arch)
    r.add(DOCS)
    c0 = [0, 3]
    memory, mask, _ = r.memory_for(c0)
    assert r.arch.cross_kv(memory) is not None
    emb = torch.cat(
        [r.arch.decoder_embeddings()(r.decoder_prefix("jazz history")[None]), r.head.tokens[None]],
        1,
    )
    with torch.no_grad():
        with QueryTap(r.layers, slice(-r.m, None)) as tap:
            r.arch.forward(memory, mask, emb)
        got = r.retrieval_pass("jazz history", c0)
    want = tap.folded()
    torch.testing.assert_close(got.vectors, want.vectors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.const, want.const, rtol=1e-5, atol=1e-6)


def test_retrieval_pass_reads_c0_and_tokens(models: Path, tmp_path: Path) -> None:
    """The retrieval tokens' queries depend on C0 (they attend to it), and C0 = {} works."""
    r = make(models, tmp_path, "t5")
    r.add(DOCS)
    with torch.no_grad():
        a = r.retrieval_pass("jazz", [0, 1]).vectors
        b = r.retrieval_pass("jazz", [2, 3]).vectors
        c = r.retrieval_pass("jazz", []).vectors
    assert a.shape == (len(r.layers), r.n_heads, r.m, r.dim)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    r0 = make(models, tmp_path / "e", "t5", k0=0)
    r0.add(DOCS)
    assert len(r0.search("jazz history", k=4)) == 4


def test_null_memory_is_no_cross_attention(models: Path, tmp_path: Path) -> None:
    """C0 = {}: the decoder runs as if cross-attention contributed nothing (T5 with a zero
    memory token gives exactly that, so it is a reference)."""
    r = make(models, tmp_path, "t5")
    r.add(DOCS)
    prefix = r.decoder_prefix("jazz")
    emb = torch.cat([r.arch.decoder_embeddings()(prefix[None]), r.head.tokens[None]], 1)
    zero = torch.zeros((1, 1, r.dim))
    with torch.no_grad():
        with QueryTap(r.layers, slice(-r.m, None), null_memory=True) as t1:
            r.arch.forward(zero, torch.zeros((1, 1), dtype=torch.long), emb)
        with QueryTap(r.layers, slice(-r.m, None)) as t2:
            r.arch.forward(zero, torch.ones((1, 1), dtype=torch.long), emb)
    torch.testing.assert_close(t1.folded().vectors, t2.folded().vectors)


def test_encoder_mode_and_ann_candidates(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5")
    r.add(DOCS)
    exact = [h.chunk_id for h in r.search("river ecology", k=5)]
    with r.using(mode="encoder"):
        enc = r.search("river ecology", k=5)
    assert len(enc) == 5 and enc[0].score >= enc[-1].score
    # FAISS candidates per layer + exact rescoring: with enough neighbours, identical results
    r.ann_threshold, r.ann_k = 1, 15 * r.p
    assert [h.chunk_id for h in r.search("river ecology", k=5)] == exact
    r.ann_k = 2  # few neighbours: still only real, exactly scored candidates
    assert len(r.search("river ecology", k=3)) == 3


def standardised_c0(r: IntraRetriever, query: str, k0: int) -> list[int]:
    """C0 by the definition: cosine of per-dimension standardised states, max over a chunk's
    pooled vectors, summed over query tokens; statistics over the live pooled vectors."""
    live = r.store.live_rows().tolist()
    pooled = r.store.fixed("pooled").float()
    flat = pooled[live].reshape(-1, r.dim)
    mean, std = flat.mean(0), flat.std(0)

    def z(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize((x - mean) / std, dim=-1)

    q = z(r.encode_states([query])[0].float())
    score = {row: float((q @ z(pooled[row]).t()).amax(1).sum()) for row in live}
    return sorted(live, key=lambda x: -score[x])[:k0]


def test_standardised_c0_follows_its_definition_and_the_store(models: Path, tmp_path: Path) -> None:
    """``c0_score="standardised"``: C0 as defined, batch = single, statistics refreshed when
    rows are added or deleted; an unknown value is refused."""
    r = make(models, tmp_path, "t5gemma2-gemma3", c0_score="standardised")
    r.add(DOCS[:10])
    live, cand = r.store.live_rows(), r.store.candidate_mask(None)
    query = "river ecology of fish"
    got = r.initial_context(r.encode_states([query])[0], cand, 5)[0].tolist()
    assert got == standardised_c0(r, query, 5)
    with r.using(c0_score="dot"):
        dot = r.initial_context(r.encode_states([query])[0], cand, len(live))[0].tolist()
    assert dot != r.initial_context(r.encode_states([query])[0], cand, len(live))[0].tolist()
    queries = ["vaccine", query, "solar panels"]
    with r.using(mode="encoder"):
        batch = r.search_batch(queries, k=4)
        for q, hits in zip(queries, batch, strict=True):
            assert [h.chunk_id for h in hits] == [h.chunk_id for h in r.search(q, k=4)]
    r.add(DOCS[10:])
    r.delete(["d0", "d3"])
    cand = r.store.candidate_mask(None)
    got = r.initial_context(r.encode_states([query])[0], cand, 5)[0].tolist()
    assert got == standardised_c0(r, query, 5)
    with pytest.raises(InvalidInputError):
        r.configure(c0_score="whitened")


def test_filters_k_and_deletes(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5")
    r.add(DOCS)
    hits = r.search("jazz", k=10, filter={"topic": "jazz history"})
    assert hits and all(h.metadata["topic"] == "jazz history" for h in hits)
    assert r.search("jazz", k=3, filter={"topic": "nothing"}) == []
    assert len(r.search("jazz", k=100)) == 15  # k larger than the corpus
    r.delete(["d4"])
    assert "d4#0" not in [h.chunk_id for h in r.search("jazz history", k=15)]
    ans = r.answer("jazz", k=3, filter={"topic": "nothing"})
    assert ans.text == "" and ans.context == []


def test_add_encodes_only_new_and_reload(models: Path, tmp_path: Path, monkeypatch) -> None:
    r = make(models, tmp_path, "t5")
    r.add(DOCS[:10])
    seen: list[str] = []
    orig = r._encode_chunks
    monkeypatch.setattr(
        r, "_encode_chunks", lambda chunks: seen.extend(c.id for c in chunks) or orig(chunks)
    )
    r.add(DOCS, on_duplicate="skip")
    assert seen == [f"d{i}#0" for i in range(10, 15)]
    before = [(h.chunk_id, h.score) for h in r.search("solar panels", k=5)]
    path = r.path
    r.close()
    again = IntraRetriever.load(path, show_progress=False)
    assert isinstance(again.store.fixed("pooled"), torch.Tensor) and len(again) == 15
    after = [(h.chunk_id, h.score) for h in again.search("solar panels", k=5)]
    assert [c for c, _ in after] == [c for c, _ in before]
    assert [s for _, s in after] == pytest.approx([s for _, s in before], rel=1e-5)


def test_bad_input(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5", max_length=16, chunk_overlap=4)
    r.add(DOCS)
    with pytest.raises(EmptyQueryError):
        r.search("   ")
    with pytest.raises(InvalidInputError):
        r.search("jazz", k=0)
    with pytest.warns(UserWarning, match="truncated"):
        hits = r.search("jazz " * 40, k=2)
    assert len(hits) == 2
    with pytest.raises(InvalidInputError):
        IntraRetriever(save("t5", models), pooled=0, path=tmp_path / "x")
    # a store built by another model
    with pytest.raises(ModelMismatchError):
        IntraRetriever(save("t5", models, seed=1), path=r.path, show_progress=False)
    # a retrieval head trained for another model
    other = make(models, tmp_path / "o", "t5", seed=1)
    other.save_head(tmp_path / "head.safetensors")
    with pytest.raises(ModelMismatchError):
        r.load_head(tmp_path / "head.safetensors")
    # same model, another store: usable, with a warning
    twin = make(models, tmp_path / "twin", "t5", max_length=16, chunk_overlap=4)
    twin.save_head(tmp_path / "twin.safetensors")
    with pytest.warns(UserWarning, match="another store"):
        r.load_head(tmp_path / "twin.safetensors")
    # same model, a store with longer chunks: another recipe, named as such
    longer = make(models, tmp_path / "long", "t5", max_length=24, chunk_overlap=4)
    longer.save_head(tmp_path / "long.safetensors")
    with pytest.raises(ModelMismatchError, match=r"store recipe.*max_length"):
        r.load_head(tmp_path / "long.safetensors")


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedArchitectureError):
        IntraRetriever(str(tmp_path / "bert"), path=tmp_path / "idx")


@pytest.mark.parametrize(
    "arch", ["t5", "bart", "t5gemma", "t5gemma2", "t5gemma2-gemma3", "bert2bert"]
)
def test_answer_from_store_equals_reencoding(models: Path, tmp_path: Path, arch: str) -> None:
    r = make(models, tmp_path, arch)
    r.add(DOCS)
    ans = r.answer("river ecology and jazz", k=3, max_new_tokens=4, return_logits=True)
    assert len(ans.context) == 3
    texts = [h.text for h in ans.context]
    ids, logits = generate_from_text(
        r, "river ecology and jazz", texts, max_new_tokens=4, return_logits=True
    )
    assert ans.token_ids == ids
    torch.testing.assert_close(ans.logits, logits, rtol=1e-4, atol=1e-4)


def test_answer_half_precision_store_close(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "bert2bert", store_dtype="float16")
    r.add(DOCS)
    ans = r.answer("river ecology", k=2, max_new_tokens=3, return_logits=True)
    _, logits = generate_from_text(
        r, "river ecology", [h.text for h in ans.context], max_new_tokens=3, return_logits=True
    )
    assert (ans.logits[0] - logits[0]).abs().max() < 5e-2


def test_select_context_follows_paper() -> None:
    assert select_context([5, 6, 7, 8, 9], [1, 5], 5) == [5, 6, 7, 8, 1]
    assert select_context([5, 6, 7, 8, 9], [6, 1], 5) == [5, 6, 7, 8, 9]
    assert select_context([5, 6], [], 5) == [5, 6]


def _train_data() -> tuple[list[str], list[list[str]]]:
    qs = [f"about {t}" for t in TOPICS] * 2
    pos = [[d["id"] for d in DOCS if d["metadata"]["topic"] == t] for t in TOPICS] * 2
    return qs, pos


def test_fit_lowers_loss_and_persists(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5")
    r.add(DOCS)
    qs, pos = _train_data()
    out = r.fit(qs, pos, epochs=6, batch_size=5, lr=3e-2)
    losses = out.losses
    assert out.steps == 12 and r.trained
    assert sum(losses[-2:]) < sum(losses[:2])
    alpha = r.head.alpha.detach().clone()
    path = r.path
    r.close()
    again = IntraRetriever.load(path, show_progress=False)
    assert again.trained
    torch.testing.assert_close(again.head.alpha, alpha)
    again.reset_head()
    assert not again.trained


def test_fit_checkpoint_resume_matches_uninterrupted(models: Path, tmp_path: Path) -> None:
    qs, pos = _train_data()
    full = make(models, tmp_path / "a", "t5")
    full.add(DOCS)
    full.fit(qs, pos, epochs=2, batch_size=5, checkpoint_dir=tmp_path / "ck-a")
    part = make(models, tmp_path / "b", "t5")
    part.add(DOCS)
    first = part.fit(
        qs,
        pos,
        epochs=2,
        batch_size=5,
        checkpoint_dir=tmp_path / "ck-b",
        checkpoint_every=1,
        max_steps=2,
    )
    assert first.steps == 2 and not part.trained
    fresh = make(models, tmp_path / "b", "t5")  # a new process reopening the store
    second = fresh.fit(qs, pos, epochs=2, batch_size=5, checkpoint_dir=tmp_path / "ck-b")
    assert second.steps == 4 and len(second.losses) == 4 and fresh.trained
    torch.testing.assert_close(fresh.head.tokens, full.head.tokens, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh.head.alpha, full.head.alpha, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointMismatchError):
        fresh.fit(qs[:5], pos[:5], epochs=2, batch_size=5, checkpoint_dir=tmp_path / "ck-b")
    with fresh.using(c0_score="standardised"), pytest.raises(CheckpointMismatchError):
        fresh.fit(qs, pos, epochs=2, batch_size=5, checkpoint_dir=tmp_path / "ck-b")


@pytest.mark.parametrize("arch", ["t5", "t5gemma2-gemma3"])
def test_query_lora_trains_persists_and_leaves_generation_alone(
    models: Path, tmp_path: Path, arch: str
) -> None:
    r = make(models, tmp_path, arch, query_positions="query+retrieval")
    r.add(DOCS)
    before = r.answer("river ecology", k=2, max_new_tokens=3, return_logits=True)
    qs, pos = _train_data()
    full = make(models, tmp_path / "ck", arch, query_positions="query+retrieval")
    full.add(DOCS)
    out = r.fit(qs, pos, epochs=2, batch_size=5, lr=3e-2, lora_rank=2)
    assert r.trained and r.head.lora_rank == 2 and out.steps == 4
    assert float(r.head.lora_b.abs().sum()) > 0  # the query projections were updated
    hits = [(h.chunk_id, h.score) for h in r.search("river ecology", k=5)]
    # resume from a checkpoint taken after half the steps ends where an uninterrupted run does
    full.fit(qs, pos, epochs=2, batch_size=5, lr=3e-2, lora_rank=2, max_steps=2,
             checkpoint_dir=tmp_path / "ck-lora")  # fmt: skip
    full.fit(qs, pos, epochs=2, batch_size=5, lr=3e-2, lora_rank=2,
             checkpoint_dir=tmp_path / "ck-lora")  # fmt: skip
    torch.testing.assert_close(full.head.lora_b, r.head.lora_b, rtol=1e-4, atol=1e-6)
    # generation reads the untouched backbone: the same chunks give the same tokens
    after = generate_from_text(r, "river ecology", [h.text for h in before.context],
                               max_new_tokens=3)  # fmt: skip
    assert after[0] == before.token_ids
    path = r.path
    r.close()
    again = IntraRetriever.load(path, show_progress=False)
    assert again.head.lora_rank == 2
    assert [(h.chunk_id, h.score) for h in again.search("river ecology", k=5)] == hits
    with pytest.raises(InvalidInputError):
        again.fit(qs, pos, lora_rank=-1)


def test_fit_bad_input(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5")
    r.add(DOCS)
    with pytest.raises(InvalidInputError):
        r.fit(["q"], [["d1"], ["d2"]])
    with pytest.raises(InvalidInputError):
        r.fit(["q"], [["nope"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = r.fit({"1": "about jazz"}, {"1": {"d4": 1, "d9": 0}}, epochs=1)
    assert out.num_examples == 1


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores_rank_like_float32(models: Path, tmp_path: Path, dtype: str) -> None:
    full = make(models, tmp_path / "f32", "t5gemma2")
    half = make(models, tmp_path / dtype, "t5gemma2", store_dtype=dtype, pooled_dtype=dtype)
    full.add(DOCS)
    half.add(DOCS)
    assert half.store.fixed("pooled").dtype == getattr(torch, dtype)
    assert half.store.varlen("states", [0])[0].dtype == getattr(torch, dtype)
    a = [h.chunk_id for h in full.search("solar panels", k=3)]
    b = [h.chunk_id for h in half.search("solar panels", k=3)]
    assert len(set(a) & set(b)) >= 2


def test_cpu_default_keeps_pooled_vectors_float32(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5", store_dtype="float16")
    r.add(DOCS[:3])
    assert r.store.fixed("pooled").dtype == torch.float32  # scan speed on CPU (see docs)
    assert r.store.varlen("states", [0])[0].dtype == torch.float16


def test_bert2bert_cross_init_copies_self_attention(minilm_path: str) -> None:
    from intrinsic_retrieval.models.architectures import build_bert2bert

    with pytest.raises(InvalidInputError, match="cross_init"):
        build_bert2bert(minilm_path, cross_init="zeros")
    warm = build_bert2bert(minilm_path, seed=0, cross_init="self")
    for layer in warm.decoder.bert.encoder.layer:
        for (name, w_self), w_cross in zip(
            layer.attention.state_dict().items(),
            layer.crossattention.state_dict().values(),
            strict=True,
        ):
            assert torch.equal(w_self, w_cross), name


# ---------------------------------------------------------------- int8 token states
def test_int8_store_round_trip_and_bytes(models: Path, tmp_path: Path) -> None:
    full = make(models, tmp_path / "f32", "t5")
    half = make(models, tmp_path / "f16", "t5", store_dtype="float16")
    r = make(models, tmp_path / "i8", "t5", store_dtype="int8")
    for x in (full, half, r):
        x.add(DOCS)
    specs = r.store.specs
    assert specs["states"].dtype == "int8" and specs["states_scale"].shape == (1,)
    assert "states_scale" not in half.store.specs
    assert r.store.fixed("pooled").dtype == torch.float32  # pooled vectors are not quantised
    torch.testing.assert_close(r.store.fixed("pooled"), full.store.fixed("pooled"))
    # per token: |error| <= absmax / 254 (half of one of 127 steps per side) + absmax * 2^-11
    # (the float16 scale's own rounding, times up to 127 steps)
    rows = list(range(len(DOCS)))
    for got, ref in zip(r.stored_states(rows), full.stored_states(rows), strict=True):
        bound = ref.abs().amax(-1, keepdim=True) * (1 / 254 + 2**-11) + 1e-6
        assert ((got - ref).abs() <= bound).all()
    # stored tensor bytes: d int8 codes + one fp16 scale per token vs 2d bytes (d = 32 here)
    b8, b16 = r.bytes_per_chunk(), half.bytes_per_chunk()
    assert b8["states"] == pytest.approx(b16["states"] * (r.dim + 2) / (2 * r.dim))
    assert b8["states"] < 0.55 * b16["states"] and b8["stored"] < b16["stored"]
    before = [(h.chunk_id, h.score) for h in r.search("solar panels", k=5)]
    states = r.stored_states([0, 3])
    path = r.path
    r.close()
    again = IntraRetriever.load(path, show_progress=False)
    assert again.store_dtype == "int8" and again.store.varlen("states", [0])[0].dtype == torch.int8
    for a, b in zip(again.stored_states([0, 3]), states, strict=True):
        assert torch.equal(a, b)
    assert [(h.chunk_id, h.score) for h in again.search("solar panels", k=5)] == before


def test_int8_store_searches_and_answers_like_float16(models: Path, tmp_path: Path) -> None:
    half = make(models, tmp_path / "f16", "t5", store_dtype="float16")
    r = make(models, tmp_path / "i8", "t5", store_dtype="int8")
    half.add(DOCS)
    r.add(DOCS)
    for q in ("solar panels", "jazz", "river ecology"):
        # the encoder stage reads only pooled vectors (same in both stores): the same ranking
        with r.using(mode="encoder"), half.using(mode="encoder"):
            enc8, enc16 = r.search(q, k=15), half.search(q, k=15)
        assert [h.chunk_id for h in enc8] == [h.chunk_id for h in enc16]
        assert [h.score for h in enc8] == pytest.approx([h.score for h in enc16], rel=1e-6)
        # full INTRA reads C0's dequantised states: scores move by ~1e-3 on this model (scores
        # ~2), far below the gaps between its top-5 scores, so the ranking must not change
        a, b = r.search(q, k=5), half.search(q, k=5)
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=5e-3)
    # generation from int8 states: each state element is off by <= 0.4% of its token's absmax,
    # so logits should move by well under 1% of their magnitude (measured: 0.14%, vs 0.005%
    # for fp16); greedy choices here have margins >= 0.06, 8x the measured logit difference
    q = "river ecology and jazz"
    a8 = r.answer(q, k=3, max_new_tokens=4, return_logits=True)
    a16 = half.answer(q, k=3, max_new_tokens=4, return_logits=True)
    assert [h.chunk_id for h in a8.context] == [h.chunk_id for h in a16.context]
    assert (a8.logits - a16.logits).abs().max() <= 0.01 * a16.logits.abs().max()
    assert a8.token_ids == a16.token_ids and a8.text == a16.text


def test_int8_store_dtype_is_part_of_the_recipe(models: Path, tmp_path: Path) -> None:
    r8 = make(models, tmp_path / "i8", "t5", store_dtype="int8")
    r8.add(DOCS[:3])
    r16 = make(models, tmp_path / "f16", "t5", store_dtype="float16")
    r16.add(DOCS[:3])
    with pytest.raises(ModelMismatchError, match="model and recipe"):
        make(models, tmp_path / "i8", "t5", store_dtype="float16")
    with pytest.raises(ModelMismatchError):
        make(models, tmp_path / "f16", "t5", store_dtype="int8")
    with pytest.raises(InvalidInputError, match="pooled_dtype"):
        make(models, tmp_path / "p8", "t5", store_dtype="int8", pooled_dtype="int8")
    with pytest.raises(InvalidInputError, match="store_dtype"):
        make(models, tmp_path / "i4", "t5", store_dtype="int4")


def test_int8_store_add_delete_and_fit(models: Path, tmp_path: Path) -> None:
    r = make(models, tmp_path, "t5", store_dtype="int8")
    r.add(DOCS[:10])
    r.add(DOCS, on_duplicate="skip")
    assert len(r) == 15
    lengths = r.store.varlen_lengths("states")
    assert torch.equal(lengths, r.store.varlen_lengths("states_scale"))
    r.delete(["d4", "d9"])
    ids = [h.chunk_id for h in r.search("jazz history", k=15)]
    assert len(ids) == 13 and "d4#0" not in ids and "d9#0" not in ids
    ans = r.answer("jazz history", k=3, max_new_tokens=2)
    assert len(ans.context) == 3 and len(ans.token_ids) == 2
    qs, pos = _train_data()
    pos = [[d for d in p if d not in ("d4", "d9")] for p in pos]
    out = r.fit(qs, pos, epochs=1, batch_size=5)
    assert out.steps == 2 and r.trained


def test_training_candidates_mix_hard_and_uniform_negatives() -> None:
    from intrinsic_retrieval.retrievers.intra.train import _candidates

    live = torch.ones(100, dtype=torch.bool)
    live[90:] = False  # deleted rows are never drawn
    top = torch.tensor([5, 6, 7])
    cand = _candidates(live, top, [95, 6, 50], n=20, seed=0)
    rows = cand.tolist()
    assert len(rows) == len(set(rows))
    assert rows[:3] == [5, 6, 7] and {95, 50} <= set(rows)
    assert len([r for r in rows if r not in (5, 6, 7, 95, 50)]) >= 16
    assert all(r < 90 or r == 95 for r in rows)
    assert (
        _candidates(live, top, [], n=20, seed=0).tolist()
        == _candidates(live, top, [], n=20, seed=0).tolist()
    )
    assert _candidates(live, top, [], n=20, seed=1).tolist() != rows[:20]
