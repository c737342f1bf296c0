"""The retrieval head: m trainable retrieval-token embeddings and per-(layer, head) weights alpha.

It is the only trained part of INTRA (the backbone stays frozen). It persists as safetensors,
either inside the store (``aux/intra_head``) or as a standalone file, with the fingerprints of the
model and of the store recipe it was trained for, so a head can never silently be applied to
another backbone or to vectors pooled another way.
"""

from __future__ import annotations

import json
import warnings
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import InvalidInputError, ModelMismatchError, StoreCorruptedError

AUX_NAME = "intra_head"
_FORMAT = "intrinsic-retrieval/intra-head/v1"

#: phrase whose decoder embeddings seed the retrieval tokens (cycled to length m)
SEED_PHRASE = "retrieve the relevant evidence passage"


class RetrievalHead(nn.Module):
    """``tokens (m, d_emb)`` appended to the decoder input; ``alpha (L, H)`` weights the
    per-layer, per-head MaxSim terms."""

    def __init__(self, tokens: torch.Tensor, alpha: torch.Tensor, *, trained: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens.detach().float().clone())
        self.alpha = nn.Parameter(alpha.detach().float().clone())
        self.trained = trained
        self.binding: dict[str, Any] = {}

    @property
    def m(self) -> int:
        return int(self.tokens.shape[0])

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
        return {"tokens": self.tokens.detach().cpu(), "alpha": self.alpha.detach().cpu()}

    def meta(self) -> dict[str, str]:
        return {"format": _FORMAT, "trained": json.dumps(self.trained), **self.binding}

    def save(self, path: str | PathLike[str]) -> None:
        """Write the head to a standalone safetensors file."""
        save_file(self.state(), str(path), metadata=self.meta())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RetrievalHead:
        if "tokens" not in tensors or "alpha" not in tensors or meta.get("format") != _FORMAT:
            raise StoreCorruptedError("intra head", "not an INTRA retrieval head")
        head = cls(
            tensors["tokens"], tensors["alpha"], trained=json.loads(meta.get("trained", "false"))
        )
        head.binding = {k: str(v) for k, v in meta.items() if k not in ("format", "trained")}
        return head

    @classmethod
    def load(cls, path: str | PathLike[str]) -> RetrievalHead:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise InvalidInputError(f"no retrieval head at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return cls.from_state(load_file(str(path)), meta)

    def check(
        self,
        *,
        model: str,
        recipe: str,
        store: str,
        where: object,
        shape: tuple[int, int],
        dim: int,
    ) -> None:
        """Refuse a head made for another model or recipe; warn if trained on another corpus."""
        if self.binding.get("model") not in (None, model):
            raise ModelMismatchError(where, expected=model, found=self.binding["model"])
        if self.binding.get("recipe") not in (None, recipe):
            raise ModelMismatchError(where, expected=recipe, found=self.binding["recipe"])
        if tuple(self.alpha.shape) != shape or self.tokens.shape[1] != dim:
            raise ModelMismatchError(
                where,
                expected=f"alpha{shape}/dim{dim}",
                found=f"alpha{tuple(self.alpha.shape)}/dim{self.tokens.shape[1]}",
            )
        if self.binding.get("store") not in (None, store):
            warnings.warn(
                f"retrieval head {where} was trained on another store (corpus); model and recipe "
                "match, so it is used as is",
                stacklevel=3,
            )
