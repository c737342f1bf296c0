"""Attention of the query tokens over one batch of stored document blocks.

`query_pass` streams the corpus batch by batch and merges the partial softmaxes; this module
computes one batch's part: the output normalised within the batch, the batch's log-sum-exp, and
optionally each document's log-sum-exp (the readout) and each document's max logit (routing).

Two backends compute the same thing:

* ``"einsum"`` materialises the ``(query tokens x batch tokens)`` logits. Any device; the only one
  that yields routing maxima.
* ``"flex"`` calls `torch.nn.attention.flex_attention` with the softcap / scalable-softmax factor
  as a `score_mod` and padding / sliding windows as a block mask, and asks for the log-sum-exp.
  Per-document masses come out of the same kernel by appending one indicator column per document
  to the values: the attention output on column j is the probability mass on document j. On CUDA
  the function is compiled (a fused kernel that never materialises the logits); on CPU it runs
  flex's eager reference, which is how the tests prove it equal to the einsum backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BACKENDS = ("auto", "einsum", "flex")


@dataclass
class BatchLogits:
    """How raw ``q . k`` products become logits at this layer, and which keys are visible."""

    scale: float
    softcap: float | None
    factor: torch.Tensor | None  # (tq,) scalable-softmax multiplier per query token, or None
    window: int | None  # sliding window of this layer, or None
    q_pos: torch.Tensor  # (tq,) absolute positions of the query tokens

    def adjust(self, logits: torch.Tensor, qdim: int) -> torch.Tensor:
        logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.factor is not None:
            shape = [1] * logits.dim()
            shape[qdim] = self.factor.numel()
            logits = logits * self.factor.view(shape)
        return logits


@dataclass
class BatchResult:
    out: torch.Tensor  # (b, hkv, g, tq, d), normalised within the batch (0 where nothing visible)
    lse: torch.Tensor  # (b, hkv, g, tq), -inf where nothing visible
    doc_lse: torch.Tensor | None = None  # (b, hkv, g, tq, n)
    doc_max: torch.Tensor | None = None  # (b, hkv, g, tq, n), max logit per document


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "flex" if device.type == "cuda" else "einsum"
    return backend


def visible_keys(spec: BatchLogits, valid: torch.Tensor) -> torch.Tensor:
    """(tq, n, t) keys each query token may see: real tokens, within its sliding window."""
    tq = spec.q_pos.numel()
    mask = valid[None, :, :].expand(tq, -1, -1)
    if spec.window is not None:
        tpos = torch.arange(valid.shape[1], device=valid.device)
        near = spec.q_pos[:, None] - tpos[None, :] < spec.window
        mask = mask & near[:, None, :]
    return mask


def masked_logits(
    qg: torch.Tensor, kb: torch.Tensor, valid: torch.Tensor, spec: BatchLogits
) -> torch.Tensor:
    """(b, hkv, g, tq, n, t) logits of `qg` against a batch's keys, -inf where not visible."""
    lg = spec.adjust(torch.einsum("bhgqd,nthd->bhgqnt", qg, kb), 3)
    return lg.masked_fill(~visible_keys(spec, valid), float("-inf"))


def maxsim_scores(doc_max: torch.Tensor) -> torch.Tensor:
    """QK-MaxSim routing score per document from its max logits ``(b, hkv, g, tq, n)``: summed
    over query tokens, averaged over heads, summed over the batch (nothing visible counts 0)."""
    best = torch.where(torch.isfinite(doc_max), doc_max, torch.zeros_like(doc_max))
    return best.sum(3).mean((1, 2)).sum(0)


