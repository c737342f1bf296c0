"""`fit`: train the retrieval tokens and alpha with the paper's soft cross-entropy (sec. 3.2).

For query x with oracle chunks O: ``loss = -(1/|O|) sum_{c in O} log softmax_c(S(x, .))`` where S
is the INTRA score of Eq. 3 (pooled vectors, Reverse-QWK folded queries, alpha-weighted MaxSim).
The backbone is frozen; gradients reach only the m token embeddings (through the decoder's
retrieval pass) and alpha. The softmax runs over the whole corpus when it has at most
`n_candidates` chunks, otherwise over `n_candidates` chunks, half the best of the encoder-side
stage (hard negatives) and half drawn uniformly from the rest (redrawn every epoch), plus the
positives: the paper's full-corpus partition function is then approximated, which is what makes
training tractable on CPU. The uniform half matters: with hard negatives alone, the positives
that the encoder stage misses are the only candidates from outside its top list, and the head
learns to prefer "not liked by the encoder stage", which does not rank a whole corpus (measured
with Gemma 3: training loss fell while full-corpus nDCG@10 stayed at chance).

With ``lora_rank`` the head also carries a low-rank update of the decoder's query projections
(trained with it; see `RetrievalHead`). The loop, checkpoints and resumption are the library's
one training loop (`intrinsic_retrieval.training`): a run with the same data and settings resumes
from its last checkpoint and ends where an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...errors import InvalidInputError, UnknownIdError
from ...training import (
    FitConfig,
    FitReport,
    labeled_pairs,
    parameter_counts,
    run_field,
    step_seed,
    train,
)
from .qwk import score_pooled

if TYPE_CHECKING:
    from .retriever import IntraRetriever


@dataclass
class IntraFitConfig(FitConfig):
    """`IntraRetriever.fit` settings: the softmax runs over `n_candidates` chunks (all of them
    when the corpus is smaller); ``lora_rank > 0`` also trains a rank-`lora_rank` update of
    every decoder layer's query projection, used only by the retrieval pass (the backbone, the
    store and generation stay as they are)."""

    n_candidates: int = run_field(256)
    lora_rank: int = run_field(0)
    lr: float = run_field(3e-3)
    checkpoint_every: int = 20

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.n_candidates, int) or self.n_candidates < 1:
            raise InvalidInputError(f"n_candidates must be an int >= 1, got {self.n_candidates!r}")
        if (
            not isinstance(self.lora_rank, int)
            or isinstance(self.lora_rank, bool)
            or self.lora_rank < 0
        ):
            raise InvalidInputError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")


def examples(r: IntraRetriever, queries: Any, qrels: Any) -> list[tuple[str, list[int]]]:
    """``[(query, positive rows)]``; a document id stands for all its chunks."""
    out: list[tuple[str, list[int]]] = []
    missing: list[str] = []
    for text, ids in labeled_pairs(queries, qrels):
        rows = r.store.rows_for_ids(ids)
        if not rows:
            missing.extend(ids[:1])
            continue
        r.check_query(text)
        out.append((text, rows))
    if not out:
        raise UnknownIdError(
            f"no training example has a positive chunk in the store (e.g. {missing[:3]})"
        )
    return out


def _data_hash(examples: Sequence[tuple[str, list[int]]], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text, rows in examples:
        h.update(text.encode())
        h.update(json.dumps(rows).encode())
    return h.hexdigest()


def _candidates(
    live: torch.Tensor, top: torch.Tensor, positives: list[int], n: int, seed: int
) -> torch.Tensor:
    """`top` (encoder-stage hard negatives) + uniform draws from the other live rows up to `n`
    + every positive, without repeats."""
    taken = torch.zeros_like(live)
    taken[top] = True
    rest = torch.nonzero(live & ~taken, as_tuple=False).flatten()
    k = max(0, min(n - int(top.numel()), int(rest.numel())))
    pick = torch.randperm(int(rest.numel()), generator=torch.Generator().manual_seed(seed))[:k]
    cand = torch.cat([top, rest[pick]])
    seen = set(cand.tolist())
    extra = torch.tensor([p for p in positives if p not in seen], dtype=torch.long)
    return torch.cat([cand, extra])


def fit(r: IntraRetriever, queries: Any, qrels: Any, cfg: IntraFitConfig) -> FitReport:
    """Train the retrieval head (tokens, alpha, optional query LoRA); the trained head is
    written to the store (``aux/intra_head``). A run stopped early (`max_steps`, time budget)
    keeps its head untrained until a later call completes it from the checkpoint."""
    if queries is None:
        raise InvalidInputError("INTRA's fit needs labeled queries (queries and qrels)")
    assert r.head is not None
    data = examples(r, queries, qrels)
    head = r.head
    if cfg.lora_rank and head.lora_rank != cfg.lora_rank:
        head.add_lora(r.query_projs(), cfg.lora_rank, seed=cfg.seed)
    settings = {
        "k0": r.k0, "m": r.m, "rows": r.store.num_rows, "query_positions": r.query_positions,
        "lora_rank": head.lora_rank, "c0_score": r.c0_score,
    }  # fmt: skip
    live = r.store.live_mask()
    n_live = int(live.sum())
    pooled, rnorm = r.pooled_vectors(), r.key_rnorms()
    # the encoder-side stage does not depend on the head: C0 and hard negatives once
    prep: list[tuple[list[int], torch.Tensor]] = []
    for text, _rows in data:
        top, _ = r.initial_context(
            r.query_states(text), live, max(r.k0, min(cfg.n_candidates // 2, n_live))
        )
        prep.append((top[: r.k0].tolist(), top))
    everything = torch.nonzero(live, as_tuple=False).flatten()

    def loss_fn(batch: Sequence[int], step: int) -> torch.Tensor:
        total = torch.zeros(())
        for i in batch:
            text, pos = data[i]
            c0, top = prep[i]
            cand = (
                everything
                if n_live <= cfg.n_candidates
                else _candidates(live, top, pos, cfg.n_candidates, step_seed(cfg.seed, step) + i)
            )
            folded = r.retrieval_pass(text, c0, head)
            scores = score_pooled(
                folded, head.alpha, pooled[cand], r.layers, None if rnorm is None else rnorm[cand]
            )
            target = torch.isin(cand, torch.tensor(pos, dtype=torch.long))
            total = total - torch.log_softmax(scores, 0)[target].mean()
        return total / len(batch)

    for p in head.parameters():
        p.requires_grad_(True)
    modules = {"head": head}
    counts = parameter_counts(modules)
    report = FitReport(
        num_examples=len(data), trainable_params=counts["trainable"], total_params=counts["total"]
    )
    r.model.train(False)
    try:
        train(
            modules, loss_fn, list(range(len(data))), cfg,
            fingerprints={
                "model": r.fingerprint, "data": _data_hash(data, settings), "run": cfg.run_hash()
            },
            report=report, desc="fit (intra)",
        )  # fmt: skip
    finally:
        for p in head.parameters():
            p.requires_grad_(False)
    if report.completed:
        head.trained = True
    if report.steps > (report.resumed_from_step or 0) or head.trained:
        r.save_head()
    return report
