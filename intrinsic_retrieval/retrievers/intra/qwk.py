"""Reverse-QWK: move each layer's key projection (and key-norm scale) to the query side.

For decoder layer l, query head h (KV head g = h // (H / G)) and memory token e:

    logit = softcap( rho_lg(e) * (s * (gamma_l * q_h) . (W_lg e + b_lg)) )
          = softcap( rho_lg(e) * (q~_h . e + c_h) )
    with  q~_h = s * W_lg^T (gamma_l * q_h)   in the stored space (d)
          c_h  = s * (gamma_l * q_h) . b_lg    (a per-query constant)
          rho_lg(e) = 1 / rms(W_lg e + b_lg)   for per-head key RMSNorm (T5Gemma2), else 1

so every layer scores against the one stored representation E. The only memory-side extra for
key-normed models is rho: L * G scalars per stored vector, computed at indexing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...models.architectures import CrossLayer


@dataclass
class Folded:
    """Folded queries of one retrieval pass: ``vectors (L, H, m, d)``, ``const (L, H, m)``."""

    vectors: torch.Tensor
    const: torch.Tensor


def _kv_index(layer: CrossLayer, device: torch.device) -> torch.Tensor:
    rep = layer.n_heads // layer.n_kv_heads
    return torch.arange(layer.n_heads, device=device) // rep


def fold_layer(query: torch.Tensor, layer: CrossLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Query states ``(B, H, T, hd)`` -> folded ``(B, H, T, d)`` and constants ``(B, H, T)``."""
    q = query.float() * layer.scaling
    if layer.key_norm_weight is not None:
        q = q * layer.key_norm_weight.to(q.device)
    g = _kv_index(layer, q.device)
    w = layer.weight.float().to(q.device).view(layer.n_kv_heads, layer.head_dim, -1)[g]
    vectors = torch.einsum("bhtk,hkd->bhtd", q, w)
    if layer.bias is None:
        const = torch.zeros(q.shape[:-1], device=q.device)
    else:
        b = layer.bias.float().to(q.device).view(layer.n_kv_heads, layer.head_dim)[g]
        const = torch.einsum("bhtk,hk->bht", q, b)
    return vectors, const


