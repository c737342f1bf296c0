"""Tiny random encoder-decoders (one per INTRA architecture) and a tiny Gemma 3 to build a
T5Gemma2 from, saved with the tiny tokenizer (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import BOS, EOS, PAD, tiny_tokenizer

#: model vocabulary: the tiny tokenizer uses its first ids; T5Gemma2's image tokens are 30000-30002
VOCAB = 30522
ARCHS = ("t5", "bart", "t5gemma", "t5gemma2", "t5gemma2-gemma3", "bert2bert")
#: further model classes with the same layouts (equivalence-tested only)
EXTRA_ARCHS = ("mt5", "umt5", "mbart")


def gemma3(seed: int = 0) -> torch.nn.Module:
    """A tiny random Gemma 3 causal LM (sliding + full layers, GQA, random norm scales)."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    m = T.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return m.eval()


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    if arch == "t5gemma2-gemma3":
        from intrinsic_retrieval.models.t5gemma2 import build_t5gemma2

        m = build_t5gemma2(gemma3(seed), encoder="causal")
        with torch.no_grad():  # non-identity memory adapters, so Reverse-QWK must fold them
            for layer in m.get_decoder().layers:
                proj = layer.self_attn.memory_proj
                proj.weight.add_(torch.randn_like(proj.weight) * 0.3)
                proj.bias.normal_(0.0, 0.3)
        return m.eval()
    if arch == "t5":
        c = T.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=BOS,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        m = T.T5ForConditionalGeneration(c)
    elif arch == "bart":
        c = T.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            decoder_start_token_id=BOS,
            forced_eos_token_id=None,
        )
        m = T.BartForConditionalGeneration(c)
    elif arch == "t5gemma":
        mc = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=16,
            attn_logit_softcapping=50.0,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
        c = T.T5GemmaConfig(
            encoder=mc,
            decoder=mc,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            decoder_start_token_id=BOS,
        )
        m = T.T5GemmaForConditionalGeneration(c)
    elif arch == "t5gemma2":
        tc = dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=16,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
        from intrinsic_retrieval.models.t5gemma2 import TINY_VISION

        vc = dict(TINY_VISION)
        c = T.T5Gemma2Config(
            encoder=dict(
                text_config=tc,
                vision_config=vc,
                mm_tokens_per_image=4,
                boi_token_index=30000,
                eoi_token_index=30001,
                image_token_index=30002,
            ),
            decoder=tc,
            image_token_index=30002,
            eoi_token_index=30001,
        )
        m = T.T5Gemma2ForConditionalGeneration(c)
        # random init leaves the norm scales at 0 (i.e. 1 + w = 1); perturb them so the tests
        # exercise the key-norm scale that Reverse-QWK moves to the query side
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    elif arch in ("mt5", "umt5"):
        cls, cfg = (
            (T.MT5ForConditionalGeneration, T.MT5Config)
            if arch == "mt5"
            else (T.UMT5ForConditionalGeneration, T.UMT5Config)
        )
        m = cls(
            cfg(
                vocab_size=VOCAB,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=BOS,
                pad_token_id=PAD,
                eos_token_id=EOS,
            )
        )
    elif arch == "mbart":
        c = T.MBartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            pad_token_id=PAD,
            decoder_start_token_id=BOS,
        )
        m = T.MBartForConditionalGeneration(c)
    elif arch == "bert2bert":
        ec = T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        dc = T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
            add_cross_attention=True,
        )
        c = T.EncoderDecoderConfig.from_encoder_decoder_configs(ec, dc)
        c.decoder_start_token_id = BOS
        c.pad_token_id = PAD
        c.eos_token_id = EOS
        m = T.EncoderDecoderModel(config=c)
    else:
        raise ValueError(arch)
    return m.eval()


def save(arch: str, root: Path, seed: int = 0) -> str:
    """Save the tiny model with the tiny tokenizer; returns the directory (for the T5Gemma2
    built from Gemma 3, the `t5gemma2:<gemma 3 directory>` model spec)."""
    if arch == "t5gemma2-gemma3":
        return "t5gemma2:" + save_gemma3(root, seed)
    path = root / f"tiny-{arch}-{seed}"
    if not (path / "config.json").exists():
        build(arch, seed).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return str(path)


def save_gemma3(root: Path, seed: int = 0) -> str:
    path = root / f"tiny-gemma3-{seed}"
    if not (path / "config.json").exists():
        gemma3(seed).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return str(path)


def gemma3_adapter(root: Path, seed: int = 0) -> str:
    """Memory adapters fitted (label-free) for the tiny Gemma 3 of `save_gemma3`; a file path."""
    from intrinsic_retrieval.models import model_fingerprint
    from intrinsic_retrieval.models.t5gemma2 import (
        build_t5gemma2,
        fit_memory_adapters,
        save_memory_adapters,
    )

    path = root / f"tiny-gemma3-{seed}-adapter.safetensors"
    if not path.exists():
        causal = gemma3(seed)
        model = build_t5gemma2(causal, encoder="causal")
        texts = [f"document {i} about topic {i % 5} and its {i * 7} findings" for i in range(40)]
        stats = fit_memory_adapters(model, tiny_tokenizer(), texts, show_progress=False)
        save_memory_adapters(
            model, path, {"base": model_fingerprint(causal), "encoder": "causal", **stats}
        )
    return str(path)
