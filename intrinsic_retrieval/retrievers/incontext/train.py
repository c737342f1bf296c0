"""Fine-tuning an LM to emit document codes (BlockSearch training, small-scale version).

Each step takes a batch of queries, builds an in-batch corpus (their positives plus other stored
documents drawn for that step), draws *fresh random codes* for that corpus (so the model learns
to copy the code of the block it attends to, not to memorise code-document pairs), prefills the
blocks with gradients, runs the query pass over them and takes cross-entropy on the positive's
code digits. LoRA (peft) when requested; otherwise all weights train. The loop, checkpoints,
time budget and report are the library's one training loop (`intrinsic_retrieval.training`).

After training the stored blocks are stale (they were made by the old weights), so the index is
rebuilt in place from the stored texts with the new model's fingerprint (`reindex`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...errors import InvalidInputError, UnknownIdError
from ...models.architectures import decoder_only_for
from ...models.fingerprint import model_fingerprint
from ...training import (
    FitConfig,
    FitReport,
    labeled_pairs,
    parameter_counts,
    run_field,
    step_seed,
    train,
)
from .attention import CorpusKV, query_pass
from .prefill import prefill_blocks

if TYPE_CHECKING:
    from .retriever import InContextRetriever


@dataclass
class InContextFitConfig(FitConfig):
    """`InContextRetriever.fit` settings: `corpus_size` documents in each step's in-batch corpus
    (the batch's positives plus drawn negatives); `lora` trains a rank-`lora_rank` LoRA on the
    attention projections instead of every weight; `save_model_to` saves the tuned model there
    (and records it as the retriever's model); `reindex` rebuilds the index afterwards."""

    corpus_size: int = run_field(16)
    lora: bool = run_field(False)
    lora_rank: int = run_field(8)
    lr: float = run_field(1e-4)
    batch_size: int = run_field(4)
    save_model_to: str | None = None
    reindex: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.corpus_size, int) or self.corpus_size < 1:
            raise InvalidInputError(f"corpus_size must be an int >= 1, got {self.corpus_size!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise InvalidInputError(f"lora_rank must be an int >= 1, got {self.lora_rank!r}")


def fit_codes(
    r: InContextRetriever, queries: Any, qrels: Any, cfg: InContextFitConfig
) -> FitReport:
    """Train `r.model` to write the code of each query's positive document (the first stored
    one of its positives)."""
    if queries is None:
        raise InvalidInputError("in-context fit needs labeled queries (queries and qrels)")
    docs = {d.id: d for d in r.documents()}
    pairs = []
    for q, ids in labeled_pairs(queries, qrels):
        known = [i for i in ids if i in docs]
        if not known:
            raise UnknownIdError(f"none of the positives {ids[:3]} of query {q[:40]!r} is stored")
        pairs.append((q, known[0]))
    if not pairs:
        raise InvalidInputError("fit needs at least one query with a positive document")
    model = r.model
    peft_model = None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=2 * cfg.lora_rank,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                ),
            )
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    all_ids = sorted(docs)

    def loss_fn(batch: Sequence[tuple[str, str]], step: int) -> torch.Tensor:
        rng = random.Random(step_seed(cfg.seed, step))
        pos_ids = list(dict.fromkeys(p for _, p in batch))
        target_of = {p: i for i, p in enumerate(pos_ids)}
        pool = [d for d in all_ids if d not in target_of]
        negs = rng.sample(pool, min(len(pool), max(0, cfg.corpus_size - len(pos_ids))))
        # queries whose positive is shared use the same block; index = code slot
        return _loss_with_order(
            r,
            [q for q, _ in batch],
            [target_of[p] for _, p in batch],
            [docs[p].text for p in pos_ids],
            [docs[d].text for d in negs],
            rng,
        )

    modules = {"model": peft_model if peft_model is not None else model}
    counts = parameter_counts(modules)
    data = hashlib.sha256(json.dumps([pairs, all_ids]).encode()).hexdigest()
    report = FitReport(
        num_examples=len(pairs), trainable_params=counts["trainable"], total_params=counts["total"]
    )
    try:
        train(
            modules, loss_fn, pairs, cfg,
            fingerprints={"model": r.fingerprint, "data": data, "run": cfg.run_hash()},
            report=report, desc="fit (incontext)",
        )  # fmt: skip
    finally:
        model.eval()
    if peft_model is not None:
        r.model = peft_model.merge_and_unload()
        r.arch = decoder_only_for(r.model)
    for p in r.model.parameters():
        p.requires_grad_(False)
    # peft merges through `.data`, which the fingerprint cache cannot see: recompute it
    model_fingerprint(r.model, refresh=True)
    if cfg.save_model_to is not None:
        _save_model(r, cfg.save_model_to)
    if cfg.reindex:
        r.reindex(list(docs.values()))
    return report


def _loss_with_order(
    r: InContextRetriever,
    queries: Sequence[str],
    order: Sequence[int],
    positive_texts: Sequence[str],
    negative_texts: Sequence[str],
    rng: random.Random,
) -> torch.Tensor:
    """Mean cross-entropy of each query's positive code (query i's positive is block
    `order[i]`), corpus = positives + negatives, codes drawn at random for this call."""
    texts = list(positive_texts) + list(negative_texts)
    space = 10**r.code_digits
    if len(texts) > space:
        raise InvalidInputError(f"in-batch corpus of {len(texts)} exceeds {space} codes")
    codes = rng.sample(range(space), len(texts))
    blocks = [b[0] for b in r.encode_blocks(codes, texts)]
    kv = prefill_blocks(r.arch, blocks, r.arch.num_layers, batch_size=len(blocks))
    corpus = CorpusKV([k for k, _ in kv], [v for _, v in kv])
    losses = []
    for q, slot in zip(queries, order, strict=True):
        prompt, _, _, _ = r.format.query(q, r.max_query_tokens)
        target = r.format.code_digit_ids(codes[slot])
        ids = torch.tensor([prompt + target[:-1]], device=r.arch.device)
        res = query_pass(
            r.arch,
            corpus,
            ids,
            q_offset=r.max_doc_tokens,
            num_layers=r.arch.num_layers,
            block_docs=r.block_docs,
            backend=r.attention_backend,
            ssmax=r.ssmax,
            ssmax_count=r.ssmax_count,
        )
        hidden = res.hidden[0, len(prompt) - 1 :]
        logits = r.arch.logits(r.arch.final_norm(hidden)).float()
        losses.append(
            torch.nn.functional.cross_entropy(logits, torch.tensor(target, device=logits.device))
        )
    return torch.stack(losses).mean()


def _save_model(r: InContextRetriever, path: str) -> None:
    cfg = r.model.config
    if getattr(cfg, "quantization_config", None) is not None:  # dequantised GGUF: plain now
        del cfg.quantization_config
    r.model.save_pretrained(path)
    r.tokenizer.save_pretrained(path)
    r.model_name = str(path)
    r.gguf_file = None
