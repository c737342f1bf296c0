"""Routing-keys storage: later layers' keys/values recomputed for the routed documents only.

A routing-keys store holds, per block, keys of layers ``0..r`` and values of layers ``0..r-1``
(r = the routing layer) plus the token ids. Layers below r attend to every candidate from those
stored tensors; at layer r the candidates are routed by QK-MaxSim on the stored keys, and only the
routed blocks are attended to from there on. Their keys/values of layers ``r..L-1`` are
recomputed by prefilling the stored token ids — exact, because a block's KV depends on nothing but
its own tokens — and rounded to the store's `kv_dtype`, so results match a full store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...models.architectures import DecoderOnlyArch
from ...models.quant import quantize_int8
from .attention import pack_layer
from .prefill import prefill_blocks

#: one recomputed block in storage form: k, v ``(T, L', Hkv, D)`` and int8 scales (or None)
Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def to_storage(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x` as a store holds it: float16/float32, or int8 codes with per-vector float16 scales."""
    if kv_dtype == "int8":
        return quantize_int8(x)
    return x.to(torch.float16 if kv_dtype == "float16" else torch.float32), None


class BlockCache:
    """Recomputed blocks by store row, least recently used first out.

    `fetch` with ``trim=True`` (once per pass, on the routed set) evicts beyond `capacity`, never
    the rows just fetched, so a pass always holds its whole routed set; ``trim=False`` only adds.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._items: OrderedDict[int, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, row: int) -> bool:
        return row in self._items

    def clear(self) -> None:
        self._items.clear()

    def fetch(
        self,
        rows: Sequence[int],
        compute: Callable[[list[int]], list[Entry]],
        *,
        trim: bool = False,
    ) -> list[Entry]:
        missing = [r for r in dict.fromkeys(rows) if r not in self._items]
        if missing:
            self._items.update(zip(missing, compute(missing), strict=True))
        for r in rows:
            self._items.move_to_end(r)
        if trim:
            keep = set(rows)
            while len(self._items) > self.capacity and next(iter(self._items)) not in keep:
                self._items.popitem(last=False)
        return [self._items[r] for r in rows]


class RecomputedKV:
    """The query pass's corpus for a routing-keys store: stored layers (< r, and layer r's keys)
    for every block from `stored`; layers ``r..num_layers-1`` recomputed from token ids."""

    def __init__(
        self,
        stored: Any,
        arch: DecoderOnlyArch,
        token_ids: Callable[[list[int]], list[list[int]]],
        *,
        route_layer: int,
        num_layers: int,
        kv_dtype: str,
        cache: BlockCache,
        prefill_batch: int = 8,
    ) -> None:
        self.stored, self.arch, self.token_ids = stored, arch, token_ids
        self.route_layer, self.num_layers = int(route_layer), int(num_layers)
        self.kv_dtype, self.cache, self.prefill_batch = kv_dtype, cache, int(prefill_batch)
        self.lengths = stored.lengths
        self.recomputed_blocks = 0  # blocks prefilled at query time so far (for measurements)

    def __len__(self) -> int:
        return len(self.lengths)

    def _compute(self, rows: list[int]) -> list[Entry]:
        with torch.inference_mode():
            kv = prefill_blocks(
                self.arch, self.token_ids(rows), self.num_layers, batch_size=self.prefill_batch
            )
        self.recomputed_blocks += len(rows)
        out: list[Entry] = []
        for k, v in kv:
            kq, ks = to_storage(k[:, self.route_layer :].cpu(), self.kv_dtype)
            vq, vs = to_storage(v[:, self.route_layer :].cpu(), self.kv_dtype)
            out.append((kq, vq, ks, vs))
        return out

    def prepare(self, docs: torch.Tensor) -> None:
        """Make sure the routed blocks are recomputed (in prefill batches) before the pass reads
        them layer by layer; called by `query_pass` once routing has decided."""
        self.cache.fetch(docs.tolist(), self._compute, trim=True)

    def recomputed(self, docs: torch.Tensor) -> list[Entry]:
        return self.cache.fetch(docs.tolist(), self._compute)

    def _gather(
        self, layer: int, docs: torch.Tensor, device: torch.device, values: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        entries = self.recomputed(docs)
        li = layer - self.route_layer
        int8 = entries[0][2] is not None
        k = pack_layer([e[0] for e in entries], [e[2] for e in entries] if int8 else None, li)
        v = None
        if values:
            v = pack_layer([e[1] for e in entries], [e[3] for e in entries] if int8 else None, li)
        return k.to(device), None if v is None else v.to(device), self.lengths[docs]

    def batch(
        self, layer: int, docs: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer < self.route_layer:
            return self.stored.batch(layer, docs, device)
        k, v, lengths = self._gather(layer, docs, device, values=True)
        assert v is not None
        return k, v, lengths

    def keys(
        self, layer: int, docs: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer <= self.route_layer:
            return self.stored.keys(layer, docs, device)
        k, _, lengths = self._gather(layer, docs, device, values=False)
        return k, lengths
