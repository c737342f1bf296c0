"""ColBERT-style late interaction (MaxSim) over large collections in bounded memory.

score(q, doc) = sum over query vectors i of w_i * max over doc vectors j of <q_i, doc_j>

For few query vectors scoring is a memory-bound scan of the document tensor (for many, on CPU,
the matmul becomes compute-bound), so the kernels stream it in blocks of rows: each block is cast
to float32 once into a reused buffer (fp16/bf16 storage, fp32 arithmetic), multiplied with all
query vectors in one matmul ``(B*p, d) @ (d, Q*m)``, max-reduced over the doc vectors and
weight-summed over query vectors. No per-document Python loop; the extra memory is one block
(sized from `memory_budget` bytes, default 32 MiB on CPU and 256 MiB on CUDA, unless
`block_size` is given). `maxsim_topk` keeps a running top-k, so the ``(Q, N)`` score matrix is
never materialised.

Computation happens on `device` (default: the documents' device); queries are moved there, and
document blocks too when they live elsewhere (e.g. a CPU memory map scored on CUDA). Results are
returned on that device, scores in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DimensionMismatchError, InvalidInputError

# Bytes of float32 temporaries per block. On CPU, 32 MiB measured as fast as anything larger
# (benchmarks/bench_maxsim.py) while bounding memory; GPUs want bigger blocks to amortise launches.
CPU_MEMORY_BUDGET = 32 << 20
GPU_MEMORY_BUDGET = 256 << 20
_SPARSE_FRACTION = 0.5  # below this candidate density, gather candidate rows instead of scanning

RowsAndScores = tuple[torch.Tensor | slice, torch.Tensor]


def _as_queries(queries: torch.Tensor) -> torch.Tensor:
    if queries.dim() == 2:  # one query (m, d)
        queries = queries.unsqueeze(0)
    if queries.dim() != 3:
        raise DimensionMismatchError(
            f"queries must be (Q, m, d) or (m, d), got shape {tuple(queries.shape)}"
        )
    return queries


def _query_weights(
    queries: torch.Tensor,
    query_mask: torch.Tensor | None,
    weights: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Per-query-vector weights ``(Q, m)`` in float32 with masked vectors at 0."""
    Q, m = queries.shape[:2]
    w = torch.ones((Q, m), dtype=torch.float32, device=device)
    if weights is not None:
        weights = _per_query_vector(weights, Q, m, "weights must be (Q, m) = {} or (m,)")
        w = w * weights.to(device=device, dtype=torch.float32)
    if query_mask is not None:
        query_mask = _per_query_vector(query_mask, Q, m, "query_mask must be (Q, m) = {}")
        w = w * query_mask.to(device=device, dtype=torch.bool).float()
    return w


def _per_query_vector(x: Any, Q: int, m: int, expected: str) -> torch.Tensor:
    """Broadcast an ``(m,)`` tensor to ``(Q, m)`` and check the shape."""
    x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0).expand(Q, -1)
    if tuple(x.shape) != (Q, m):
        raise DimensionMismatchError(f"{expected.format((Q, m))}, got {tuple(x.shape)}")
    return x