def key_rnorm(states: torch.Tensor, layers: Sequence[CrossLayer]) -> torch.Tensor:
    """``(..., d)`` -> ``(..., L, G)``: 1 / rms of each KV head's projected key (key norm)."""
    outs = []
    flat = states.float().reshape(-1, states.shape[-1])
    for layer in layers:
        k = flat @ layer.weight.float().to(flat.device).t()
        if layer.bias is not None:
            k = k + layer.bias.float().to(flat.device)
        k = k.view(-1, layer.n_kv_heads, layer.head_dim)
        outs.append(torch.rsqrt(k.pow(2).mean(-1) + layer.key_norm_eps))
    return torch.stack(outs, 1).view(*states.shape[:-1], len(layers), -1)


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def folded_logits(
    vectors: torch.Tensor,
    const: torch.Tensor,
    memory: torch.Tensor,
    layer: CrossLayer,
    rnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-attention logits ``(B, H, T, S)`` from folded queries and the stored memory
    ``(B, S, d)`` (`rnorm` ``(B, S, G)`` for key-norm layers). Used to prove equivalence."""
    raw = torch.einsum("bhtd,bsd->bhts", vectors, memory.float()) + const.unsqueeze(-1)
    if layer.key_norm_weight is not None:
        if rnorm is None:
            raise ValueError("key-norm layer needs rnorm")
        g = _kv_index(layer, raw.device)
        raw = raw * rnorm.float().permute(0, 2, 1)[:, g].unsqueeze(2)
    return _softcap(raw, layer.softcap)


def score_pooled(
    folded: Folded,
    alpha: torch.Tensor,
    pooled: torch.Tensor,
    layers: Sequence[CrossLayer],
    rnorm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact INTRA scores of chunks ``pooled (N, p, d)`` -> ``(N,)`` (differentiable):
    ``sum_{l,h,t} alpha_lh * max_j logit_lht(pooled_j)``."""
    return _scores(folded.vectors[None], folded.const[None], alpha, pooled, layers, rnorm)[0]


def _scores(
    vectors: torch.Tensor,
    const: torch.Tensor,
    alpha: torch.Tensor,
    pooled: torch.Tensor,
    layers: Sequence[CrossLayer],
    rnorm: torch.Tensor | None,
) -> torch.Tensor:
    """`score_pooled` of Q queries at once: ``vectors (Q, L, H, m, d)``, ``const (Q, L, H, m)``
    -> ``(Q, N)``; one matrix multiply against the chunks for all of them."""
    Q, L, H, m, d = vectors.shape
    N, p, _ = pooled.shape
    P = pooled.float().reshape(N * p, d)
    raw = (P @ vectors.reshape(Q * L * H * m, d).t()).view(N, p, Q, L, H, m)
    raw = raw + const.view(1, 1, Q, L, H, m)
    if rnorm is not None:
        g = _kv_index(layers[0], raw.device)
        raw = raw * rnorm.float()[:, :, None, :, g, None]
    caps = [layer.softcap for layer in layers]
    best = raw.amax(1)  # (N, Q, L, H, m); softcap is monotonic so it commutes with max
    if any(c is not None for c in caps):
        best = torch.stack([_softcap(best[:, :, i], caps[i]) for i in range(L)], 2)
    return (best * alpha.view(1, 1, L, H, 1)).sum((2, 3, 4)).t()


def is_linear(layers: Sequence[CrossLayer]) -> bool:
    """True when scores are plain weighted MaxSim (no key norm, no soft-cap): the shared
    `maxsim_topk` kernel then applies, with the constants added afterwards."""
    return all(layer.key_norm_weight is None and layer.softcap is None for layer in layers)


def topk_pooled(
    folded: Folded,
    alpha: torch.Tensor,
    pooled: torch.Tensor,
    layers: Sequence[CrossLayer],
    k: int,
    candidates: torch.Tensor,
    rnorm: torch.Tensor | None = None,
    memory_budget: int = 64 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best `k` candidate rows by exact INTRA score: ``(rows, scores)``, best first."""
    return topk_pooled_many(
        [folded], alpha, pooled, layers, k, candidates, rnorm, memory_budget=memory_budget
    )[0]


def topk_pooled_many(
    folded: Sequence[Folded],
    alpha: torch.Tensor,
    pooled: torch.Tensor,
    layers: Sequence[CrossLayer],
    k: int,
    candidates: torch.Tensor,
    rnorm: torch.Tensor | None = None,
    memory_budget: int = 64 << 20,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`topk_pooled` of several queries over the same candidates: one scan of the pooled
    vectors scores all of them (a batch's shared pass over the store; queries with different
    numbers of scoring positions, ``query_positions="query+retrieval"``, scan in groups)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(folded):
        groups.setdefault(tuple(f.vectors.shape), []).append(i)
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(folded)  # type: ignore[list-item]
    for members in groups.values():
        ranked = _topk_same_shape(
            [folded[i] for i in members], alpha, pooled, layers, k, candidates, rnorm, memory_budget
        )
        for i, r in zip(members, ranked, strict=True):
            out[i] = r
    return out


def _topk_same_shape(
    folded: Sequence[Folded],
    alpha: torch.Tensor,
    pooled: torch.Tensor,
    layers: Sequence[CrossLayer],
    k: int,
    candidates: torch.Tensor,
    rnorm: torch.Tensor | None,
    memory_budget: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from ...models import maxsim_topk

    L, H, m, d = folded[0].vectors.shape
    vectors = torch.stack([f.vectors.detach() for f in folded])
    const = torch.stack([f.const.detach() for f in folded])
    Q = len(folded)
    rows = torch.nonzero(candidates, as_tuple=False).flatten()
    k = min(k, int(rows.numel()))
    if k == 0:
        return [(rows[:0], torch.empty(0)) for _ in folded]
    a = alpha.detach().float()
    if is_linear(layers):
        w = a.view(L, H, 1).expand(L, H, m).reshape(-1)
        scores, idx = maxsim_topk(
            vectors.reshape(Q, L * H * m, d),
            pooled,
            k,
            candidates=candidates,
            weights=w,
            memory_budget=memory_budget,
        )
        shift = (const * a.view(1, L, H, 1)).sum((1, 2, 3))
        return [(idx[i].long(), scores[i] + float(shift[i])) for i in range(Q)]
    per_row = pooled.shape[1] * Q * L * H * m * 4 * 3
    block = max(1, memory_budget // max(per_row, 1))
    best_s = torch.empty(Q, 0)
    best_r = torch.empty(Q, 0, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, rows.numel(), block):
            r = rows[start : start + block]
            s = _scores(vectors, const, a, pooled[r], layers, None if rnorm is None else rnorm[r])
            all_s = torch.cat([best_s, s], 1)
            all_r = torch.cat([best_r, r[None].expand(Q, -1)], 1)
            top = torch.topk(all_s, min(k, all_s.shape[1]), dim=1)
            best_s, best_r = top.values, torch.gather(all_r, 1, top.indices)
    return [(best_r[i], best_s[i]) for i in range(Q)]


# ---------------------------------------------------------------------- query tap
class QueryTap:
    """Context manager: records each layer's cross-attention query states at `positions`
    (a slice over decoder positions) as the model computes them; with ``null_memory=True`` the
    cross-attention contributes nothing (C0 = empty set: a one-token dummy memory is passed and
    its attention output is zeroed, or for merged attention its key column is dropped)."""

    def __init__(
        self, layers: Sequence[CrossLayer], positions: slice, *, null_memory: bool = False
    ) -> None:
        self.layers = list(layers)
        self.positions = positions
        self.null_memory = null_memory
        self.queries: list[torch.Tensor | None] = [None] * len(self.layers)

    def _hook(self, i: int):
        layer = self.layers[i]

        def hook(module, query, key, value, mask, kwargs):
            self.queries[i] = query[:, :, self.positions]
            if not self.null_memory:
                return None
            if layer.merged:  # drop the dummy cross key (last column)
                from ...models.architectures.encoder_decoder import _module_eager

                mask = None if mask is None else mask[..., :-1]
                return _module_eager(module)(
                    module, query, key[:, :, :-1], value[:, :, :-1], mask, **kwargs
                )
            B, H, T, _ = query.shape
            out = query.new_zeros((B, T, H, value.shape[-1]))
            return out, None

        return hook

    def __enter__(self) -> QueryTap:
        for i, layer in enumerate(self.layers):
            layer.attn._intra_hook = self._hook(i)
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.attn._intra_hook = None

    def folded(self) -> Folded:
        """Folded queries of the first batch row: ``(L, H, m, d)`` and ``(L, H, m)``."""
        return self.folded_rows([slice(None)])[0]

    def folded_rows(self, positions: Sequence[slice]) -> list[Folded]:
        """Folded queries of batch rows ``0..len(positions)-1``, row i at ``positions[i]`` within
        the recorded positions (right-padded rows differ in where their tokens end). Rows whose
        slices have one length are folded together."""
        per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for q, layer in zip(self.queries, self.layers, strict=True):
            if q is None:
                raise RuntimeError("decoder layer did not run its cross-attention")
            rows = [q[i : i + 1, :, pos] for i, pos in enumerate(positions)]
            if len({int(r.shape[2]) for r in rows}) == 1:
                v, c = fold_layer(torch.cat(rows), layer)
                per_layer.append(list(zip(v, c, strict=True)))
            else:
                per_layer.append([tuple(x[0] for x in fold_layer(r, layer)) for r in rows])
        return [
            Folded(
                torch.stack([layer[i][0] for layer in per_layer]),
                torch.stack([layer[i][1] for layer in per_layer]),
            )
            for i in range(len(positions))
        ]
