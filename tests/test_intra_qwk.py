"""Reverse-QWK equivalence: folded scores against the stored representation equal the
pre-softmax cross-attention logits each supported architecture computes in its own forward."""

from __future__ import annotations

import pytest
import torch
from support.intra import ARCHS, EXTRA_ARCHS, build

from intrinsic_retrieval.errors import UnsupportedArchitectureError
from intrinsic_retrieval.models.architectures import encoder_decoder_for
from intrinsic_retrieval.retrievers.intra.qwk import (
    Folded,
    fold_layer,
    folded_logits,
    key_rnorm,
    score_pooled,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x.repeat_interleave(n_rep, dim=1)


@pytest.mark.parametrize("arch", ARCHS + EXTRA_ARCHS)
def test_folded_scores_equal_model_cross_attention_logits(arch: str) -> None:
    model = build(arch).double()
    adapter = encoder_decoder_for(model).tap_attention()
    layers = adapter.layers()
    torch.manual_seed(1)
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        memory = adapter.encode(ids, mask)  # the one stored representation
        dec = adapter.decoder_embeddings()(torch.randint(1000, 2000, (2, 5)))
    S = memory.shape[1]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(i: int):
        layer = layers[i]

        def hook(module, query, key, value, attn_mask, kwargs):
            # what the model itself computes: its query and key states as handed to attention
            k = key[:, :, -S:] if layer.merged else key
            k = _repeat_kv(k, layer.n_heads // layer.n_kv_heads)
            logits = query @ k.transpose(2, 3) * kwargs.get("scaling", layer.scaling)
            if kwargs.get("softcap") is not None:
                logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
            seen[i] = (query.detach().clone(), logits.detach().clone())
            return None

        return hook

    for i, layer in enumerate(layers):
        layer.attn._intra_hook = capture(i)
    try:
        with torch.no_grad():
            adapter.forward(memory, mask, dec)
    finally:
        for layer in layers:
            layer.attn._intra_hook = None
    assert len(seen) == len(layers)
    rn = key_rnorm(memory, layers) if adapter.key_norm else None
    for i, layer in enumerate(layers):
        query, logits = seen[i]
        vectors, const = fold_layer(query, layer)
        assert vectors.shape[-1] == memory.shape[-1]  # scored in the stored space
        folded = folded_logits(vectors, const, memory, layer, None if rn is None else rn[:, :, i])
        valid = mask.bool()[:, None, None, :].expand_as(logits)
        torch.testing.assert_close(folded.double()[valid], logits[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "t5gemma2"])
def test_pooled_score_is_weighted_maxsim_of_logits(arch: str) -> None:
    """score_pooled == sum_lh alpha_lh sum_t max_j logit(q_lht, pooled_j), per chunk."""
    model = build(arch)
    layers = encoder_decoder_for(model).tap_attention().layers()
    L, H, m, d = len(layers), layers[0].n_heads, 3, layers[0].weight.shape[1]
    torch.manual_seed(0)
    f = Folded(torch.randn(L, H, m, d), torch.randn(L, H, m))
    pooled = torch.randn(5, 4, d)
    alpha = torch.rand(L, H)
    rn = key_rnorm(pooled, layers) if layers[0].key_norm_weight is not None else None
    got = score_pooled(f, alpha, pooled, layers, rn)
    for n in range(5):
        want = 0.0
        for li, layer in enumerate(layers):
            lg = folded_logits(
                f.vectors[li][None],
                f.const[li][None],
                pooled[n][None],
                layer,
                None if rn is None else rn[n][None, :, li],
            )[0]  # (H, m, p)
            want += (lg.amax(-1) * alpha[li][:, None]).sum()
        torch.testing.assert_close(got[n], want, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_names_supported_ones() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="T5ForConditionalGeneration"):
        encoder_decoder_for(model).tap_attention()


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_embeddings_match_token_ids(arch: str) -> None:
    """Retrieval tokens are appended in the space `decoder_embeddings` maps into; feeding those
    embeddings must equal feeding the ids (no double embedding scale, e.g. BART/T5Gemma2)."""
    from transformers.modeling_outputs import BaseModelOutput

    model = build(arch)
    adapter = encoder_decoder_for(model).tap_attention()
    ids = torch.randint(1000, 2000, (1, 6))
    mem = torch.randn(1, 5, adapter.memory_dim())
    with torch.no_grad():
        want = model(encoder_outputs=BaseModelOutput(last_hidden_state=mem), decoder_input_ids=ids)
        got = adapter.forward(
            mem, torch.ones(1, 5, dtype=torch.long), adapter.decoder_embeddings()(ids)
        )
    torch.testing.assert_close(got, want.logits)
