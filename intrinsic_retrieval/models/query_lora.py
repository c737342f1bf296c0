"""A low-rank update of every layer's query projection, active only inside a `with` block.

INTRA (its retrieval pass) and in-context retrieval (its query pass) both train one. Documents'
stored states were made by the untouched model, so adapting only the queries keeps every stored
representation valid, and prefill and generation, which run outside the block, are unchanged.
Layer l's projection adds ``x A_l^T B_l^T``; B starts at zero, so a new update changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import InvalidInputError, ModelMismatchError


def init_low_rank(
    query_projs: list[nn.Module], rank: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (L, rank, d_in), B (L, d_out, rank))`` for `query_projs`: A seeded, B zero."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError(f"lora_rank must be an int >= 1, got {rank!r}")
    d_in = {int(q.in_features) for q in query_projs}
    d_out = {int(q.out_features) for q in query_projs}
    if len(d_in) != 1 or len(d_out) != 1:
        raise InvalidInputError("query LoRA needs equally shaped query projections")
    gen = torch.Generator().manual_seed(seed)
    n, i, o = len(query_projs), d_in.pop(), d_out.pop()
    return torch.randn(n, rank, i, generator=gen) / i**0.5, torch.zeros(n, o, rank)


def check_low_rank(
    query_projs: list[nn.Module], a: torch.Tensor, b: torch.Tensor, where: object
) -> None:
    """`ModelMismatchError` unless (A, B) fit `query_projs` (layers, input and output width)."""
    want = (
        (len(query_projs), int(query_projs[0].in_features), int(query_projs[0].out_features))
        if query_projs
        else None
    )
    got = (int(a.shape[0]), int(a.shape[2]), int(b.shape[1]))
    if want != got:
        raise ModelMismatchError(where, expected=f"query LoRA {want}", found=str(got))


@contextlib.contextmanager
def low_rank_update(
    query_projs: list[nn.Module], a: torch.Tensor | None, b: torch.Tensor | None
) -> Iterator[None]:
    """Within the block each query projection adds ``x A_l^T B_l^T`` (no-op without A, B)."""
    if a is None or b is None:
        yield
        return
    if len(query_projs) != a.shape[0]:
        raise ModelMismatchError(
            "query LoRA", expected=f"{len(query_projs)} layers", found=str(tuple(a.shape))
        )
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


class LowRankUpdate(nn.Module):
    """Trainable ``(A, B)`` of `low_rank_update`, persisted as ``lora_a`` / ``lora_b``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(a.detach().float().clone())
        self.lora_b = nn.Parameter(b.detach().float().clone())

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[1])

    def applied(self, query_projs: list[nn.Module]) -> contextlib.AbstractContextManager:
        return low_rank_update(query_projs, self.lora_a, self.lora_b)

    def state(self) -> dict[str, torch.Tensor]:
        return {"lora_a": self.lora_a.detach().cpu(), "lora_b": self.lora_b.detach().cpu()}
