"""The query pass: query tokens attend to every stored document block plus themselves.

Attention over the corpus is computed in streaming fashion, `block_docs` documents at a time,
merging partial results with the online-softmax (log-sum-exp) rule, so peak memory is set by one
block batch rather than by the corpus. Per-document log-sum-exps give each document's exact share
of the attention mass (the zero-shot readout) at no extra cost.

Two length-aware options from the paper:

* scalable softmax — logits at layer l are multiplied by ``s_l * log(n)``, n = keys attended
  (``count="tokens"``) or blocks attended (``count="docs"``);
* document-level routing — at one layer, documents are scored by QK-MaxSim (for each query token
  and head the max logit over the document's tokens, summed over tokens, averaged over heads); only
  the top-B documents are attended to by later layers (or, with ``route_before_attend``, by the
  routing layer itself and later ones, scored from that layer's keys alone). A caller may score
  routing otherwise (`route_by`): the retriever's ``route_score="mass"`` routes by the calibrated
  attention mass of the readout layers up to the routing layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...models.architectures import DecoderOnlyArch
from ...models.quant import dequantize_int8
from ...models.quant import quantize_int8 as quantize_int8  # re-exported (moved to models.quant)
from .blockattn import (
    BatchLogits,
    attend_batch,
    doc_maxima,
    maxsim_scores,
    resolve_backend,
    token_positions,
)

if TYPE_CHECKING:
    from .kv import KVSource

#: routing score of `docs` from the masses recorded so far: ``(masses, docs) -> (len(docs),)``
RouteScorer = Callable[
    [Mapping[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor], torch.Tensor
]


def pack_layer(
    rows: Sequence[torch.Tensor], scales: Sequence[torch.Tensor] | None, layer: int | None
) -> torch.Tensor:
    """One layer of per-block ``(T, L, Hkv, D)`` tensors (int8 with `scales` ``(T, L, Hkv)``,
    else float) packed into one float32 ``(sum T, Hkv, D)`` tensor: each block is converted
    straight into place. ``layer=None``: the rows already hold that one layer (``(T, Hkv, D)``,
    scales ``(T, Hkv)``; a layer-major store), so a single row converts in one contiguous pass."""
    pick = (lambda x: x) if layer is None else (lambda x: x[:, layer])
    if len(rows) == 1 and scales is None:  # float32 storage: a read-only view, nothing copied
        return pick(rows[0]).to(torch.float32)
    total = sum(int(x.shape[0]) for x in rows)
    out = torch.empty((total, *pick(rows[0]).shape[1:]), dtype=torch.float32)
    at = 0
    for i, x in enumerate(rows):
        n = int(x.shape[0])
        out[at : at + n].copy_(pick(x))
        if scales is not None:  # int8 codes times their scales, in float32 (`dequantize_int8`)
            out[at : at + n].mul_(pick(scales[i])[..., None])
        at += n
    return out


def packed_index(
    offsets: torch.Tensor, lengths: torch.Tensor, docs: torch.Tensor
) -> slice | torch.Tensor:
    """Where blocks `docs` lie in a layer-major flat tensor: one slice when they are stored
    consecutively (a whole corpus, a range), else the token indices to gather."""
    first, n = int(docs[0]), len(docs)
    if int(docs[-1]) - first + 1 == n and bool((docs[1:] > docs[:-1]).all()):
        return slice(int(offsets[first]), int(offsets[first + n]))
    lens = lengths[docs]
    starts = torch.repeat_interleave(offsets[docs] - (torch.cumsum(lens, 0) - lens), lens)
    return torch.arange(int(lens.sum())) + starts


class CorpusKV:
    """Stored blocks held layer-major: per layer one flat ``(total_tokens, Hkv, D)`` tensor.

    Built from per-document ``(T, L, Hkv, D)`` tensors (float, or int8 with ``(T, L, Hkv)``
    scales). Tensors may require grad (training reuses the query pass). Values may cover fewer
    layers than keys (a routing-keys store: keys of layers ``0..r``, values of ``0..r-1``; None
    when r = 0); `keys` then serves the extra key layer.
    """

    def __init__(
        self,
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor] | None,
        k_scales: Sequence[torch.Tensor] | None = None,
        v_scales: Sequence[torch.Tensor] | None = None,
    ) -> None:
        if not keys:
            raise ValueError("CorpusKV needs at least one block")
        k_layers = int(keys[0].shape[1])
        v_layers = int(values[0].shape[1]) if values else 0

        def per_layer(blocks: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
            return [torch.cat([x[:, layer] for x in blocks]) for layer in range(n)]

        self._set(
            torch.tensor([int(k.shape[0]) for k in keys], dtype=torch.long),
            per_layer(keys, k_layers),
            per_layer(values or [], v_layers),
            None if k_scales is None else per_layer(k_scales, k_layers),
            None if k_scales is None else per_layer(v_scales or [], v_layers),
        )

    @classmethod
    def from_layers(
        cls,
        lengths: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        k_scales: list[torch.Tensor] | None = None,
        v_scales: list[torch.Tensor] | None = None,
    ) -> CorpusKV:
        """From tensors already layer-major: per layer one flat ``(total_tokens, Hkv, D)``
        tensor of every block in order (a ``kv_layout="layer"`` store), with the blocks'
        lengths."""
        self = cls.__new__(cls)
        self._set(
            lengths.to(torch.long),
            list(keys),
            list(values),
            None if k_scales is None else list(k_scales),
            None if k_scales is None else list(v_scales or []),
        )
        return self

    def _set(
        self,
        lengths: torch.Tensor,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        ks: list[torch.Tensor] | None,
        vs: list[torch.Tensor] | None,
    ) -> None:
        """The one place the layer-major lists, lengths and offsets are set."""
        self.num_layers = len(k)
        self.lengths = lengths
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        self.offsets[1:] = torch.cumsum(lengths, 0)
        self.k, self.v, self.ks, self.vs = k, v, ks, vs

    def __len__(self) -> int:
        return len(self.lengths)

    def prepare(self, docs: torch.Tensor) -> None:
        """Every layer is held: nothing to prepare for routed blocks."""
        return None

    @property
    def nbytes(self) -> int:
        parts = [*self.k, *self.v, *(self.ks or []), *(self.vs or [])]
        return sum(p.numel() * p.element_size() for p in parts)

    def _read(
        self, x: list[torch.Tensor], sc: list[torch.Tensor] | None, layer: int, where: Any
    ) -> torch.Tensor:
        t = x[layer][where]
        return dequantize_int8(t, sc[layer][where]) if sc is not None else t.float()

    def batch(
        self, layer: int, docs: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed keys, values ``(S, Hkv, D)`` (float32) and lengths ``(n,)`` of `docs`."""
        where = packed_index(self.offsets, self.lengths, docs)
        k = self._read(self.k, self.ks, layer, where)
        v = self._read(self.v, self.vs, layer, where)
        return k.to(device), v.to(device), self.lengths[docs]

    def keys(
        self, layer: int, docs: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed keys ``(S, Hkv, D)`` (float32) and lengths of `docs` (routing reads no
        values)."""
        where = packed_index(self.offsets, self.lengths, docs)
        return self._read(self.k, self.ks, layer, where).to(device), self.lengths[docs]


@dataclass
class QueryCache:
    """The query's own keys/values per layer ``(B, Hkv, t, D)`` for incremental decoding."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    def select(self, rows: torch.Tensor) -> QueryCache:
        return QueryCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.length)


