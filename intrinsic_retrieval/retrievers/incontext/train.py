"""Training in-context retrieval, two ways (`InContextFitConfig.objective`).

``"readout"`` (BlockSearch's contrastive training of the attention that ranks, on stored blocks):
a rank-`lora_rank` LoRA on every layer's query projection, active only in the query pass, learns
to put the query's attention on its positive document. Each training query attends over a
candidate set of `candidates` stored blocks — its positives, the `hard_negatives` best BM25
documents that are not positives, and random others — exactly as a search over them would
(scalable softmax, readout layers, calibration by the content-free query), and the loss is the
cross-entropy of the calibrated readout scores over that set (temperature `temperature`), plus,
with routing on, the cross-entropy of the routing scores (`route_weight`; QK-MaxSim or the
calibrated mass of the early layers, as `route_score` says). The
documents' stored keys/values come from the untouched model and stay valid: nothing is
re-encoded, and the update persists in the store (`query_lora` aux) and reloads with it.

``"codes"`` fine-tunes the LM to emit document codes (small-scale version). Each step takes a
batch of queries, builds an in-batch corpus (their positives plus other stored
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
from .codes import NULL_QUERY
from .prefill import prefill_blocks

if TYPE_CHECKING:
    from .retriever import InContextRetriever


OBJECTIVES = ("codes", "readout")
#: the store's aux entry holding the trained query LoRA (readout objective)
QUERY_LORA_AUX = "query_lora"


@dataclass
class InContextFitConfig(FitConfig):
    """`InContextRetriever.fit` settings. `objective="readout"`: a query-side LoRA of rank
    `lora_rank` trained on the readout over `candidates` stored blocks per query (its positives,
    `hard_negatives` from BM25, random others), softmax temperature `temperature`, routing loss
    weight `route_weight` (module docstring). `objective="codes"`: `corpus_size` documents in
    each step's in-batch corpus (the batch's positives plus drawn negatives); `lora` trains a
    rank-`lora_rank` LoRA on the attention projections instead of every weight; `save_model_to`
    saves the tuned model there (and records it as the retriever's model); `reindex` rebuilds
    the index afterwards."""

    objective: str = run_field("codes")
    corpus_size: int = run_field(16)
    lora: bool = run_field(False)
    lora_rank: int = run_field(8)
    lr: float = run_field(1e-4)
    batch_size: int = run_field(4)
    candidates: int = run_field(100)
    hard_negatives: int = run_field(50)
    temperature: float = run_field(0.05)
    route_weight: float = run_field(1.0)
    save_model_to: str | None = None
    reindex: bool = True

    def validate(self) -> None:
        super().validate()
        if self.objective not in OBJECTIVES:
            raise InvalidInputError(
                f"objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        for name, low in (("candidates", 2), ("hard_negatives", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {v!r}")
        for name, low in (("temperature", 1e-6), ("route_weight", 0.0)):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v < low:
                raise InvalidInputError(f"{name} must be a number >= {low}, got {v!r}")
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
    r.set_query_lora(None)  # a query LoRA belongs to the old weights
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


def _candidate_plan(
    r: InContextRetriever, pairs: Sequence[tuple[str, list[str]]], cfg: InContextFitConfig
) -> tuple[list[tuple[str, list[int], list[int]]], dict[str, list[int]]]:
    """Per training query: (query, positive rows, BM25 hard-negative rows), and every stored
    document's rows. BM25 (the library's, in memory) ranks the stored documents' texts."""
    from ..bm25 import BM25Retriever

    doc_rows: dict[str, list[int]] = {}
    texts: dict[str, list[str]] = {}
    for row, chunk in r.store.iter_chunks():
        doc_rows.setdefault(chunk.document_id, []).append(row)
        texts.setdefault(chunk.document_id, []).append(chunk.text)
    bm25 = BM25Retriever(show_progress=False)
    bm25.add([{"id": d, "text": " ".join(t)} for d, t in texts.items()])
    depth = min(len(doc_rows), cfg.hard_negatives + max(len(p) for _, p in pairs))
    ranked = bm25.search_batch([q for q, _ in pairs], k=max(1, depth)) if depth else []
    plan = []
    for (q, pos), hits in zip(pairs, ranked or [[] for _ in pairs], strict=True):
        pos_rows = [row for d in pos for row in doc_rows[d]]
        hard = [h.document_id for h in hits if h.document_id not in pos][: cfg.hard_negatives]
        plan.append((q, pos_rows, [row for d in hard for row in doc_rows[d]]))
    return plan, doc_rows


