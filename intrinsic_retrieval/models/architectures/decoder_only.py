"""Decoder-only architectures, layer by layer, looked up by ``config.model_type``.

In-context retrieval needs to run the model's layers with *its own* attention (block-sparse
prefill, streaming attention over stored blocks), so an architecture exposes the pieces around
attention — embedding, pre-attention norm, q/k/v projections with q/k norms and RoPE, and the
post-attention part of a layer (output projection, residuals, MLP) — while reusing the model's
own modules so numerics match the Hugging Face forward pass exactly.

Supported: Llama (incl. SmolLM2, Mistral-style), Qwen2 (q/k/v bias), Qwen3 (q_norm/k_norm),
Gemma3 text (scaled embeddings, q/k norms, sandwich norms, per-layer-type RoPE, sliding
windows, `query_pre_attn_scalar`, logit soft-capping).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import UnsupportedArchitectureError


class DecoderOnlyArch:
    """Llama-family decoder layer: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, model: nn.Module) -> None:
        body = getattr(model, "model", None)
        if body is None or not hasattr(body, "layers") or not hasattr(body, "embed_tokens"):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} does not expose model.layers/embed_tokens"
            )
        self.model = model
        self.body = body
        self.config = model.config
        self.layers = list(body.layers)
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = int(attn.head_dim)
        self.num_heads = int(attn.q_proj.out_features // self.head_dim)
        self.num_kv_heads = int(attn.k_proj.out_features // self.head_dim)
        self.groups = self.num_heads // self.num_kv_heads
        self.hidden_size = int(self.config.hidden_size)

    def decoder_layers(self) -> nn.ModuleList:
        """The layer stack (what training freezes or unfreezes by depth)."""
        return self.body.layers

    # ------------------------------------------------------------------ per-layer facts
    def scaling(self, layer: int) -> float:
        return float(self.layers[layer].self_attn.scaling)

    def softcap(self, layer: int) -> float | None:
        cap = getattr(self.layers[layer].self_attn, "attn_logit_softcapping", None)
        return None if cap is None else float(cap)

    def sliding_window(self, layer: int) -> int | None:
        """Window in *positions* (block-local positions and the query offset), or None."""
        w = getattr(self.layers[layer].self_attn, "sliding_window", None)
        return None if w is None else int(w)

    # ------------------------------------------------------------------ pieces
    @property
    def device(self) -> torch.device:
        return self.body.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.body.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(input_ids)

    def rope(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[Any, Any]:
        return self.body.rotary_emb(x, positions)

    def qkv(
        self, layer: int, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the residual stream ``(B, T, d)``: q ``(B, H, T, D)``, k and v ``(B, Hkv, T, D)``,
        normed and rotated exactly as the model does."""
        blk = self.layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(h)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = self.rope(layer, x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual stream after the layer, given attention output ``(B, T, H*D)``."""
        blk = self.layers[layer]
        h = h + blk.self_attn.o_proj(attn_out)
        return h + blk.mlp(blk.post_attention_layernorm(h))

    @property
    def final_norm(self) -> nn.Module:
        """The norm before the LM head (a module: ``arch.final_norm(h)`` applies it)."""
        return self.body.norm

    def logits(self, h_normed: torch.Tensor) -> torch.Tensor:
        out = self.model.get_output_embeddings()(h_normed)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out


class Gemma3Arch(DecoderOnlyArch):
    """Gemma3: sandwich norms around attention and MLP, RoPE chosen by layer type."""

    def rope(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> tuple[Any, Any]:
        return self.body.rotary_emb(x, positions, self.config.layer_types[layer])

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        blk = self.layers[layer]
        h = h + blk.post_attention_layernorm(blk.self_attn.o_proj(attn_out))
        return h + blk.post_feedforward_layernorm(blk.mlp(blk.pre_feedforward_layernorm(h)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


ARCHITECTURES: dict[str, type[DecoderOnlyArch]] = {
    "llama": DecoderOnlyArch,
    "mistral": DecoderOnlyArch,
    "qwen2": DecoderOnlyArch,
    "qwen3": DecoderOnlyArch,
    "gemma3_text": Gemma3Arch,
}


def decoder_only_for(model: nn.Module) -> DecoderOnlyArch:
    """The architecture of a causal LM, or `UnsupportedArchitectureError` naming the supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = ARCHITECTURES.get(str(model_type))
    if cls is None:
        raise UnsupportedArchitectureError(
            f"no decoder-only architecture for model_type {model_type!r}; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    if model.get_output_embeddings() is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no LM head")
    return cls(model)