@dataclass
class QueryResult:
    hidden: torch.Tensor  # residual stream after the last layer run, (B, Tq, d)
    cache: QueryCache
    #: layer -> (document indices, mass (B, H, n)): mean over the readout tokens of each
    #: head's attention probability summed over the document's tokens
    masses: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    routed: torch.Tensor | None = None  # document indices kept by routing, best first
    route_scores: torch.Tensor | None = None  # QK-MaxSim of every document at the routing layer
    #: (documents scored, their QK-MaxSim) as computed, gradients kept (routing loss in training)
    route_logits: tuple[torch.Tensor, torch.Tensor] | None = None


def _ssmax_factor(
    s: float | None, count: str, n_doc_tokens: int, n_docs: int, self_visible: torch.Tensor
) -> torch.Tensor | None:
    if s is None:
        return None
    if count == "docs":
        n = torch.full_like(self_visible, n_docs + 1, dtype=torch.float32)
    else:
        n = (self_visible + n_doc_tokens).float()
    return s * torch.log(n.clamp(min=2.0))


def routing_scores(
    corpus: KVSource,
    layer: int,
    qg: torch.Tensor,
    docs: torch.Tensor,
    spec: BatchLogits,
    block_docs: int,
) -> torch.Tensor:
    """QK-MaxSim of `docs` from `layer`'s keys alone (no values read): the same scores the
    in-pass routing computes from that layer's attention logits."""
    parts = []
    for start in range(0, len(docs), block_docs):
        kb, lengths = corpus.keys(layer, docs[start : start + block_docs], qg.device)
        parts.append(maxsim_scores(doc_maxima(qg, kb, lengths, spec)))
    return torch.cat(parts) if parts else torch.empty(0)


