"""Attention of the query tokens over one batch of stored document blocks.

Blocks arrive *packed*: one layer's keys and values of a batch of documents as flat
``(S, Hkv, D)`` float32 tensors (document j's tokens follow document j-1's, no padding), with
the documents' lengths. `query_pass` streams the corpus batch by batch and merges the partial
softmaxes; this module computes one batch's part: the output normalised within the batch, the
batch's log-sum-exp, and optionally each document's log-sum-exp (the readout) and each
document's max logit (routing).

Two backends compute the same thing:

* ``"einsum"`` (the name is historical: two dense matrix multiplies; what "auto" picks) folds
  every query row of
  every head group into one ``(rows x S)`` logits matrix per KV head, exponentiates it in place
  and reduces per document with segment sums. No padding, no gathers: on a CPU the two matrix
  multiplies are the cost (see `benchmarks/roofline.py`). Any device; the only one that yields
  routing maxima.
* ``"flex"`` calls `torch.nn.attention.flex_attention` with the softcap / scalable-softmax factor
  as a `score_mod` and sliding windows as a block mask, and asks for the log-sum-exp.
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
    """The "auto" backend is einsum on every device: on an H200 both backends equal the CPU
    reference; einsum runs a full-size layer 48x faster than 16 CPU cores, while compiled flex
    took 64 s to compile a small query pass and did not compile a full-size layer within 100 s
    (docs/evaluation.md, GPU check). Flex stays available by name."""
    del device  # kept in the signature: a device where flex wins could pick it
    return "einsum" if backend == "auto" else backend


def token_positions(lengths: torch.Tensor) -> torch.Tensor:
    """(S,) each packed token's position inside its own block (blocks start at position 0)."""
    starts = torch.cumsum(lengths, 0) - lengths
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return torch.arange(int(lengths.sum()), device=lengths.device) - starts[owner]


def _rows(qg: torch.Tensor) -> torch.Tensor:
    """(b, hkv, g, tq, d) -> (hkv, b*g*tq, d): every query row that shares a KV head."""
    b, hkv, g, tq, d = qg.shape
    return qg.permute(1, 0, 2, 3, 4).reshape(hkv, b * g * tq, d)


