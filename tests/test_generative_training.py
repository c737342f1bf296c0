"""Indexing = training: examples, checkpoints + resume, early stopping, freezing options."""

from __future__ import annotations

import random

import pytest
import torch
from support.generative import DOCS, MEMORISE, tiny_retriever

from intrinsic_retrieval.chunking import word_spans
from intrinsic_retrieval.errors import CheckpointMismatchError, InvalidInputError
from intrinsic_retrieval.retrievers.generative.examples import (
    Example,
    daq,
    first_p,
    indexing_examples,
    mix,
    split_heldout,
    synthetic_examples,
)
from intrinsic_retrieval.training.queries import ExtractiveQueryGenerator

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = " ".join(f"w{i}" for i in range(200))


# ---------------------------------------------------------------------- examples
def test_firstp_and_daq_windows():
    spans = word_spans(LONG)
    assert first_p(LONG, spans, 64).split() == [f"w{i}" for i in range(64)]
    wins = daq(LONG, spans, random.Random(0), 64, 10)
    assert len(wins) == 10 and len(set(wins)) == 10
    assert all(len(w.split()) == 64 and w in LONG for w in wins)
    assert daq(LONG, spans, random.Random(0), 64, 10) == wins  # seeded
    assert daq("short text", word_spans("short text"), random.Random(0)) == ["short text"]
    ex = indexing_examples([(0, LONG), (1, "tiny")], word_spans, ["firstp", "daq"], daq_count=3)
    assert sorted((e.code, e.kind) for e in ex).count((0, "daq")) == 3
    assert [e.kind for e in ex if e.code == 1] == ["firstp", "daq"]


def test_extractive_query_generator_is_deterministic_and_extractive():
    texts = [
        "Insulin regulates glucose. Beta cells secrete insulin after meals. Diabetes follows.",
        "Volcanoes eject magma and ash. Sulfur dioxide cools the climate for years.",
    ]
    gen = ExtractiveQueryGenerator(seed=1)
    q1, q2 = gen.generate(texts, 3), gen.generate(texts, 3)
    assert q1 == q2 and [len(q) for q in q1] == [3, 3]
    assert q1[0][0] == "Insulin regulates glucose."
    vocab = set(texts[1].lower().replace(".", " ").split())
    assert set(q1[1][1].split()) <= vocab  # keyword query uses the document's own words
    ex = synthetic_examples([(5, texts[0])], gen, 2)
    assert [e.code for e in ex] == [5, 5] and {e.kind for e in ex} == {"synthetic"}


def test_mix_sets_the_indexing_retrieval_ratio_and_heldout_split():
    idx = [Example(f"d{i}", i, "firstp") for i in range(32)]
    ret = [Example(f"q{i}", i, "labeled") for i in range(4)]
    assert sum(e.kind == "labeled" for e in mix(idx, ret, 4.0)) == 8  # repeated
    assert sum(e.kind == "labeled" for e in mix(idx, ret, 16.0)) == 2  # subsampled
    assert len(mix(idx, ret, None)) == 36
    with pytest.raises(InvalidInputError):
        mix(idx, ret, 0)
    train, held = split_heldout([*idx, *ret], 0.5, seed=0)
    assert len(held) == 2 and all(e.kind == "labeled" for e in held)
    assert not set(map(id, held)) & set(map(id, train))


def test_labeled_and_synthetic_inputs_reach_training():
    r = tiny_retriever(docids="atomic")
    r.add(DOCS)
    rep = r.fit(
        {"which gene mutates in cancer": "d2", "sleepy dog": ["d3"], "unknown": "nope"},
        inputs=("firstp", "labeled", "synthetic"),
        synthetic_per_doc=2,
        max_steps=2,
        heldout_fraction=0.0,
        show_progress=False,
    )
    assert rep.example_kinds == {"firstp": 6, "labeled": 2, "synthetic": 12}
    assert rep.steps == 2 and rep.examples_per_s > 0