def _route(
    result: QueryResult, n_corpus: int, active: torch.Tensor, scores: torch.Tensor, top: int | None
) -> torch.Tensor:
    """Keep the `top` best-scored of `active` (best first) and record the decision."""
    keep = torch.topk(scores.detach(), min(top or len(active), len(active)))
    result.route_logits = (active, scores)
    result.route_scores = torch.full((n_corpus,), float("-inf"))
    result.route_scores[active] = scores.detach().cpu()
    result.routed = active[keep.indices.cpu()]
    return result.routed


def query_pass(
    arch: DecoderOnlyArch,
    corpus: KVSource,
    input_ids: torch.Tensor,
    *,
    q_offset: int,
    num_layers: int,
    docs: torch.Tensor | None = None,
    cache: QueryCache | None = None,
    block_docs: int = 64,
    ssmax: Sequence[float | None] | None = None,
    ssmax_count: str = "tokens",
    route_layer: int | None = None,
    route_top: int | None = None,
    routed: torch.Tensor | None = None,
    route_before_attend: bool = False,
    route_by: RouteScorer | None = None,
    mass_layers: Sequence[int] = (),
    mass_tokens: torch.Tensor | None = None,
    start_layer: int = 0,
    hidden: torch.Tensor | None = None,
    backend: str = "auto",
    segments: torch.Tensor | None = None,
) -> QueryResult:
    """Run `input_ids` ``(B, Tq)`` (positions ``q_offset + cache.length + i``) through layers
    ``0..num_layers-1`` attending to `docs` (default: all blocks of `corpus`) and, causally, to
    themselves. With `route_layer`/`route_top`, layers after the routing layer attend only to the
    top documents; pass `routed` to reuse an earlier routing decision (decoding steps).
    `mass_tokens` picks the readout tokens: indices shared by every row, or ``(B, Tq)`` weights
    (each row summing to 1) for a batch of queries of different lengths, right-padded.
    `start_layer` with `hidden` (the residual stream entering it) resumes a pass part-way; the
    returned cache then holds only the layers run. `backend` computes each block batch's
    attention (see `blockattn`: "einsum", "flex", or "auto" = einsum).

    `segments` ``(Tq,)`` packs several queries into one row (B = 1, no padding): token i
    belongs to query ``segments[i]`` (contiguous, numbered from 0), positions restart at each
    query's first token, a token attends only to its own query's earlier tokens (and to the
    documents), and `mass_tokens` is ``(Q, Tq)`` weights, one mass row per query. Every query
    token's attention over the stored blocks is then one row of the same matrix multiply, with
    no padded rows (right-padding a batch of SciFact queries costs about 1.5x their FLOPs).
    Not with routing (routed sets differ per query), a cache, or a resumed pass.

    `route_before_attend` moves routing in front of the routing layer's attention: documents
    are scored by QK-MaxSim with that layer's *keys only* (no values read) and the routing
    layer's attention itself, like every later layer, covers only the routed documents. This is
    what a routing-keys store (`recompute.RecomputedKV`) can serve; a full store under the same
    option gives the same result. The corpus is told the routed
    set once per pass. `route_by` replaces QK-MaxSim as the routing score: it is called with the
    masses recorded so far (`mass_layers` up to the routing layer; before it, with
    `route_before_attend`) and the documents to score."""
    pre_route = route_layer if route_before_attend else None
    if route_before_attend:
        route_layer = None  # the in-loop (after-attention) routing below stays off
    dev = arch.device
    backend = resolve_backend(backend, dev)
    bsz, tq = input_ids.shape
    past = cache.length if cache is not None else 0
    seg = None
    qi = torch.arange(tq, device=dev)  # each token's index within its own query
    if segments is not None:
        if (
            bsz != 1
            or cache is not None
            or start_layer
            or route_layer is not None
            or routed is not None
        ):
            raise ValueError("packed queries (segments) take one row, no cache, no routing")
        seg = segments.to(dev)
        qi = token_positions(torch.bincount(seg))  # as block tokens: from 0 in each query
    pos = (q_offset + past + qi).expand(bsz, tq)
    active = docs if docs is not None else torch.arange(len(corpus))
    h = arch.embed(input_ids.to(dev)) if hidden is None else hidden
    result = QueryResult(hidden=h, cache=QueryCache(length=past + tq))
    mass_set = set(mass_layers)
    qabs = past + torch.arange(tq, device=dev)  # each token's index in the key sequence
    for layer in range(start_layer, num_layers):
        if routed is not None and route_layer is not None and layer > route_layer:
            active = routed
        q, k, v = arch.qkv(layer, h, pos)
        if cache is not None and cache.keys:
            k = torch.cat([cache.keys[layer - start_layer], k], dim=2)
            v = torch.cat([cache.values[layer - start_layer], v], dim=2)
        result.cache.keys.append(k)
        result.cache.values.append(v)
        hkv, dim = k.shape[1], k.shape[-1]
        g = q.shape[1] // hkv
        qg = q.float().reshape(bsz, hkv, g, tq, dim)
        scale, cap, window = (
            arch.scaling(layer),
            arch.softcap(layer),
            arch.sliding_window(layer),
        )
        s_l = ssmax[layer] if ssmax is not None and layer < len(ssmax) else None
        if pre_route is not None and layer >= pre_route and active is not routed:
            if routed is None:  # score every candidate with the stored routing-layer keys
                all_tok = int(corpus.lengths[active].sum())
                f_all = _ssmax_factor(s_l, ssmax_count, all_tok, len(active), past + qi + 1)
                spec_all = BatchLogits(scale, cap, f_all, window, q_offset + past + qi)
                if route_by is not None:
                    scores = route_by(result.masses, active)
                else:
                    scores = routing_scores(corpus, layer, qg, active, spec_all, block_docs)
                routed = _route(result, len(corpus), active, scores, route_top)
            active = routed
            corpus.prepare(routed)
        n_doc_tok = int(corpus.lengths[active].sum())
        factor = _ssmax_factor(s_l, ssmax_count, n_doc_tok, len(active), past + qi + 1)

        spec = BatchLogits(scale, cap, factor, window, q_offset + past + qi)

        # the query's own tokens (causal, and within the sliding window if any)
        ls = spec.adjust(torch.einsum("bhgqd,bhsd->bhgqs", qg, k.float()), 3)
        kpos = torch.arange(k.shape[2], device=dev)
        vis = kpos[None, :] <= qabs[:, None]
        if window is not None:
            vis = vis & (qabs[:, None] - kpos[None, :] < window)
        if seg is not None:
            vis = vis & (seg[:, None] == seg[None, :])
        ls = ls.masked_fill(~vis, float("-inf"))
        run_lse = torch.logsumexp(ls, -1)
        out = torch.einsum("bhgqs,bhsd->bhgqd", torch.exp(ls - run_lse[..., None]), v.float())

        doc_lse: list[torch.Tensor] = []
        route_parts: list[torch.Tensor] = []
        step = _docs_per_batch(
            block_docs, bsz * q.shape[1] * tq, corpus.lengths[active], 8 * hkv * dim, dev
        )
        for start in range(0, len(active), step):
            chunk = active[start : start + step]
            kb, vb, lengths = corpus.batch(layer, chunk, dev)
            part = attend_batch(
                backend,
                qg,
                kb,
                vb,
                lengths,
                spec,
                doc_lse=layer in mass_set,
                doc_max=layer == route_layer and route_by is None,
            )
            if part.doc_max is not None:
                route_parts.append(maxsim_scores(part.doc_max))
            safe = torch.where(torch.isfinite(part.lse), part.lse, torch.zeros_like(part.lse))
            new = torch.logaddexp(run_lse, part.lse)
            out = (
                out * torch.exp(run_lse - new)[..., None]
                + part.out * torch.exp(safe - new)[..., None]
            )
            run_lse = new
            if part.doc_lse is not None:
                doc_lse.append(part.doc_lse)
        if doc_lse:
            mass = torch.exp(torch.cat(doc_lse, -1) - run_lse[..., None])  # (b, hkv, g, q, n)
            mass = mass.reshape(bsz, hkv * g, tq, -1)
            if mass_tokens is None:
                result.masses[layer] = (active, mass.mean(2))
            elif seg is not None:  # packed queries: one row of weights per query
                w = mass_tokens.to(mass.device, mass.dtype)
                result.masses[layer] = (active, torch.einsum("hqn,oq->ohn", mass[0], w))
            elif mass_tokens.dim() == 2:  # per-row token weights (queries of several lengths)
                w = mass_tokens.to(mass.device, mass.dtype)
                result.masses[layer] = (active, torch.einsum("bhqn,bq->bhn", mass, w))
            else:
                result.masses[layer] = (active, mass[:, :, mass_tokens].mean(2))
        attn = out.reshape(bsz, hkv * g, tq, dim).transpose(1, 2).reshape(bsz, tq, -1)
        h = arch.finish(layer, h, attn.to(h.dtype))
        if layer == route_layer and routed is None:
            scores = route_by(result.masses, active) if route_by is not None else None
            if scores is None and route_parts:
                scores = torch.cat(route_parts)
            if scores is not None:
                routed = _route(result, len(corpus), active, scores, route_top)
                active = routed
    result.hidden = h
    return result


