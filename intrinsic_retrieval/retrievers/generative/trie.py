"""The logits processor that makes beam search emit only docids in a `models.trie.PrefixTrie`
(constrained decoding, as in Bevilacqua et al. 2022 and Pradeep et al. 2023). Every docid ends
with EOS, so none is a prefix of another; metadata filters decode from a sub-trie of the allowed
codes.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ...models.trie import PrefixTrie

#: docids are token sequences ending with EOS, decoded under the shared prefix trie
DocidTrie = PrefixTrie


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that does not continue a docid in `trie`.

    `offset` is where the docid starts in the running sequence (1 after a seq2seq decoder start
    token; the padded prompt length for a causal LM). A beam that has completed its docid, or has
    left the trie, may only emit `pad_token_id`; such beams are discarded when results are read.
    """

    def __init__(self, trie: DocidTrie, offset: int, pad_token_id: int) -> None:
        self.trie = trie
        self.offset = offset
        self.pad = pad_token_id
        self._cache: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for i, row in enumerate(input_ids[:, self.offset :].tolist()):
            prefix = tuple(row)
            allowed = self._cache.get(prefix)
            if allowed is None:
                allowed = self.trie.next_tokens(prefix) or [self.pad]
                self._cache[prefix] = allowed
            mask[i, allowed] = 0.0
        return scores + mask
