"""Fine-tuning an LM to emit document codes (BlockSearch training, small-scale version).

Each step draws a batch of queries, builds an in-batch corpus (their positives plus other stored
documents), draws *fresh random codes* for that corpus (so the model learns to copy the code of
the block it attends to, not to memorise code-document pairs), prefills the blocks with
gradients, runs the query pass over them and takes cross-entropy on the positive's code digits.
LoRA (peft) is used when available and requested; otherwise all weights train.

After training the stored blocks are stale (they were made by the old weights), so the index is
rebuilt in place from the stored texts with the new model's fingerprint.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import InvalidInputError, UnknownIdError
from ...models.architectures import decoder_only_for
from ...models.fingerprint import model_fingerprint
from ...types import Document
from .attention import CorpusKV, query_pass
from .prefill import prefill_blocks

if TYPE_CHECKING:
    from .retriever import InContextRetriever


def _documents(r: InContextRetriever) -> dict[str, Document]:
    """Live documents reassembled from their chunks (chunk offsets put overlaps back together)."""
    parts: dict[str, list[Any]] = {}
    for _, c in r.store.iter_chunks():
        parts.setdefault(c.document_id, []).append(c)
    docs = {}
    for doc_id, chunks in parts.items():
        chunks.sort(key=lambda c: c.start)
        text, end = "", None
        for c in chunks:
            if end is None or c.start >= end:
                text += ("" if end is None else " ") + c.text
            else:
                text += c.text[end - c.start :]
            end = max(end or 0, c.end)
        docs[doc_id] = Document(text, doc_id, dict(chunks[0].metadata))
    return docs


def fit_codes(
    r: InContextRetriever,
    queries: Sequence[str],
    positives: Sequence[Sequence[str] | str],
    *,
    steps: int = 100,
    batch_queries: int = 4,
    corpus_size: int = 16,
    lr: float = 1e-4,
    lora: bool = False,
    lora_rank: int = 8,
    seed: int = 0,
    save_model_to: str | None = None,
    reindex: bool = True,
) -> dict[str, Any]:
    """Train `r.model` to write the code of a query's positive document.

    `positives[i]` names stored document ids relevant to `queries[i]` (the first one that exists
    is the target). Returns ``{"losses": [...], "steps": n}``. With `save_model_to` the tuned
    weights and tokenizer are saved there and recorded as the retriever's model, so
    `InContextRetriever.load` reopens the rebuilt index with them.
    """
    if isinstance(queries, str) or len(queries) != len(positives) or not queries:
        raise InvalidInputError("fit needs equal-length, non-empty lists of queries and positives")
    docs = _documents(r)
    if not docs:
        raise InvalidInputError("fit needs an index with documents (add them first)")
    pairs = []
    for q, pos in zip(queries, positives, strict=True):
        ids = [pos] if isinstance(pos, str) else list(pos)
        known = [i for i in ids if i in docs]
        if not known:
            raise UnknownIdError(f"none of the positives {ids[:3]} of query {q[:40]!r} is stored")
        pairs.append((q, known[0]))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = r.model
    peft_model = None
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        peft_model = get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses: list[float] = []
    all_ids = sorted(docs)
    try:
        for _ in range(steps):
            batch = rng.sample(pairs, min(batch_queries, len(pairs)))
            pos_ids = list(dict.fromkeys(p for _, p in batch))
            target_of = {p: i for i, p in enumerate(pos_ids)}
            pool = [d for d in all_ids if d not in target_of]
            negs = rng.sample(pool, min(len(pool), max(0, corpus_size - len(pos_ids))))
            # queries whose positive is shared use the same block; reorder so index = code slot
            qs = [q for q, _ in batch]
            order = [target_of[p] for _, p in batch]
            pos_texts = [docs[p].text for p in pos_ids]
            loss = _loss_with_order(r, qs, order, pos_texts, [docs[d].text for d in negs], rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
    if peft_model is not None:
        r.model = peft_model.merge_and_unload()
        r.arch = decoder_only_for(r.model)
    for p in r.model.parameters():
        p.requires_grad_(False)
    # peft merges through `.data`, which the fingerprint cache cannot see: recompute it
    model_fingerprint(r.model, refresh=True)
    if save_model_to is not None:
        _save_model(r, save_model_to)
    if reindex:
        rebuild_index(r, list(docs.values()))
    return {"losses": losses, "steps": len(losses)}


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


def rebuild_index(r: InContextRetriever, docs: Sequence[Document]) -> None:
    """Recreate the store at the same path for the current weights and re-add `docs`."""
    from ...store import EncodedChunkStore

    root = Path(r.store.path)
    r.store.close()
    shutil.rmtree(root)
    r._store = EncodedChunkStore.create(
        root, fingerprint=r._fingerprint(), specs=r._specs(), config=r._manifest_config()
    )
    r._on_open()
    r.add(list(docs))