#: float32 logits one block batch may hold (32 MB): batched queries get fewer documents per batch
LOGITS_BUDGET = 8 * 2**20
#: float32 keys + values of one block batch on a CPU (4 MB): converted from storage and used
#: while still in cache; measured 1.7x faster per query than 64-document batches (Gemma 3,
#: 300-token blocks; benchmarks/roofline.py)
CPU_KV_BUDGET = 4 * 2**20


def _docs_per_batch(
    block_docs: int, rows: int, lengths: torch.Tensor, token_bytes: int, device: torch.device
) -> int:
    """Documents per block batch: at most `block_docs`, fewer when the query rows times the
    batch's tokens would exceed `LOGITS_BUDGET` or (on a CPU) the batch's float32 keys and
    values `CPU_KV_BUDGET`."""
    mean_len = max(1.0, float(lengths.float().mean()) if len(lengths) else 1.0)
    n = min(block_docs, int(LOGITS_BUDGET // (rows * mean_len)))
    if device.type == "cpu":
        n = min(n, int(CPU_KV_BUDGET // (token_bytes * mean_len)))
    return max(1, n)


def default_ssmax(num_layers: int, reference_tokens: int) -> list[float | None]:
    """Zero-shot scalable softmax: ``s_l = 1 / log(reference)`` on every layer, so logits are
    scaled by ``log(n) / log(reference)`` — unchanged at the length the model was trained on,
    sharper beyond it."""
    s = 1.0 / math.log(max(reference_tokens, 3))
    return [s] * num_layers
