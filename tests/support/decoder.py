"""Tiny random decoder-only LMs (Llama, Qwen2, Qwen3, Gemma 3) for in-context retrieval."""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import tiny_tokenizer

#: vocabulary of the models the numerics tests feed token ids directly (no text)
VOCAB = 97
ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]


def causal_lm(arch: str, vocab_size: int = VOCAB, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny random causal LM of `arch` (3 layers, 4 query / 2 KV heads, eager attention);
    Gemma 3 with sliding and full layers and random (non-zero) norm scales."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    common.update(extra)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            head_dim=8,
            sliding_window=10,
            query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **common,
        )
        model = Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # random (non-zero) norm weights so the sandwich norms matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    else:
        raise ValueError(arch)
    return model.eval()


def random_blocks(n: int = 4, seed: int = 1) -> list[list[int]]:
    """`n` documents of 3-11 random token ids below `VOCAB`."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            0, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def save_causal_lm(root: Path, arch: str = "llama", seed: int = 0) -> str:
    """A tiny `arch` LM over the tiny tokenizer's vocabulary (tied embeddings, 512 positions)
    saved with that tokenizer in ``root``; returns the directory."""
    tok = tiny_tokenizer()
    model = causal_lm(arch, len(tok), seed, max_position_embeddings=512, tie_word_embeddings=True)
    path = root / f"{arch}-{seed}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