def fit_readout(
    r: InContextRetriever, queries: Any, qrels: Any, cfg: InContextFitConfig
) -> FitReport:
    """Train a query-side LoRA on the readout over candidate sets of stored blocks (module
    docstring); the store is untouched but for the `query_lora` aux entry."""
    from ...models.query_lora import LowRankUpdate, init_low_rank
    from .scoring import readout_scores

    if queries is None:
        raise InvalidInputError("in-context fit needs queries (labeled, or model-written)")
    if r.scoring != "readout":
        raise InvalidInputError("objective='readout' trains the readout: use scoring='readout'")
    stored = r.store.document_ids()
    pairs = []
    for q, ids in labeled_pairs(queries, qrels):
        known = [i for i in ids if i in stored]
        if not known:
            raise UnknownIdError(f"none of the positives {ids[:3]} of query {q[:40]!r} is stored")
        pairs.append((q, known))
    if not pairs:
        raise InvalidInputError("fit needs at least one query with a positive document")
    plan, doc_rows = _candidate_plan(r, pairs, cfg)
    all_rows = sorted(row for rows in doc_rows.values() for row in rows)
    projs = r.query_projs()
    if r.query_lora is not None and r.query_lora.rank == cfg.lora_rank:
        update = LowRankUpdate(r.query_lora.lora_a, r.query_lora.lora_b)  # continue training
    else:
        update = LowRankUpdate(*init_low_rank(projs, cfg.lora_rank, seed=cfg.seed))
    depth = r._depth()
    null_ids, null_sel = r._query_ids(NULL_QUERY)
    previous, r.query_lora = r.query_lora, None  # the update under training applies alone

    def one(q: str, pos: list[int], hard: list[int], rng: random.Random) -> torch.Tensor:
        taken = set(pos) | set(hard)
        room = max(0, cfg.candidates - len(taken))
        rest = [x for x in all_rows if x not in taken]
        docs = torch.tensor(sorted(taken | set(rng.sample(rest, min(room, len(rest))))))
        ids, sel = r._query_ids(q)
        kw = {"mass_layers": r.readout_layers, "route_top": len(docs)}
        with update.applied(projs):
            null = None
            if r.calibrate:  # first: mass routing is calibrated by it
                with torch.no_grad():
                    null = r._pass(null_ids, docs, depth, mass_tokens=null_sel, **kw).masses
            route = {**r._route_kw(null), **kw}
            res = r._pass(ids, docs, depth, mass_tokens=sel, **route)
        n = r.store.num_rows
        total, _ = readout_scores(res.masses, n, r.readout_layers, r.readout_heads, null)
        target = torch.isin(docs, torch.tensor(pos))
        logits = total[docs] / cfg.temperature
        loss = torch.logsumexp(logits, 0) - torch.logsumexp(logits[target], 0)
        if res.route_logits is not None and cfg.route_weight > 0:
            route_docs, route = res.route_logits
            if r.route_score == "mass":  # a readout: the same temperature as the readout loss
                rl = route / cfg.temperature
            else:  # QK-MaxSim: mean over query tokens of the max logits
                rl = route / max(1, int(ids.shape[1]))
            rt = torch.isin(route_docs, torch.tensor(pos))
            loss = loss + cfg.route_weight * (torch.logsumexp(rl, 0) - torch.logsumexp(rl[rt], 0))
        return loss

    def loss_fn(batch: Sequence[tuple[str, list[int], list[int]]], step: int) -> torch.Tensor:
        rng = random.Random(step_seed(cfg.seed, step))
        return torch.stack([one(q, pos, hard, rng) for q, pos, hard in batch]).mean()

    modules = {"query_lora": update}
    counts = parameter_counts(modules)
    data = hashlib.sha256(json.dumps([pairs, sorted(doc_rows)]).encode()).hexdigest()
    report = FitReport(
        num_examples=len(plan), trainable_params=counts["trainable"], total_params=counts["total"]
    )
    try:
        train(
            modules, loss_fn, plan, cfg,
            fingerprints={"model": r.fingerprint, "data": data, "run": cfg.run_hash()},
            report=report, desc="fit (incontext readout)",
        )  # fmt: skip
    except BaseException:
        r.query_lora = previous  # an interrupted fit leaves the search as it was
        raise
    update.requires_grad_(False)
    r.set_query_lora(update)
    return report


def _save_model(r: InContextRetriever, path: str) -> None:
    cfg = r.model.config
    if getattr(cfg, "quantization_config", None) is not None:  # dequantised GGUF: plain now
        del cfg.quantization_config
    r.model.save_pretrained(path)
    r.tokenizer.save_pretrained(path)
    r.model_name = str(path)
    r.gguf_file = None
