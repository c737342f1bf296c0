"""Turning a query pass into document scores.

* Attention readout (zero-shot): a document's score is the attention mass the query tokens put
  on its block, summed over the chosen layers and heads, minus the mass a content-free query
  ("N/A") puts on it — the calibration of in-context reranking (Chen et al., 2024), which removes
  the position/format bias that every query shares.
* Code decoding: digit-by-digit beam search restricted (by a trie) to codes that exist, for a
  model fine-tuned to emit the relevant document's code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ...models.trie import PrefixTrie

Masses = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


def readout_scores(
    masses: Masses,
    num_docs: int,
    layers: Sequence[int],
    heads: Sequence[int] | None = None,
    null: Masses | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document readout ``(num_docs,)`` (batch row 0) and a mask of documents that were
    read at every chosen layer (documents routed away miss the later layers)."""
    total = torch.zeros(num_docs)
    seen = torch.zeros(num_docs, dtype=torch.long)
    used = 0
    for layer in layers:
        if layer not in masses:
            continue
        used += 1
        docs, mass = masses[layer]
        m = mass[0].float().cpu()
        if heads is not None:
            m = m[list(heads)]
        s = m.sum(0)
        if null is not None and layer in null:
            ndocs, nmass = null[layer]
            nm = nmass[0].float().cpu()
            if heads is not None:
                nm = nm[list(heads)]
            full = torch.zeros(num_docs)
            full[ndocs] = nm.sum(0)
            s = s - full[docs]
        total[docs] += s
        seen[docs] += 1
    return total, seen == used


def constrained_beam_search(
    first_logprobs: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    trie: PrefixTrie,
    digit_ids: Sequence[int],
    digits: int,
    width: int,
) -> list[tuple[str, float]]:
    """Best complete codes with their log-probabilities, best first.

    `first_logprobs` ``(V,)`` is the distribution after the prompt; ``step(tokens (B,), parents
    (B,))`` extends beam `parents[i]` of the previous step by `tokens[i]` and returns the next
    log-probabilities ``(B, V)``.
    """
    beams: list[tuple[str, float]] = [("", 0.0)]
    lp = first_logprobs[None].float().cpu()
    for pos in range(digits):
        cands: list[tuple[float, str, int]] = []
        for b, (prefix, score) in enumerate(beams):
            for d in map(str, sorted(trie.next_tokens([int(ch) for ch in prefix]))):
                cands.append((score + float(lp[b, digit_ids[int(d)]]), prefix + d, b))
        cands.sort(key=lambda c: -c[0])
        cands = cands[:width]
        if not cands:
            return []
        beams = [(p, s) for s, p, _ in cands]
        if pos < digits - 1:
            tokens = torch.tensor([digit_ids[int(p[-1])] for _, p, _ in cands])
            parents = torch.tensor([b for _, _, b in cands])
            lp = step(tokens, parents).float().cpu()
    return beams
