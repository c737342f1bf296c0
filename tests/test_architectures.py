"""`models.architectures`: one registry, keyed by model_type, that every retriever asks.

Equivalence: what `pre_head` applies to the last residual stream is exactly what each model
feeds its LM head; `decoder_layers` is the stack the model runs; builds are reproducible.
"""

from __future__ import annotations

import pytest
import torch
from support.decoder import causal_lm
from support.intra import ARCHS, EXTRA_ARCHS, build

from intrinsic_retrieval.errors import UnsupportedArchitectureError
from intrinsic_retrieval.models.architectures import (
    DECODER_ONLY,
    architecture_for,
    decoder_layers,
    decoder_start_id,
    encoder_decoder_for,
    pre_head,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _capture_head_and_norm(model, arch):
    """Run one forward pass; return (input of the final norm or the last layer's output,
    input of the LM head)."""
    box: dict[str, torch.Tensor] = {}
    norm = arch.final_norm
    hooks = [
        model.get_output_embeddings().register_forward_pre_hook(
            lambda _m, a: box.__setitem__("head", a[0])
        )
    ]
    if norm is not None:
        hooks.append(norm.register_forward_pre_hook(lambda _m, a: box.__setitem__("pre", a[0])))
    else:
        last = decoder_layers(model)[-1]
        hooks.append(
            last.register_forward_hook(
                lambda _m, _a, out: box.__setitem__(
                    "pre", out[0] if isinstance(out, tuple) else out
                )
            )
        )
    ids = torch.randint(5, 90, (2, 6))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            model(input_ids=ids, decoder_input_ids=ids[:, :4])
        else:
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    return box["pre"], box["head"]


@pytest.mark.parametrize("arch", [*ARCHS, *EXTRA_ARCHS])
def test_pre_head_is_what_the_encoder_decoder_feeds_its_lm_head(arch: str) -> None:
    model = build(arch).eval()
    ed = encoder_decoder_for(model)
    pre, head = _capture_head_and_norm(model, ed)
    torch.testing.assert_close(pre_head(model)(pre), head)
    assert decoder_layers(model) is ed.decoder_layers()
    assert len(ed.decoder_layers()) == len(ed.layers())  # one cross-attention per layer


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_pre_head_is_what_the_causal_lm_feeds_its_lm_head(arch: str) -> None:
    model = causal_lm(arch).eval()
    a = architecture_for(model)
    pre, head = _capture_head_and_norm(model, a)
    torch.testing.assert_close(pre_head(model)(pre), head)
    assert len(a.decoder_layers()) == model.config.num_hidden_layers


def test_lookup_is_by_model_type_and_names_what_is_supported() -> None:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    assert set(DECODER_ONLY) >= {"llama", "qwen2", "qwen3", "gemma3_text"}
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="T5ForConditionalGeneration"):
        encoder_decoder_for(bert)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        architecture_for(gpt2)


def test_attention_tap_only_where_asked() -> None:
    model = build("t5")
    impl = model.config._attn_implementation
    encoder_decoder_for(model)  # reading the layout changes nothing
    assert model.config._attn_implementation == impl
    encoder_decoder_for(model).tap_attention()
    assert model.config._attn_implementation == "intra"


def test_decoder_start_id_falls_back_in_one_order() -> None:
    class Cfg:
        decoder_start_token_id = None
        pad_token_id = 0

        class decoder:  # BERT2BERT keeps it on the decoder config
            decoder_start_token_id = None
            bos_token_id = 7

    class Tok:
        cls_token_id = 101
        bos_token_id = None

    assert decoder_start_id(Cfg, Tok) == 7
    Cfg.decoder.bos_token_id = None
    assert decoder_start_id(Cfg, Tok) == 101
    assert decoder_start_id(Cfg, None) == 0
    Cfg.decoder_start_token_id = 3
    assert decoder_start_id(Cfg, Tok) == 3


def test_bert2bert_build_is_reproducible(minilm_path: str) -> None:
    from intrinsic_retrieval.models import model_fingerprint
    from intrinsic_retrieval.models.architectures import build_bert2bert

    a, b = build_bert2bert(minilm_path, seed=0), build_bert2bert(minilm_path, seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(build_bert2bert(minilm_path, seed=1)) != model_fingerprint(a)