def _candidate_rows(candidates: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Sorted candidate row ids when the mask is sparse enough to gather them, else None (scan
    everything and mask afterwards). Validates the mask."""
    if candidates is None:
        return None
    mask = torch.as_tensor(candidates)
    if mask.dtype != torch.bool or mask.dim() != 1 or mask.numel() != n:
        raise DimensionMismatchError(
            f"candidates must be a bool tensor of shape ({n},), got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    mask = mask.cpu()
    if int(mask.sum()) < _SPARSE_FRACTION * n:
        return torch.nonzero(mask, as_tuple=False).flatten()
    return None


def _auto_block(per_row_bytes: int, memory_budget: int | None, n: int, device: torch.device) -> int:
    if memory_budget is None:
        memory_budget = GPU_MEMORY_BUDGET if device.type == "cuda" else CPU_MEMORY_BUDGET
    return max(1, min(n, memory_budget // max(per_row_bytes, 1))) if n else 1


class _Scratch:
    """Reused float32 buffers. Allocating a fresh block per step costs more than the scan on
    CPU (page faults on first touch), so conversion and matmul outputs go into these."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[str, torch.Tensor] = {}

    def get(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        device = self.device if device is None else device
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.shape[0] < shape[0]
            or buf.shape[1:] != shape[1:]
            or buf.dtype != dtype
            or buf.device != device
        ):
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[: shape[0]]

    def gather(self, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``src[idx]`` (rows) into a reused buffer of src's dtype and device."""
        out = self.get("gather", (idx.numel(), *src.shape[1:]), src.dtype, src.device)
        return torch.index_select(src, 0, idx.to(src.device), out=out)

    def as_float(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (2-D) as float32 on the compute device, copying into scratch only if needed."""
        if x.dtype == torch.float32 and x.device == self.device and x.is_contiguous():
            return x
        buf = self.get("x", tuple(x.shape))
        buf.copy_(x)
        return buf

    def sim(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``x @ q.T`` into scratch; `q` is (Q*m, d) contiguous, so BLAS reads it transposed
        (measurably faster on CPU than multiplying by a contiguous (d, Q*m) copy)."""
        out = self.get("sim", (x.shape[0], q.shape[0]))
        return torch.mm(x, q.t(), out=out)


def _reduce(best: torch.Tensor, empty: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """``(B, Q*m)`` per-query-vector maxima -> ``(Q, B)`` scores; empty docs score -inf."""
    B = best.shape[0]
    Q, m = w.shape
    if empty is not None and bool(empty.any()):
        best = best.masked_fill(empty.unsqueeze(1), 0.0)
    scores = (best.view(B, Q, m) * w).sum(-1).t()
    if empty is not None:
        scores = scores.masked_fill(empty.unsqueeze(0), float("-inf"))
    return scores


def _check_docs(queries: torch.Tensor, docs: torch.Tensor) -> None:
    if docs.dim() != 3:
        raise DimensionMismatchError(f"docs must be (N, p, d), got shape {tuple(docs.shape)}")
    if docs.shape[-1] != queries.shape[-1]:
        raise DimensionMismatchError(
            f"query dim {queries.shape[-1]} != document dim {docs.shape[-1]}"
        )
    if not docs.is_floating_point() or not queries.is_floating_point():
        raise InvalidInputError("queries and docs must be floating-point tensors")


def _iter_fixed(
    queries: torch.Tensor,
    docs: torch.Tensor,
    *,
    query_mask: torch.Tensor | None,
    doc_mask: torch.Tensor | None,
    candidates: torch.Tensor | None,
    block_size: int | None,
    weights: torch.Tensor | None,
    device: torch.device | str | None,
    memory_budget: int | None,
) -> Iterator[RowsAndScores]:
    """Yield (rows, scores (Q, B)) block by block; rows is a slice or a LongTensor."""
    N, p, d = docs.shape
    dev = torch.device(device) if device is not None else docs.device
    q = queries.to(device=dev, dtype=torch.float32)
    Q, m = q.shape[:2]
    q_flat = q.reshape(Q * m, d).contiguous()
    w = _query_weights(q, query_mask, weights, dev)
    scratch = _Scratch(dev)
    if doc_mask is not None:
        doc_mask = torch.as_tensor(doc_mask)
        if tuple(doc_mask.shape) != (N, p):
            raise DimensionMismatchError(
                f"doc_mask must be (N, p) = {(N, p)}, got {tuple(doc_mask.shape)}"
            )
        doc_mask = doc_mask.to(dtype=torch.bool)
    gather = _candidate_rows(candidates, N)
    if block_size is None:
        block_size = _auto_block(p * 4 * (d + Q * m), memory_budget, N, dev)
    if block_size < 1:
        raise InvalidInputError(f"block_size must be positive, got {block_size}")

    def score(block: torch.Tensor, dmask: torch.Tensor | None) -> torch.Tensor:
        B = block.shape[0]
        x = scratch.as_float(block.reshape(B * p, d))
        sim = scratch.sim(x, q_flat).view(B, p, Q * m)
        empty = None
        if dmask is not None:
            dmask = dmask.to(device=dev)
            sim.masked_fill_(~dmask.unsqueeze(-1), float("-inf"))
            empty = ~dmask.any(dim=1)
        return _reduce(sim.amax(dim=1), empty, w)

    if gather is None:
        for start in range(0, N, block_size):
            rows = slice(start, min(N, start + block_size))
            yield rows, score(docs[rows], None if doc_mask is None else doc_mask[rows])
    else:
        for start in range(0, gather.numel(), block_size):
            rows = gather[start : start + block_size]
            block = scratch.gather(docs, rows)
            dmask = None if doc_mask is None else doc_mask.index_select(0, rows.to(doc_mask.device))
            yield rows, score(block, dmask)


def _full(
    blocks: Iterator[RowsAndScores],
    Q: int,
    N: int,
    device: torch.device,
    candidates: torch.Tensor | None,
) -> torch.Tensor:
    out = torch.full((Q, N), float("-inf"), dtype=torch.float32, device=device)
    for rows, scores in blocks:
        out[:, rows.to(device) if isinstance(rows, torch.Tensor) else rows] = scores
    if candidates is not None:
        out[:, ~torch.as_tensor(candidates).to(device)] = float("-inf")
    return out


def _topk(
    blocks: Iterator[RowsAndScores],
    Q: int,
    k: int,
    device: torch.device,
    candidates: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if k < 0:
        raise InvalidInputError(f"k must be non-negative, got {k}")
    best_s = torch.empty((Q, 0), dtype=torch.float32, device=device)
    best_i = torch.empty((Q, 0), dtype=torch.long, device=device)
    cand = None if candidates is None else torch.as_tensor(candidates).to(device)
    seen = 0
    for rows, scores in blocks:
        if isinstance(rows, slice):
            idx = torch.arange(rows.start, rows.stop, device=device)
            if cand is not None:  # dense scan: drop non-candidates inside the block
                keep = cand[rows]
                idx, scores = idx[keep], scores[:, keep]
        else:
            idx = rows.to(device)
        seen += idx.numel()
        if idx.numel() == 0:
            continue
        all_s = torch.cat([best_s, scores], dim=1)
        all_i = torch.cat([best_i, idx.unsqueeze(0).expand(Q, -1)], dim=1)
        kk = min(k, all_s.shape[1])
        best_s, pos = torch.topk(all_s, kk, dim=1)
        best_i = torch.gather(all_i, 1, pos)
    return best_s, best_i


def maxsim_scores(
    queries: torch.Tensor,
    docs: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    block_size: int | None = None,
    weights: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """MaxSim of every query ``(Q, m, d)`` against every document ``(N, p, d)`` -> ``(Q, N)``.

    `query_mask` ``(Q, m)`` / `doc_mask` ``(N, p)``: False marks padding vectors. `weights`
    ``(Q, m)`` or ``(m,)`` scales each query vector's max. Non-`candidates` rows, and documents
    whose vectors are all masked, score -inf. Sparse candidate sets are gathered, so only
    candidate rows are read.
    """
    queries = _as_queries(queries)
    _check_docs(queries, docs)
    dev = torch.device(device) if device is not None else docs.device
    blocks = _iter_fixed(
        queries,
        docs,
        query_mask=query_mask,
        doc_mask=doc_mask,
        candidates=candidates,
        block_size=block_size,
        weights=weights,
        device=dev,
        memory_budget=memory_budget,
    )
    return _full(blocks, queries.shape[0], docs.shape[0], dev, candidates)


def maxsim_topk(
    queries: torch.Tensor,
    docs: torch.Tensor,
    k: int,
    *,
    query_mask: torch.Tensor | None = None,
    doc_mask: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    block_size: int | None = None,
    weights: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best `k` documents per query: ``(scores (Q, k'), row indices (Q, k'))``, best first, where
    ``k' = min(k, number of candidate rows)``. Non-candidates are never returned; candidates
    whose vectors are all masked can be, last, with score -inf."""
    queries = _as_queries(queries)
    _check_docs(queries, docs)
    dev = torch.device(device) if device is not None else docs.device
    blocks = _iter_fixed(
        queries,
        docs,
        query_mask=query_mask,
        doc_mask=doc_mask,
        candidates=candidates,
        block_size=block_size,
        weights=weights,
        device=dev,
        memory_budget=memory_budget,
    )
    return _topk(blocks, queries.shape[0], k, dev, candidates)


# ---------------------------------------------------------------------- variable-length docs
def _check_offsets(flat_docs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    offsets = torch.as_tensor(offsets).to(device="cpu", dtype=torch.long)
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise DimensionMismatchError("offsets must be a 1-D tensor of length N+1")
    if int(offsets[0]) != 0 or int(offsets[-1]) != flat_docs.shape[0]:
        raise DimensionMismatchError(
            f"offsets must start at 0 and end at the number of vectors ({flat_docs.shape[0]}), "
            f"got {int(offsets[0])}..{int(offsets[-1])}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise DimensionMismatchError("offsets must be non-decreasing")
    return offsets


def _iter_varlen(
    queries: torch.Tensor,
    flat_docs: torch.Tensor,
    offsets: torch.Tensor,
    *,
    query_mask: torch.Tensor | None,
    candidates: torch.Tensor | None,
    block_size: int | None,
    weights: torch.Tensor | None,
    device: torch.device,
    memory_budget: int | None,
) -> Iterator[RowsAndScores]:
    """Blocks of whole documents holding about `block_size` vectors each."""
    n = offsets.numel() - 1
    d = flat_docs.shape[1]
    q = queries.to(device=device, dtype=torch.float32)
    Q, m = q.shape[:2]
    q_flat = q.reshape(Q * m, d).contiguous()
    w = _query_weights(q, query_mask, weights, device)
    scratch = _Scratch(device)
    gather = _candidate_rows(candidates, n)
    if block_size is None:
        block_size = _auto_block(4 * (d + Q * m), memory_budget, max(1, flat_docs.shape[0]), device)
    if block_size < 1:
        raise InvalidInputError(f"block_size must be positive, got {block_size}")
    lengths = offsets[1:] - offsets[:-1]

    def score(x: torch.Tensor, local_offsets: torch.Tensor) -> torch.Tensor:
        sim = scratch.sim(scratch.as_float(x), q_flat)  # (T_b, Q*m)
        lo = local_offsets.to(device)
        best = torch.segment_reduce(sim, "max", offsets=lo, axis=0)  # empty segments: -inf
        empty = lo[1:] == lo[:-1]
        return _reduce(best, empty, w)

    if gather is None:
        start = 0
        while start < n:
            # as many whole documents as fit in block_size vectors (at least one)
            limit = int(offsets[start]) + block_size
            stop = int(torch.searchsorted(offsets, limit, right=True)) - 1
            stop = min(n, max(stop, start + 1))
            lo = offsets[start : stop + 1] - offsets[start]
            x = flat_docs[int(offsets[start]) : int(offsets[stop])]
            yield slice(start, stop), score(x, lo)
            start = stop
    else:
        cum = torch.cumsum(lengths[gather], 0)
        start = 0
        while start < gather.numel():
            base = int(cum[start - 1]) if start else 0
            stop = int(torch.searchsorted(cum, base + block_size, right=True))
            stop = min(gather.numel(), max(stop, start + 1))
            rows = gather[start:stop]
            lens = lengths[rows]
            lo = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)])
            first = offsets[rows]
            tok = torch.repeat_interleave(first - lo[:-1], lens) + torch.arange(int(lo[-1]))
            x = scratch.gather(flat_docs, tok)
            yield rows, score(x, lo)
            start = stop


def _varlen_blocks(
    queries: torch.Tensor,
    flat_docs: torch.Tensor,
    offsets: torch.Tensor,
    device: torch.device | str | None,
    **kwargs: Any,
) -> tuple[Iterator[RowsAndScores], int, int, torch.device]:
    """Validate varlen inputs once for both public entry points; returns (blocks, Q, N, dev)."""
    queries = _as_queries(queries)
    if flat_docs.dim() != 2 or flat_docs.shape[1] != queries.shape[-1]:
        raise DimensionMismatchError(
            f"flat_docs must be (T, {queries.shape[-1]}), got {tuple(flat_docs.shape)}"
        )
    offsets = _check_offsets(flat_docs, offsets)
    dev = torch.device(device) if device is not None else flat_docs.device
    blocks = _iter_varlen(queries, flat_docs, offsets, device=dev, **kwargs)
    return blocks, queries.shape[0], offsets.numel() - 1, dev


def maxsim_varlen(
    queries: torch.Tensor,
    flat_docs: torch.Tensor,
    offsets: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    block_size: int | None = None,
    weights: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """MaxSim against variable-length documents stored flat: document i is
    ``flat_docs[offsets[i]:offsets[i+1]]`` (the store's varlen layout) -> ``(Q, N)``.

    `block_size` counts document vectors per block here. Empty documents and non-candidates
    score -inf.
    """
    blocks, Q, N, dev = _varlen_blocks(
        queries,
        flat_docs,
        offsets,
        device,
        query_mask=query_mask,
        candidates=candidates,
        block_size=block_size,
        weights=weights,
        memory_budget=memory_budget,
    )
    return _full(blocks, Q, N, dev, candidates)


def maxsim_varlen_topk(
    queries: torch.Tensor,
    flat_docs: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    *,
    query_mask: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    block_size: int | None = None,
    weights: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`maxsim_varlen` with a running top-k (see `maxsim_topk`)."""
    blocks, Q, _, dev = _varlen_blocks(
        queries,
        flat_docs,
        offsets,
        device,
        query_mask=query_mask,
        candidates=candidates,
        block_size=block_size,
        weights=weights,
        memory_budget=memory_budget,
    )
    return _topk(blocks, Q, k, dev, candidates)
