"""Model and tokenizer fingerprints."""

from __future__ import annotations

import pytest
import torch
from support.models import save, tiny_bert
from support.tokenizer import VOCAB_SIZE, tiny_tokenizer

from intrinsic_retrieval.models import (
    combine_fingerprints,
    load_model,
    model_fingerprint,
    tokenizer_fingerprint,
)
from intrinsic_retrieval.models import fingerprint as fp_mod


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save(tiny_bert(), tmp_path_factory.mktemp("fp"), "bert")


def test_same_checkpoint_same_fingerprint_across_loads(saved):
    a, _ = load_model(saved, kind="encoder", device="cpu")
    b, _ = load_model(saved, kind="encoder", device="cpu")
    assert a is not b
    fa = model_fingerprint(a)
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert fa == model_fingerprint(b)
    # a freshly built model with the same weights: save/load metadata does not count
    assert fa == model_fingerprint(tiny_bert())


def test_dtype_does_not_change_fingerprint(saved):
    f32, _ = load_model(saved, kind="encoder", device="cpu", dtype="fp32")
    bf16, _ = load_model(saved, kind="encoder", device="cpu", dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert model_fingerprint(f32) == model_fingerprint(bf16)


def test_changed_weight_changes_fingerprint_and_invalidates_cache():
    model = tiny_bert()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[3, 0] += 0.5
    after = model_fingerprint(model)
    assert after != before
    assert model_fingerprint(tiny_bert(seed=1)) != before


def test_config_change_changes_fingerprint():
    a = tiny_bert()
    b = tiny_bert(layer_norm_eps=1e-5)  # same seed: identical weights, different computation
    assert fp_mod.weights_fingerprint(a) == fp_mod.weights_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_fingerprint_is_cached(monkeypatch):
    model = tiny_bert()
    first = model_fingerprint(model)
    calls = []
    monkeypatch.setattr(fp_mod, "weights_fingerprint", lambda m: calls.append(1) or "x")
    assert model_fingerprint(model) == first and not calls
    assert model_fingerprint(model, refresh=True) != first and calls


def test_tokenizer_fingerprint():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    fa = tokenizer_fingerprint(a)
    assert fa == tokenizer_fingerprint(b)
    a(["hello world"] * 2, truncation=True, max_length=3, padding="max_length")
    assert tokenizer_fingerprint(a) == fa  # call-time truncation/padding state is ignored
    other = tiny_tokenizer(VOCAB_SIZE - 1)  # one merge fewer: another vocabulary
    assert tokenizer_fingerprint(other) != fa


def test_combine_fingerprints():
    assert combine_fingerprints("a", "b") == combine_fingerprints("a", "b")
    assert combine_fingerprints("a", "b") != combine_fingerprints("b", "a")
    assert combine_fingerprints("ab", "c") != combine_fingerprints("a", "bc")
