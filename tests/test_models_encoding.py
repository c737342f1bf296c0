"""encode_texts, pooling and normalisation."""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_bert, tiny_llama, tiny_t5
from support.tokenizer import tiny_tokenizer

from intrinsic_retrieval.errors import InvalidInputError
from intrinsic_retrieval.models import (
    default_forward,
    encode_texts,
    l2_normalize,
    load_model,
    mean_pool,
    pool_segments,
    pool_segments_batch,
)

TEXTS = ["hello world", "the cat sat on the mat", "a", "the cats . hello , world the mat", "b c"]


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(), tiny_tokenizer()


def one_by_one(model, tok, text):
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state[0]


def test_input_order_padding_removed_and_equal_to_unbatched(bert):
    model, tok = bert
    states, ids = encode_texts(
        model, tok, TEXTS, batch_size=2, show_progress=False, return_ids=True
    )
    assert len(states) == len(TEXTS) == len(ids)
    for text, s, i in zip(TEXTS, states, ids, strict=True):
        expected_ids = tok(text)["input_ids"]
        assert i.tolist() == expected_ids
        assert s.shape == (len(expected_ids), 16)
        assert torch.allclose(s, one_by_one(model, tok, text), atol=1e-5)


def test_results_are_ordinary_tensors_usable_in_training(bert):
    model, tok = bert
    (s,) = encode_texts(model, tok, ["hello"], show_progress=False)
    assert not s.is_inference()
    w = torch.ones(16, requires_grad=True)
    (s @ w).sum().backward()
    assert w.grad is not None


def test_truncation_and_default_limit(bert):
    model, tok = bert
    long = " ".join(["a"] * 200)
    (s,) = encode_texts(model, tok, [long], max_length=10, show_progress=False)
    assert s.shape[0] == 10
    (s,) = encode_texts(model, tok, [long], show_progress=False)
    assert s.shape[0] == 64  # min(tokenizer limit, max_position_embeddings)


def test_custom_forward_and_device_none(bert):
    model, tok = bert
    calls = []

    def forward(m, input_ids, attention_mask):
        calls.append(tuple(input_ids.shape))
        return torch.ones(*input_ids.shape, 3)

    out = encode_texts(
        model, tok, TEXTS, batch_size=3, forward=forward, show_progress=False, device=None
    )
    assert len(calls) == 2 and calls[0][0] == 3
    assert [o.shape[1] for o in out] == [3] * len(TEXTS)
    # sorted by length: the first batch holds the longest texts, padded to the longest
    assert calls[0][1] == max(len(tok(t)["input_ids"]) for t in TEXTS)


def test_empty_and_bad_input(bert):
    model, tok = bert
    assert encode_texts(model, tok, [], show_progress=False) == []
    with pytest.raises(InvalidInputError):
        encode_texts(model, tok, "hello", show_progress=False)
    with pytest.raises(InvalidInputError):
        encode_texts(model, tok, ["ok", 3], show_progress=False)  # type: ignore[list-item]
    with pytest.raises(InvalidInputError):
        encode_texts(model, tok, [""], add_special_tokens=False, show_progress=False)


def test_encoder_decoder_uses_encoder_only():
    model, tok = tiny_t5(), tiny_tokenizer()
    states = encode_texts(model, tok, TEXTS[:3], show_progress=False)
    for text, s in zip(TEXTS[:3], states, strict=True):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            ref = model.get_encoder()(**enc).last_hidden_state[0]
        assert torch.allclose(s, ref, atol=1e-5)


def test_causal_lm_gives_hidden_states_not_logits():
    model, tok = tiny_llama(), tiny_tokenizer()
    states = encode_texts(model, tok, TEXTS, batch_size=2, show_progress=False)
    for text, s in zip(TEXTS, states, strict=True):
        assert s.shape == (len(tok(text)["input_ids"]), 16)
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            ref = model(**enc, output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(s, ref, atol=1e-4)  # right padding does not leak (causal mask)
    ids = tok(TEXTS[:1], return_tensors="pt")
    assert default_forward(model, ids["input_ids"], ids["attention_mask"]).shape[-1] == 16


def test_mean_pool():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    out = mean_pool(states, mask)
    assert torch.allclose(out[0], states[0, :2].mean(0))
    assert torch.allclose(out[1], states[1].mean(0))
    assert torch.equal(out[2], torch.zeros(4))
    assert mean_pool(states.half(), mask).dtype == torch.float32
    with pytest.raises(InvalidInputError):
        mean_pool(states, mask[:, :3])


def test_pool_segments_even_split():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    out = pool_segments(x, 4)  # segments [0,2) [2,5) [5,7) [7,10)
    assert out[:, 0].tolist() == [0.5, 3.0, 5.5, 8.0]
    assert torch.equal(pool_segments(x, 1), x.mean(0, keepdim=True))
    assert torch.equal(pool_segments(x, 10), x)


def test_pool_segments_shorter_than_p_repeats_tokens():
    x = torch.tensor([[1.0], [2.0], [3.0]])
    out = pool_segments(x, 5)  # token floor(i*3/5): 0 0 1 1 2
    assert out[:, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0]


def test_pool_segments_batch_matches_single():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randn(n, 6, generator=g).to(torch.bfloat16) for n in (1, 3, 8, 17, 8)]
    batch = pool_segments_batch(seqs, 4)
    assert batch.shape == (5, 4, 6) and batch.dtype == torch.float32
    for s, b in zip(seqs, batch, strict=True):
        assert torch.allclose(pool_segments(s, 4), b)
        # reference: explicit segment bounds
        L = s.shape[0]
        for i in range(4):
            lo = i * L // 4
            hi = max((i + 1) * L // 4, lo + 1)
            assert torch.allclose(b[i], s[lo:hi].float().mean(0), atol=1e-6)
    assert pool_segments_batch(seqs, 2, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(InvalidInputError):
        pool_segments_batch([torch.zeros(0, 6)], 4)
    with pytest.raises(InvalidInputError):
        pool_segments(seqs[0], 0)


def test_l2_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(x)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], torch.zeros(2))


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_recipe(minilm_path):
    """encode_texts + mean + L2 == the documented recipe (padded batch, mean over mask, norm)."""
    model, tok = load_model(minilm_path, kind="encoder", device="cpu")
    sentences = ["This is an example sentence", "Each sentence is converted"]
    states = encode_texts(model, tok, sentences, show_progress=False)
    ours = l2_normalize(torch.stack([s.float().mean(0) for s in states]))
    ours_pool = l2_normalize(
        torch.stack([mean_pool(s[None], torch.ones(1, len(s)))[0] for s in states])
    )
    enc = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        token_embeddings = model(**enc)[0]
    mask = enc["attention_mask"].unsqueeze(-1).expand(token_embeddings.size()).float()
    ref = torch.sum(token_embeddings * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
    ref = torch.nn.functional.normalize(ref, p=2, dim=1)
    assert ref.shape == (2, 384)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(ours_pool, ref, atol=1e-5)
    assert torch.allclose(
        mean_pool(token_embeddings, enc["attention_mask"]),
        torch.sum(token_embeddings * mask, 1) / mask.sum(1),
        atol=1e-6,
    )
