"""Tiny random BERT / T5 / Llama backbones for the `intrinsic_retrieval.models` tests."""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import BOS, EOS, PAD, VOCAB_SIZE, tiny_tokenizer


def tiny_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    cfg.update(overrides)
    return BertModel(BertConfig(**cfg)).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(cfg).eval()


def save(model, root: Path, name: str) -> Path:
    """`model` and the tiny tokenizer in ``root / name`` (a loadable checkpoint directory)."""
    path = root / name
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
