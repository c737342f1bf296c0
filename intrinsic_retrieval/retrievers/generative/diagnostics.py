"""Logit-lens diagnostics from "Reverse-Engineering the Retrieval Process in GenIR Models"
(Reusch & Belinkov, 2025): project each decoder layer's residual stream at the docid position
through the output path (final norm, then the atomic docid head) and read off the rank of the
gold document. The paper finds the gold rank stays poor through the priming and bridging stages
and improves sharply only in the last layers, where MLPs write document-specific information.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...errors import InvalidInputError, UnknownIdError

if TYPE_CHECKING:
    from .retriever import GenerativeDocidRetriever


@torch.no_grad()
def logit_lens(retriever: GenerativeDocidRetriever, query: str, doc_id: str) -> dict[str, Any]:
    """Per-layer rank (1 = best) of `doc_id`'s docid among the searchable docids.

    Returns ``{"query", "doc_id", "code", "num_docids", "layers": [{"layer", "rank", "logit",
    "top_doc_id"}], "final_rank"}``; layer 0 is the embedding output, layer L the last decoder
    layer (whose projection is exactly what `search` ranks by).
    """
    if retriever.scheme != "atomic":
        raise InvalidInputError(
            f"explain() traces atomic docids (one output unit per document); this index uses "
            f"{retriever.scheme!r} ids"
        )
    searchable = retriever.searchable_codes()
    rows = retriever.store.rows_for_ids([doc_id])
    if not rows:
        raise UnknownIdError(f"unknown (or deleted) document id {doc_id!r}")
    code = retriever.code_of_row(rows[0])
    if code not in searchable:
        raise UnknownIdError(f"document {doc_id!r} is not trained yet; call fit() first")
    bb, head = retriever.backbone, retriever.head
    assert head is not None
    states, final_input = bb.layer_states(bb.inputs([query], retriever.max_length))
    pre = bb.pre_head()
    idx = torch.as_tensor(searchable, dtype=torch.long, device=head.weight.device)
    w = head.weight[idx].float()
    gold = searchable.index(code)
    doc_of = {c: d for c, d in _doc_ids(retriever, searchable).items()}
    layers = []
    for i, h in enumerate(states):
        x = final_input if i == len(states) - 1 else pre(h)
        logits = x.float() @ w.T
        logits = logits[0]
        rank = int((logits > logits[gold]).sum()) + 1
        layers.append(
            {
                "layer": i,
                "rank": rank,
                "logit": float(logits[gold]),
                "top_doc_id": doc_of[searchable[int(logits.argmax())]],
            }
        )
    return {
        "query": query,
        "doc_id": doc_id,
        "code": code,
        "num_docids": len(searchable),
        "layers": layers,
        "final_rank": layers[-1]["rank"],
    }


def _doc_ids(retriever: GenerativeDocidRetriever, codes: list[int]) -> dict[int, str]:
    rows = [retriever.row_of_code(c) for c in codes]
    return {c: ch.document_id for c, ch in zip(codes, retriever.store.get(rows), strict=True)}