def _unrows(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(hkv, b*g*tq, ...) -> (b, hkv, g, tq, ...)."""
    b, hkv, g, tq = shape[:4]
    return x.reshape(hkv, b, g, tq, *x.shape[2:]).transpose(0, 1)


def packed_logits(
    qg: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, spec: BatchLogits
) -> torch.Tensor:
    """(hkv, b*g*tq, S) logits of `qg` against packed keys `k` (S, hkv, d), -inf where a
    sliding window hides a key. Without a softcap the scale and the scalable-softmax factor are
    folded into the queries, so the matrix multiply yields final logits."""
    b, _, g, tq, _ = qg.shape
    if spec.softcap is None:
        mult = torch.full((tq,), spec.scale, device=qg.device, dtype=qg.dtype)
        if spec.factor is not None:
            mult = mult * spec.factor.to(qg.device, qg.dtype)
        lg = torch.matmul(_rows(qg * mult[:, None]), k.permute(1, 2, 0))
    else:
        lg = torch.matmul(_rows(qg), k.permute(1, 2, 0)) * spec.scale
        lg = torch.tanh(lg / spec.softcap) * spec.softcap
        if spec.factor is not None:
            lg = lg * spec.factor.to(lg.device).repeat(b * g)[None, :, None]
    if spec.window is not None and int(spec.q_pos.max()) >= spec.window:
        # keys farther back than the window (block tokens sit at positions 0..len-1)
        qpos = spec.q_pos.to(lg.device).repeat(b * g)
        far = qpos[:, None] - token_positions(lengths.to(lg.device))[None, :] >= spec.window
        lg = lg.masked_fill_(far[None], float("-inf"))
    return lg


def _segment_sum(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(..., S) -> (..., n): sums over each document's tokens."""
    if bool((lengths == lengths[0]).all()):
        return x.reshape(*x.shape[:-1], len(lengths), int(lengths[0])).sum(-1)
    flat = x.reshape(-1, x.shape[-1])
    lens = lengths.to(x.device).expand(flat.shape[0], -1).contiguous()
    return torch.segment_reduce(flat, "sum", lengths=lens, axis=1).reshape(*x.shape[:-1], -1)


def _segment_max(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(..., S) -> (..., n): max over each document's tokens."""
    if bool((lengths == lengths[0]).all()):
        return x.reshape(*x.shape[:-1], len(lengths), int(lengths[0])).amax(-1)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.full((flat.shape[0], len(lengths)), float("-inf"), device=x.device)
    out.scatter_reduce_(1, owner.expand(flat.shape[0], -1), flat, "amax")
    return out.reshape(*x.shape[:-1], -1)


def doc_maxima(qg: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, spec: BatchLogits):
    """(b, hkv, g, tq, n) max logit of each query row over each document's keys (routing)."""
    return _unrows(_segment_max(packed_logits(qg, k, lengths, spec), lengths), qg.shape)


def maxsim_scores(doc_max: torch.Tensor) -> torch.Tensor:
    """QK-MaxSim routing score per document from its max logits ``(b, hkv, g, tq, n)``: summed
    over query tokens, averaged over heads, summed over the batch (nothing visible counts 0)."""
    best = torch.where(torch.isfinite(doc_max), doc_max, torch.zeros_like(doc_max))
    return best.sum(3).mean((1, 2)).sum(0)


def attend_einsum(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    spec: BatchLogits,
    *,
    doc_lse: bool = False,
    doc_max: bool = False,
) -> BatchResult:
    """`qg` (b, hkv, g, tq, d) float32; packed `k`, `v` (S, hkv, d); `lengths` (n,)."""
    lg = packed_logits(qg, k, lengths, spec)
    best = _unrows(_segment_max(lg, lengths), qg.shape) if doc_max else None
    # the shift only keeps exp in range (the results do not depend on it): no gradient through it
    m = lg.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lg - m) if lg.requires_grad else lg.sub_(m).exp_()  # in place at inference
    if doc_lse:
        per_doc = _segment_sum(e, lengths)
        total = per_doc.sum(-1)
    else:
        total = e.sum(-1)
    out = torch.matmul(e, v.permute(1, 0, 2))  # (hkv, rows, d)
    out = out / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    lse = torch.log(total) + m[..., 0]  # -inf where nothing was visible
    lse_d = _unrows(torch.log(per_doc) + m, qg.shape) if doc_lse else None
    return BatchResult(_unrows(out, qg.shape), _unrows(lse, qg.shape), lse_d, best)


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
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    spec: BatchLogits,
    *,
    doc_lse: bool = False,
) -> BatchResult:
    """Same contract as `attend_einsum` (without routing maxima) through flex attention."""
    import warnings

    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    b, hkv, g, tq, d = qg.shape
    n, s = len(lengths), k.shape[0]
    dev = qg.device
    q = qg.reshape(b, hkv * g, tq, d)
    kf = k.permute(1, 0, 2)[None].expand(b, -1, -1, -1)
    vf = v.permute(1, 0, 2)[None]
    if doc_lse:  # indicator column per document: the output on it is that document's mass
        owner = torch.repeat_interleave(torch.arange(n, device=dev), lengths.to(dev))
        onehot = torch.nn.functional.one_hot(owner, n).to(vf.dtype)
        vf = torch.cat([vf, onehot[None, None].expand(1, hkv, -1, -1)], -1)
    vf = vf.expand(b, -1, -1, -1)
    tpos = token_positions(lengths.to(dev))
    q_pos, window = spec.q_pos.to(dev), spec.window

    def mask_mod(_b: Any, _h: Any, qi: Any, ki: Any) -> Any:
        return q_pos[qi] - tpos[ki] < window

    cap, factor = spec.softcap, spec.factor

    def score_mod(score: Any, _b: Any, _h: Any, qi: Any, _ki: Any) -> Any:
        if cap is not None:
            score = torch.tanh(score / cap) * cap
        if factor is not None:
            score = score * factor[qi]
        return score

    block_mask = (
        create_block_mask(mask_mod, None, None, tq, s, device=dev) if window is not None else None
    )
    with warnings.catch_warnings():  # CPU: flex's eager reference path warns on every call
        warnings.simplefilter("ignore", UserWarning)
        out, aux = _flex_fn(dev)(
            q,
            kf,
            vf,
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
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    spec: BatchLogits,
    *,
    doc_lse: bool = False,
    doc_max: bool = False,
) -> BatchResult:
    """Dispatch; routing maxima always take the einsum path (flex returns no per-key maxima)."""
    if backend == "flex" and not doc_max:
        return attend_flex(qg, k, v, lengths, spec, doc_lse=doc_lse)
    return attend_einsum(qg, k, v, lengths, spec, doc_lse=doc_lse, doc_max=doc_max)
