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
from collections.abc import Iterator
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
        if rank < 1:
            raise InvalidInputError(f"lora_rank must be >= 1, got {rank}")
        d_in = {int(q.in_features) for q in query_projs}
        d_out = {int(q.out_features) for q in query_projs}
        if len(d_in) != 1 or len(d_out) != 1:
            raise InvalidInputError("query LoRA needs equally shaped query projections")
        gen = torch.Generator().manual_seed(seed)
        n, i, o = len(query_projs), d_in.pop(), d_out.pop()
        a = torch.randn(n, rank, i, generator=gen) / i**0.5
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(n, o, rank))

    @contextlib.contextmanager
    def query_lora(self, query_projs: list[nn.Module]) -> Iterator[None]:
        """Within the block each query projection adds ``x A_l^T B_l^T`` (no-op without LoRA)."""
        if self.lora_a is None or self.lora_b is None:
            yield
            return
        if len(query_projs) != self.lora_a.shape[0]:
            raise ModelMismatchError(
                "query LoRA", expected=f"{len(query_projs)} layers", found=str(self.lora_a.shape)
            )
        a, b = self.lora_a, self.lora_b
        handles = []
        for i, proj in enumerate(query_projs):

            def hook(_m: nn.Module, args: tuple, out: torch.Tensor, i: int = i) -> torch.Tensor:
                x = args[0]
                delta = (x.float() @ a[i].to(x.device).t()) @ b[i].to(x.device).t()
                return out + delta.to(out.dtype)

            handles.append(proj.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

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
        """Write the head to a standalone safetensors file."""
        save_file(self.state(), str(path), metadata=self.meta())

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
        query_projs: list[nn.Module] | None = None,
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
        if self.lora_a is not None and self.lora_b is not None:
            projs = query_projs or []
            want = (
                (len(projs), int(projs[0].in_features), int(projs[0].out_features))
                if projs
                else None
            )
            got = (self.lora_a.shape[0], self.lora_a.shape[2], self.lora_b.shape[1])
            if want != tuple(got):
                raise ModelMismatchError(where, expected=f"query LoRA {want}", found=str(got))
        if self.binding.get("store") not in (None, store):
            warnings.warn(
                f"retrieval head {where} was trained on another store (corpus); model and recipe "
                "match, so it is used as is",
                stacklevel=3,
            )
