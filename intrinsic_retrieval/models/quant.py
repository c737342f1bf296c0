"""Symmetric int8 storage of float vectors: one float16 scale per vector (row over the last dim).

Shared by the retrievers that can keep model states as int8 (InContext K/V, INTRA token states):
absmax over the last dim maps to 127, so each vector keeps its own range; an all-zero vector
gets a tiny positive scale and decodes back to zeros.
"""

from __future__ import annotations

import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8 over the last dim: (codes int8, scale float16)."""
    scale = x.float().abs().amax(-1).clamp(min=1e-8) / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scale``; `scale` holds one value per vector (`q`'s shape, last dim off)."""
    return q.float() * scale.float()[..., None]