# ---------------------------------------------------------------------- checkpoints
def _weights(r) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in r.model.state_dict().items()}
    if r.head is not None:
        out["head"] = r.head.weight.detach().clone()
    return out


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    cfg = {**MEMORISE, "inputs": ("firstp", "daq"), "batch_size": 4, "epochs": 100}
    straight = tiny_retriever(docids="naive")
    straight.add(DOCS)
    straight.fit(max_steps=6, **cfg)

    ckpt = tmp_path / "ckpt"
    first = tiny_retriever(docids="naive")
    first.add(DOCS)
    rep1 = first.fit(max_steps=3, checkpoint_dir=str(ckpt), checkpoint_every=2, **cfg)
    assert rep1.steps == 3 and rep1.stopped == "max_steps"
    files = {p.name for p in (ckpt / "step-00000003").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert not [p for p in ckpt.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pth"}]

    resumed = tiny_retriever(docids="naive")  # a fresh process: same base weights
    resumed.add(DOCS)
    rep2 = resumed.fit(max_steps=6, checkpoint_dir=str(ckpt), **cfg)
    assert rep2.resumed_from_step == 3 and rep2.steps == 6
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_with_other_run_settings_is_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    r = tiny_retriever(docids="atomic")
    r.add(DOCS)
    r.fit(**{**MEMORISE, "max_steps": 1, "checkpoint_dir": ckpt})
    with pytest.raises(CheckpointMismatchError, match="run"):
        r.fit(**{**MEMORISE, "max_steps": 2, "checkpoint_dir": ckpt, "lr": 0.5})
    r.fit(**{**MEMORISE, "max_steps": 2, "checkpoint_dir": ckpt, "lr": 0.5, "resume": False})


def test_early_stopping_on_heldout_queries_restores_best():
    r = tiny_retriever(docids="atomic")
    r.add(DOCS)
    labeled = {d["text"]: d["id"] for d in DOCS}  # held-out queries = exact document texts
    rep = r.fit(
        labeled,
        **{
            **MEMORISE,
            "inputs": ("firstp", "labeled"),
            "epochs": 500,
            "heldout_fraction": 0.5,
            "eval_every": 2,
            "patience": 2,
        },
    )
    assert rep.stopped == "early_stop"
    assert rep.num_heldout == 3 and rep.steps < 500
    assert rep.best_recall_at_1 == max(h["heldout_recall@1"] for h in rep.history)


def test_time_limit_stops_training():
    r = tiny_retriever(docids="atomic")
    r.add(DOCS)
    rep = r.fit(**{**MEMORISE, "epochs": 10_000, "time_limit_s": 0.5})
    assert rep.stopped == "time_limit" and 0 < rep.steps < 10_000


# ---------------------------------------------------------------------- freezing
def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("kind", ["t5", "bert2bert"])
def test_decoder_only_training_keeps_the_encoder_frozen(kind):
    r = tiny_retriever(kind, docids="atomic")
    r.add(DOCS)
    before = _weights(r)
    rep = r.fit(**{**MEMORISE, "max_steps": 3, "train_mode": "decoder"})
    changed = _changed(before, _weights(r))
    assert changed and not {k for k in changed if k.startswith("encoder.")}
    assert any(k.startswith("decoder.") for k in changed)
    assert rep.trainable_params < rep.total_params


@pytest.mark.parametrize("kind", ["t5", "bert2bert", "llama"])
def test_decoder_late_trains_only_last_stage_mlps_and_cross_attention(kind):
    r = tiny_retriever(kind, docids="atomic")
    r.add(DOCS)
    before = _weights(r)
    rep = r.fit(**{**MEMORISE, "max_steps": 3, "train_mode": "decoder_late"})
    changed = _changed(before, _weights(r))
    assert changed
    markers = (
        "DenseReluDense",
        "EncDecAttention",
        "crossattention",
        "intermediate",
        "mlp",
        ".output.",
    )
    for k in changed:
        assert any(m in k for m in markers), k
        assert not any(x in k for x in ("block.0.", "encoder.layer.0.", "layers.0.")), k  # 2 layers
    full = tiny_retriever(kind, docids="atomic")
    full.add(DOCS)
    rep_full = full.fit(**{**MEMORISE, "max_steps": 1})
    assert rep.trainable_params < rep_full.trainable_params


@pytest.mark.parametrize("kind", ["t5", "bart", "bert2bert"])
def test_frozen_encoder_cache_gives_the_same_losses(kind):
    from intrinsic_retrieval.retrievers.generative.examples import Example

    r = tiny_retriever(kind, docids="naive")
    r.add(DOCS)
    bb = r.backbone
    batch = [Example(d["text"], i, "firstp") for i, d in enumerate(DOCS)]
    with torch.no_grad():
        plain = float(r._loss(batch))
        r._enc_cache = bb.encode([e.text for e in batch], r.max_length)
        cached = float(r._loss(batch))
        r._enc_cache = None
    assert cached == pytest.approx(plain, rel=1e-3)
    rep = r.fit(**{**MEMORISE, "max_steps": 2, "train_mode": "decoder", "cache_encoder": True})
    assert rep.steps == 2


def test_doc2query_generator_wraps_any_seq2seq_model():
    from support.generative import tiny_model
    from support.tokenizer import tiny_tokenizer

    from intrinsic_retrieval.retrievers.generative import Doc2QueryGenerator

    tok = tiny_tokenizer()
    gen = Doc2QueryGenerator(tiny_model("t5", len(tok)).eval(), tok, max_new_tokens=5, seed=0)
    out = gen.generate(["the quick brown fox", "cancer gene"], 2)
    assert len(out) == 2 and all(len(q) == 2 and all(isinstance(x, str) for x in q) for q in out)
    ex = synthetic_examples([(0, "the quick brown fox"), (1, "cancer gene")], gen, 2)
    assert {e.code for e in ex} <= {0, 1}
