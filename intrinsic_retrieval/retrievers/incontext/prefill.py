"""Block-sparse prefill: every document block is read on its own, positions restarting at 0.

Because a block attends only to itself, its keys/values depend on nothing but its own tokens, so
they are computed once at indexing time and stored. Two equivalent implementations:
`prefill_blocks` (padded batches, the fast one) and `prefill_packed` (one concatenated sequence
with a block-diagonal causal mask, i.e. block-sparse attention over the corpus) — the tests prove
they agree with each other and with the model's own forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...models.architectures import DecoderOnlyArch

#: per-document keys and values, ``(T, L, Hkv, D)`` each
BlockKV = tuple[torch.Tensor, torch.Tensor]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """GQA attention ``(B, H, T, D)`` x ``(B, Hkv, S, D)`` with a bool mask ``(B, 1, T, S)``
    (True = visible). Uses SDPA unless logits need soft-capping."""
    groups = q.shape[1] // k.shape[1]
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
        )
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling
    logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def _run_layers(
    arch: DecoderOnlyArch,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    num_layers: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys/values ``(B, Hkv, T, D)`` of layers ``0..num_layers-1`` under `mask`
    (``(B, 1, T, T)`` bool, before sliding windows)."""
    h = arch.embed(input_ids)
    ks, vs = [], []
    for layer in range(num_layers):
        q, k, v = arch.qkv(layer, h, positions)
        ks.append(k)
        vs.append(v)
        if layer == num_layers - 1:
            break  # later layers' states are never read
        m = mask
        w = arch.sliding_window(layer)
        if w is not None:
            dist = positions[:, :, None] - positions[:, None, :]
            m = m & (dist < w)[:, None]
        out = masked_attention(q, k, v, m, arch.scaling(layer), arch.softcap(layer))
        h = arch.finish(layer, h, out.transpose(1, 2).reshape(*h.shape[:-1], -1))
    return ks, vs


def prefill_blocks(
    arch: DecoderOnlyArch,
    blocks: Sequence[Sequence[int]],
    num_layers: int,
    *,
    batch_size: int = 16,
) -> list[BlockKV]:
    """Independent prefill of each block (batched with right padding, sorted by length)."""
    out: list[BlockKV | None] = [None] * len(blocks)
    order = sorted(range(len(blocks)), key=lambda i: len(blocks[i]), reverse=True)
    dev = arch.device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(blocks[idx[0]])
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        valid = torch.zeros((len(idx), width), dtype=torch.bool)
        for j, i in enumerate(idx):
            ids[j, : len(blocks[i])] = torch.as_tensor(list(blocks[i]), dtype=torch.long)
            valid[j, : len(blocks[i])] = True
        ids, valid = ids.to(dev), valid.to(dev)
        pos = torch.arange(width, device=dev).expand(len(idx), width)
        causal = torch.ones((width, width), dtype=torch.bool, device=dev).tril()
        # pad keys are hidden; pad query rows still see their own prefix (no empty rows)
        mask = (causal[None] & valid[:, None, :])[:, None]
        ks, vs = _run_layers(arch, ids, pos, mask, num_layers)
        k_all = torch.stack(ks, dim=2)  # (B, Hkv, L, T, D)
        v_all = torch.stack(vs, dim=2)
        for j, i in enumerate(idx):
            n = len(blocks[i])
            out[i] = (
                k_all[j, :, :, :n].permute(2, 1, 0, 3).contiguous(),
                v_all[j, :, :, :n].permute(2, 1, 0, 3).contiguous(),
            )
    return [o for o in out if o is not None]


def prefill_packed(
    arch: DecoderOnlyArch, blocks: Sequence[Sequence[int]], num_layers: int
) -> list[BlockKV]:
    """Prefill of the concatenated corpus with block-sparse (block-diagonal causal) attention
    and positions restarting at 0 per block."""
    dev = arch.device
    lengths = [len(b) for b in blocks]
    ids = torch.tensor([t for b in blocks for t in b], dtype=torch.long, device=dev)[None]
    seg = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(lengths)).to(dev)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(dev)[None]
    total = ids.shape[1]
    causal = torch.ones((total, total), dtype=torch.bool, device=dev).tril()
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    ks, vs = _run_layers(arch, ids, pos, mask, num_layers)
    k_all = torch.stack(ks, dim=2)[0]  # (Hkv, L, T, D)
    v_all = torch.stack(vs, dim=2)[0]
    out: list[BlockKV] = []
    start = 0
    for n in lengths:
        out.append(
            (
                k_all[:, :, start : start + n].permute(2, 1, 0, 3).contiguous(),
                v_all[:, :, start : start + n].permute(2, 1, 0, 3).contiguous(),
            )
        )
        start += n
    return out
