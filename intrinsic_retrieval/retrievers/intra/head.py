"""The retrieval head: m trainable retrieval-token embeddings and per-(layer, head) weights alpha.

It is the only trained part of INTRA (the backbone stays frozen). It persists as safetensors,
either inside the store (``aux/intra_head``) or as a standalone file, with the fingerprints of the
model and of the store recipe it was trained for, so a head can never silently be applied to
another backbone or to vectors pooled another way.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InvalidInputError, ModelMismatchError, StoreCorruptedError
from ...models.query_lora import check_low_rank, init_low_rank, low_rank_update

AUX_NAME = "intra_head"
_FORMAT = "intrinsic-retrieval/intra-head/v1"

#: phrase whose decoder embeddings seed the retrieval tokens (cycled to length m)
SEED_PHRASE = "retrieve the relevant evidence passage"


class RetrievalHead(nn.Module):
    """``tokens (m, d_emb)`` appended to the decoder input; ``alpha (L, H)`` weights the
    per-layer, per-head MaxSim terms; optionally a low-rank update of every decoder layer's
    query projection (``lora_a (L, r, d_in)``, ``lora_b (L, d_out, r)``), active only in the
    retrieval pass: training more than the paper's recipe, with the backbone, the store and
    generation untouched."""

    def __init__(
        self,
        tokens: torch.Tensor,
        alpha: torch.Tensor,
        *,
        trained: bool = False,
        lora_a: torch.Tensor | None = None,
        lora_b: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens.detach().float().clone())
        self.alpha = nn.Parameter(alpha.detach().float().clone())
        self.lora_a: nn.Parameter | None = None
        self.lora_b: nn.Parameter | None = None
        if lora_a is not None and lora_b is not None:
            self.lora_a = nn.Parameter(lora_a.detach().float().clone())
            self.lora_b = nn.Parameter(lora_b.detach().float().clone())
        self.trained = trained
        self.binding: dict[str, Any] = {}

    @property
    def m(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_a is None else int(self.lora_a.shape[1])

    def add_lora(self, query_projs: list[nn.Module], rank: int, *, seed: int = 0) -> None:
        """Start a rank-`rank` update of each layer's query projection (B = 0: no change yet)."""
        a, b = init_low_rank(query_projs, rank, seed=seed)
        self.lora_a, self.lora_b = nn.Parameter(a), nn.Parameter(b)

    def query_lora(self, query_projs: list[nn.Module]) -> contextlib.AbstractContextManager:
        """Within the block each query projection adds ``x A_l^T B_l^T`` (no-op without LoRA)."""
        return low_rank_update(query_projs, self.lora_a, self.lora_b)

    @classmethod
    def initial(
        cls,
        embeddings: nn.Module,
        tokenizer: Any,
        m: int,
        n_layers: int,
        n_heads: int,
        *,
        seed: int = 0,
    ) -> RetrievalHead:
        """Tokens start at the decoder embeddings of `SEED_PHRASE` (plus tiny seeded noise so no
        two tokens are identical); alpha starts uniform at 1 / (L * H)."""
        if m < 1:
            raise InvalidInputError(f"retrieval_tokens must be >= 1, got {m}")
        ids = tokenizer(SEED_PHRASE, add_special_tokens=False)["input_ids"] or [0]
        ids = torch.tensor([ids[i % len(ids)] for i in range(m)], dtype=torch.long)
        weight = embeddings.weight
        with torch.no_grad():
            base = embeddings(ids.to(weight.device)).float().cpu()
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(base.shape, generator=gen) * base.std() * 0.01
        alpha = torch.full((n_layers, n_heads), 1.0 / (n_layers * n_heads))
        return cls(base + noise, alpha)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}

    def meta(self) -> dict[str, str]:
        return {"format": _FORMAT, "trained": json.dumps(self.trained), **self.binding}

    def save(self, path: str | PathLike[str]) -> None:
        """Write the head to a standalone safetensors file (atomically: a crash mid-write
        leaves any earlier file whole)."""
        from ...store.shards import write_safetensors

        write_safetensors(Path(path), self.state(), self.meta())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RetrievalHead:
        if "tokens" not in tensors or "alpha" not in tensors or meta.get("format") != _FORMAT:
            raise StoreCorruptedError("intra head", "not an INTRA retrieval head")
        head = cls(
            tensors["tokens"],
            tensors["alpha"],
            trained=json.loads(meta.get("trained", "false")),
            lora_a=tensors.get("lora_a"),
            lora_b=tensors.get("lora_b"),
        )
        head.binding = {k: str(v) for k, v in meta.items() if k not in ("format", "trained")}
        return head

    @classmethod
    def load(cls, path: str | PathLike[str]) -> RetrievalHead:
        from ...store.shards import read_safetensors

        path = Path(path)
        if not path.exists():
            raise InvalidInputError(f"no retrieval head at {path}")
        return cls.from_state(*read_safetensors(path))

    def check(
        self,
        *,
        model: str,
        recipe: str,
        store: str,
        where: object,
        shape: tuple[int, int],
        dim: int,
        query_projs: list[nn.Module] | None = None,
    ) -> None:
        """Refuse a head made for another model or recipe; warn if trained on another corpus."""
        if self.binding.get("model") not in (None, model):
            raise ModelMismatchError(where, expected=model, found=self.binding["model"])
        if self.binding.get("recipe") not in (None, recipe):
            raise ModelMismatchError(
                where,
                expected=recipe,
                found=self.binding["recipe"],
                what="store recipe",
                hint="the head was trained on a store built with other options (pooled, "
                "store_dtype, pooled_dtype or max_length); build this store with the same ones",
            )
        if tuple(self.alpha.shape) != shape or self.tokens.shape[1] != dim:
            raise ModelMismatchError(
                where,
                expected=f"alpha{shape}/dim{dim}",
                found=f"alpha{tuple(self.alpha.shape)}/dim{self.tokens.shape[1]}",
            )
        if self.lora_a is not None and self.lora_b is not None:
            check_low_rank(query_projs or [], self.lora_a, self.lora_b, where)
        if self.binding.get("store") not in (None, store):
            warnings.warn(
                f"retrieval head {where} was trained on another store (corpus); model and recipe "
                "match, so it is used as is",
                stacklevel=3,
            )
