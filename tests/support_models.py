"""Tiny random models and a tiny tokenizer for the models/ tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"abcdefghijklmnopqrstuvwxyz",
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "##s",
    ".",
    ",",
]


def tiny_tokenizer(words: list[str] = WORDS):
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=64)


def tiny_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return BertModel(BertConfig(**cfg)).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(WORDS),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def save(model, root: Path, name: str) -> Path:
    path = root / name
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
