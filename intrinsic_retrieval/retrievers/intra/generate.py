"""Generation from the store: the selected chunks' stored encoder states are packed as
cross-attention memory and the decoder generates greedily; no chunk text is re-encoded.

Context selection follows the paper's QA setup: the top ``k - 1`` INTRA-retrieved chunks plus the
top chunk of the initial context C0 (or simply the top k when that chunk is already among them).
The decoder reads ``[start, query tokens]`` and continues from there, exactly as in the
retrieval pass but without retrieval tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...errors import InvalidInputError
from ...protocol import Filter
from ...types import Hit

if TYPE_CHECKING:
    from .retriever import IntraRetriever


@dataclass
class Answer:
    """Generated text, the chunks it was conditioned on (packing order) and, on request, the
    per-step logits ``(steps, vocab)``."""

    text: str
    token_ids: list[int]
    context: list[Hit]
    logits: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


def select_context(retrieved: Sequence[int], c0: Sequence[int], k: int) -> list[int]:
    """Top ``k - 1`` retrieved rows plus the top C0 row (paper, section 4), deduplicated."""
    retrieved = [int(r) for r in retrieved]
    if not c0 or k < 2:
        return retrieved[:k]
    first = int(c0[0])
    if first in retrieved[: k - 1]:
        return retrieved[:k]
    return [*retrieved[: k - 1], first]


def generate(
    r: IntraRetriever,
    query: str,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    *,
    max_new_tokens: int = 32,
    return_logits: bool = False,
) -> tuple[list[int], torch.Tensor | None]:
    """Greedy decoding over `memory` ``(1, S, d)`` (the stored representation)."""
    from transformers.modeling_outputs import BaseModelOutput

    prefix = r.decoder_prefix(query).to(r.device)[None]
    with torch.no_grad():
        out = r.model.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=memory_mask,
            decoder_input_ids=prefix,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            return_dict_in_generate=True,
            output_logits=return_logits,
        )
    ids = out.sequences[0, prefix.shape[1] :].tolist()
    logits = torch.stack([x[0] for x in out.logits]).float().cpu() if return_logits else None
    return ids, logits


def _decode(r: IntraRetriever, ids: list[int]) -> str:
    return r.tokenizer.decode(ids, skip_special_tokens=True).strip()


def answer(
    r: IntraRetriever,
    query: str,
    k: int = 5,
    *,
    filter: Filter | None = None,
    max_new_tokens: int = 32,
    return_logits: bool = False,
    reencode: bool = False,
) -> Answer:
    """Retrieve with INTRA, then generate from the selected chunks' stored encoder states.

    ``reencode=True`` is the text-RAG baseline: the same chunks' *text* is encoded afresh (one
    encoder pass per chunk, as at indexing) instead of reading the store.
    """
    import time

    query = r.check_query(query)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidInputError(f"k must be a positive int, got {k!r}")
    t0 = time.perf_counter()
    with r.lock:
        candidates = r.store.candidate_mask(filter)
        n = int(candidates.sum())
        if n == 0:
            return Answer("", [], [])
        r.check_length(query)
        qstates = r.query_states(query)
        c0, _ = r.initial_context(qstates, candidates, r.k0)
        with torch.no_grad():
            folded = r.retrieval_pass(query, c0.tolist())
        rows, scores = r.score_folded(folded, candidates, min(k, n), c0)
        chosen = select_context(rows.tolist(), c0.tolist(), min(k, n))
        t1 = time.perf_counter()
        if reencode:
            texts = [c.text for c in r.store.get(chosen)]
            states = r.encode_states(texts)
            memory = torch.cat(states, 0).to(device=r.device, dtype=r.model_dtype())[None]
            mask = torch.ones(memory.shape[:2], dtype=torch.long, device=r.device)
        else:
            memory, mask, _ = r.memory_for(chosen)
        t2 = time.perf_counter()
        ids, logits = generate(
            r, query, memory, mask, max_new_tokens=max_new_tokens, return_logits=return_logits
        )
        t3 = time.perf_counter()
        score_of = dict(zip(rows.tolist(), scores.tolist(), strict=True))
        chunks = r.store.get(chosen)
    hits = [
        Hit(
            chunk_id=c.id,
            document_id=c.document_id,
            text=c.text,
            score=float(score_of.get(row, float("nan"))),
            rank=i + 1,
            metadata=dict(c.metadata),
        )
        for i, (row, c) in enumerate(zip(chosen, chunks, strict=True))
    ]
    timings = {
        "retrieve_s": t1 - t0,
        "context_s": t2 - t1,
        "generate_s": t3 - t2,
        "total_s": t3 - t0,
    }
    return Answer(_decode(r, ids), ids, hits, logits, timings)


def generate_from_text(
    r: IntraRetriever, query: str, texts: Sequence[str], **kwargs: Any
) -> tuple[list[int], torch.Tensor | None]:
    """Text-RAG reference: encode `texts` afresh (one pass each) and generate over them."""
    states = r.encode_states(list(texts))
    memory = torch.cat(states, 0).to(device=r.device, dtype=r.model_dtype())[None]
    mask = torch.ones(memory.shape[:2], dtype=torch.long, device=r.device)
    return generate(r, query, memory, mask, **kwargs)