def attend_einsum(
    qg: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    valid: torch.Tensor,
    spec: BatchLogits,
    *,
    doc_lse: bool = False,
    doc_max: bool = False,
) -> BatchResult:
    """`qg` (b, hkv, g, tq, d) float32; `kb`, `vb` (n, t, hkv, d); `valid` (n, t)."""
    lg = masked_logits(qg, kb, valid, spec)
    best = lg.amax(-1) if doc_max else None
    lse_d = torch.logsumexp(lg, -1)  # (b, h, g, q, n)
    lse_b = torch.logsumexp(lse_d, -1)
    safe = torch.where(torch.isfinite(lse_b), lse_b, torch.zeros_like(lse_b))
    out = torch.einsum("bhgqnt,nthd->bhgqd", torch.exp(lg - safe[..., None, None]), vb)
    return BatchResult(out, lse_b, lse_d if doc_lse else None, best)


_compiled: dict[str, Any] = {}


def _flex_fn(device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _compiled:
        _compiled["cuda"] = torch.compile(flex_attention, dynamic=True)
    return _compiled["cuda"]


def attend_flex(
    qg: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    valid: torch.Tensor,
    spec: BatchLogits,
    *,
    doc_lse: bool = False,
) -> BatchResult:
    """Same contract as `attend_einsum` (without routing maxima) through flex attention."""
    import warnings

    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    b, hkv, g, tq, d = qg.shape
    n, t = valid.shape
    dev = qg.device
    q = qg.reshape(b, hkv * g, tq, d)
    k = kb.permute(2, 0, 1, 3).reshape(1, hkv, n * t, d).expand(b, -1, -1, -1)
    v = vb.permute(2, 0, 1, 3).reshape(1, hkv, n * t, d)
    if doc_lse:  # indicator column per document: the output on it is that document's mass
        owner = torch.arange(n, device=dev).repeat_interleave(t)
        onehot = torch.nn.functional.one_hot(owner, n).to(v.dtype)
        v = torch.cat([v, onehot[None, None].expand(1, hkv, -1, -1)], -1)
    v = v.expand(b, -1, -1, -1)
    flat_valid = valid.reshape(-1)
    tpos = torch.arange(t, device=dev).repeat(n)
    q_pos, window = spec.q_pos, spec.window

    def mask_mod(_b: Any, _h: Any, qi: Any, ki: Any) -> Any:
        keep = flat_valid[ki]
        if window is not None:
            keep = keep & (q_pos[qi] - tpos[ki] < window)
        return keep

    cap, factor = spec.softcap, spec.factor

    def score_mod(score: Any, _b: Any, _h: Any, qi: Any, _ki: Any) -> Any:
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        if factor is not None:
            score = score * factor[qi]
        return score

    block_mask = create_block_mask(mask_mod, None, None, tq, n * t, device=dev)
    with warnings.catch_warnings():  # CPU: flex's eager reference path warns on every call
        warnings.simplefilter("ignore", UserWarning)
        out, aux = _flex_fn(dev)(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=spec.scale,
            enable_gqa=g > 1,
            return_aux=AuxRequest(lse=True),
        )
    lse = aux.lse.float().reshape(b, hkv, g, tq)
    out = out.float().reshape(b, hkv, g, tq, -1)
    visible = torch.isfinite(lse)
    lse_d = None
    if doc_lse:
        mass = out[..., d:].clamp(min=0.0)
        lse_d = torch.where(visible[..., None], torch.log(mass) + lse[..., None], -torch.inf)
    out = torch.where(visible[..., None], out[..., :d], torch.zeros_like(out[..., :d]))
    return BatchResult(out, lse, lse_d)


def attend_batch(
    backend: str,
    qg: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    valid: torch.Tensor,
    spec: BatchLogits,
    *,
    doc_lse: bool = False,
    doc_max: bool = False,
) -> BatchResult:
    """Dispatch; routing maxima always take the einsum path (flex returns no per-key maxima)."""
    if backend == "flex" and not doc_max:
        return attend_flex(qg, kb, vb, valid, spec, doc_lse=doc_lse)
    return attend_einsum(qg, kb, vb, valid, spec, doc_lse=doc_lse, doc_max=doc_max)
