"""Tiny random backbones, a handful of documents and fit settings for the generative-retrieval
(docid) tests; the models read the tiny tokenizer's vocabulary (no downloads)."""

from __future__ import annotations

import torch

from .tokenizer import BOS, EOS, PAD, tiny_tokenizer

DOCS = [
    {"id": "d0", "text": "the quick brown fox jumps", "metadata": {"g": 0, "y": 2000}},
    {"id": "d1", "text": "protein folding in cells", "metadata": {"g": 1, "y": 2001}},
    {"id": "d2", "text": "cancer gene mutation", "metadata": {"g": 0, "y": 2002}},
    {"id": "d3", "text": "lazy dog sleeps all day", "metadata": {"g": 1, "y": 2003}},
    {"id": "d4", "text": "alpha beta gamma delta", "metadata": {"g": 0, "y": 2004}},
    {"id": "d5", "text": "volcano magma and ash", "metadata": {"g": 1, "y": 2005}},
]


def tiny_model(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(
            vocab_size=vocab, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
            dropout_rate=0.0, decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS,
        )  # fmt: skip
        return T5ForConditionalGeneration(cfg)
    if kind == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        cfg = BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
            bos_token_id=BOS, decoder_start_token_id=EOS, forced_eos_token_id=None,
        )  # fmt: skip
        return BartForConditionalGeneration(cfg)
    if kind == "bert2bert":
        from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

        enc = BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )  # fmt: skip
        dec = BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, is_decoder=True,
            add_cross_attention=True,
        )  # fmt: skip
        cfg = EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.pad_token_id = BOS, PAD
        return EncoderDecoderModel(config=cfg)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    raise ValueError(kind)


def tiny_retriever(kind: str = "t5", seed: int = 0, **kwargs):
    from intrinsic_retrieval.retrievers.generative import GenerativeDocidRetriever

    tok = tiny_tokenizer()
    kwargs.setdefault("show_progress", False)
    return GenerativeDocidRetriever(tiny_model(kind, len(tok), seed), tok, **kwargs)


#: fit() settings that make a tiny model memorise DOCS in about a second
MEMORISE = {
    "inputs": ("firstp",),
    "epochs": 60,
    "batch_size": 6,
    "lr": 1e-2,
    "warmup_steps": 1,
    "heldout_fraction": 0.0,
    "show_progress": False,
}
