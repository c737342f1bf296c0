"""Where the query pass reads stored blocks from: one interface, three sources.

* `attention.CorpusKV`: blocks held in memory, layer-major (``kv_source="ram"``, training);
* `StoreKV`: read straight from the store's memory-mapped shards, one block batch at a time
  (``kv_source="mmap"``, the default; nothing corpus-sized in RAM);
* `recompute.RecomputedKV`: a routing-keys store, whose later layers are recomputed for the
  routed blocks (``kv_storage="routing"``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .attention import pack_layer


class KVSource(Protocol):
    """What `attention.query_pass` reads: block lengths, then per layer the keys (routing) or
    keys and values (attention) of a batch of blocks, packed (no padding), in float32, with the
    blocks' lengths."""

    lengths: torch.Tensor  # (n_blocks,) tokens per block

    def __len__(self) -> int: ...

    def batch(
        self, layer: int, docs: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed keys, values ``(S, Hkv, D)`` and lengths ``(n,)`` of blocks `docs`."""
        ...

    def keys(
        self, layer: int, docs: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed keys and lengths only (routing reads no values)."""
        ...

    def prepare(self, docs: torch.Tensor) -> None:
        """Told which blocks routing kept, before their later layers are read."""
        ...


class StoreKV:
    """`CorpusKV`'s interface read straight from the store's memory-mapped shards, one block
    batch at a time (nothing corpus-sized is held in RAM)."""

    def __init__(self, store: Any, int8: bool) -> None:
        self.store, self.int8 = store, int8
        self.lengths = (
            store.varlen_lengths("ids") if store.num_rows else torch.empty(0, dtype=torch.long)
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def _layer(self, name: str, layer: int, docs: torch.Tensor) -> torch.Tensor:
        """One layer of `docs`, packed: consecutive rows are read as one slice of their shard."""
        rows = docs.tolist()
        scales = self.store.varlen_runs(f"{name}_scale", rows) if self.int8 else None
        return pack_layer(self.store.varlen_runs(name, rows), scales, layer)

    def batch(self, layer: int, docs: torch.Tensor, device: torch.device):
        k, v = self._layer("k", layer, docs), self._layer("v", layer, docs)
        return k.to(device), v.to(device), self.lengths[docs]

    def keys(self, layer: int, docs: torch.Tensor, device: torch.device):
        """Keys only (routing before attention reads no values)."""
        return self._layer("k", layer, docs).to(device), self.lengths[docs]

    def prepare(self, docs: torch.Tensor) -> None:
        return None
