"""Where the query pass reads stored blocks from: one interface, three sources.

* `attention.CorpusKV`: blocks held in memory, layer-major (``kv_source="ram"``, training);
* `StoreKV`: read straight from the store's memory-mapped shards, one block batch at a time
  (``kv_source="mmap"``, the default; nothing corpus-sized in RAM);
* `recompute.RecomputedKV`: a routing-keys store, whose later layers are recomputed for the
  routed blocks (``kv_storage="routing"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ...errors import InvalidInputError
from ..options import check_choice
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


#: how a store lays out each block's keys and values (`InContextRetriever` ``kv_layout``)
KV_LAYOUTS = ("layer", "token")


def layer_name(what: str, layer: int) -> str:
    """The layer-layout store tensor of layer `layer` of `what` ("k", "v", "k_scale", ...)."""
    return f"{what}-{layer}"


def stored_layout(tensors: Any) -> str:
    """The layout of a store holding `tensors` (its tensor names): one tensor "k" per kind is
    the token layout, "k-0", "k-1", ... the layer layout."""
    return "token" if "k" in tensors else "layer"


def check_conversion(source: Any, dest: Any, current: str, target: str) -> None:
    """Refuse a K/V layout conversion that cannot be what the user meant (before any model is
    loaded): an unknown layout, the layout the store already has, or a destination that is the
    source or inside it (the copy would be written into the index it reads)."""
    check_choice("kv_layout", target, KV_LAYOUTS)
    src, out = Path(source).resolve(), Path(dest).resolve()
    if out == src or src in out.parents:
        raise InvalidInputError(
            f"the converted index needs a path outside {src}: the conversion writes a new index"
        )
    if current == target:
        raise InvalidInputError(f"{src} is already in the {target!r} K/V layout")


def kv_tensor_names(
    layout: str, k_layers: int, v_layers: int, int8: bool
) -> dict[str, tuple[str, int | None]]:
    """The store tensors holding a block's keys, values and int8 scales: name -> (what, layer).

    * ``"token"`` (stores built before layouts existed): one tensor per kind, ``(T, L, Hkv, D)``
      per block; reading one layer strides over all the others (layer None);
    * ``"layer"``: one tensor per kind and layer (``k-3`` = keys of layer 3, ``(T, Hkv, D)``),
      so the query pass, which goes layer by layer, reads each layer of a run of consecutive
      blocks as one contiguous slice.
    """
    kinds = [("k", k_layers), ("v", v_layers)]
    if int8:
        kinds += [("k_scale", k_layers), ("v_scale", v_layers)]
    if layout == "token":
        return {what: (what, None) for what, n in kinds if n}
    return {layer_name(what, layer): (what, layer) for what, n in kinds for layer in range(n)}


def layer_tensor(layout: str, what: str, layer: int) -> tuple[str, int | None]:
    """(store tensor, layer to take from it or None) for layer `layer` of `what`."""
    return (what, layer) if layout == "token" else (layer_name(what, layer), None)


def split_layers(
    blocks: Sequence[torch.Tensor], what: str, layout: str
) -> dict[str, list[torch.Tensor]]:
    """Per-block ``(T, L, ...)`` tensors of kind `what` as the store tensors of `layout`."""
    if layout == "token":
        return {what: list(blocks)}
    n = int(blocks[0].shape[1]) if blocks else 0
    return {layer_name(what, layer): [x[:, layer] for x in blocks] for layer in range(n)}


def read_blocks(
    store: Any, layout: str, what: str, layers: int, rows: Sequence[int]
) -> list[torch.Tensor]:
    """Per-block ``(T, L, ...)`` tensors of kind `what` for `rows`, from a store of `layout`."""
    if layout == "token":
        return store.varlen(what, rows)
    per_layer = [store.varlen(layer_name(what, layer), rows) for layer in range(layers)]
    return [torch.stack(parts, 1) for parts in zip(*per_layer, strict=True)]


class StoreKV:
    """`CorpusKV`'s interface read straight from the store's memory-mapped shards, one block
    batch at a time (nothing corpus-sized is held in RAM). With the ``"layer"`` layout a run of
    consecutive blocks is one contiguous slice per layer, converted to float32 in one pass
    instead of a strided gather (docs/incontext.md, "Layout on disk", for what it buys)."""

    def __init__(self, store: Any, int8: bool, layout: str = "token") -> None:
        self.store, self.int8, self.layout = store, int8, layout
        self.lengths = (
            store.varlen_lengths("ids") if store.num_rows else torch.empty(0, dtype=torch.long)
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def _layer(self, name: str, layer: int, docs: torch.Tensor) -> torch.Tensor:
        """One layer of `docs`, packed: consecutive rows are read as one slice of their shard."""
        rows = docs.tolist()
        tensor, pick = layer_tensor(self.layout, name, layer)
        scales = None
        if self.int8:
            scale_tensor, _ = layer_tensor(self.layout, f"{name}_scale", layer)
            scales = self.store.varlen_runs(scale_tensor, rows)
        return pack_layer(self.store.varlen_runs(tensor, rows), scales, pick)

    def batch(self, layer: int, docs: torch.Tensor, device: torch.device):
        k, v = self._layer("k", layer, docs), self._layer("v", layer, docs)
        return k.to(device), v.to(device), self.lengths[docs]

    def keys(self, layer: int, docs: torch.Tensor, device: torch.device):
        """Keys only (routing before attention reads no values)."""
        return self._layer("k", layer, docs).to(device), self.lengths[docs]

    def prepare(self, docs: torch.Tensor) -> None:
        return None
