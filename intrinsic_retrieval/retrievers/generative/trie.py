"""Prefix trie over docid token sequences, and the logits processor that makes beam search emit
only sequences in it (constrained decoding, as in Bevilacqua et al. 2022 and Pradeep et al. 2023).

Every sequence ends with EOS, so no docid is a prefix of another and a node reached by EOS is a
leaf holding the code. Deleting a docid prunes its branch, so it can never be decoded again;
metadata filters decode from a sub-trie of the allowed codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor

_LEAF = -1  # key under which a leaf node stores its code


class DocidTrie:
    """Token-sequence trie; nodes are dicts ``token -> node`` and leaves ``{-1: code}``."""

    def __init__(self, items: Iterable[tuple[Sequence[int], int]] = ()) -> None:
        self._root: dict[int, dict] = {}
        self._size = 0
        for tokens, code in items:
            self.insert(tokens, code)

    def __len__(self) -> int:
        return self._size

    def insert(self, tokens: Sequence[int], code: int) -> None:
        if not tokens:
            raise ValueError("a docid token sequence cannot be empty")
        node = self._root
        for t in tokens:
            if _LEAF in node:
                raise ValueError(f"docid {list(tokens)} extends an existing docid (missing EOS?)")
            node = node.setdefault(int(t), {})
        if node:
            raise ValueError(f"docid {list(tokens)} is a prefix of another docid (missing EOS?)")
        node[_LEAF] = int(code)
        self._size += 1

    def remove(self, tokens: Sequence[int]) -> bool:
        """Remove a docid and prune empty branches; False when it was not present."""
        path: list[tuple[dict, int]] = []
        node = self._root
        for t in tokens:
            nxt = node.get(int(t))
            if nxt is None:
                return False
            path.append((node, int(t)))
            node = nxt
        if _LEAF not in node:
            return False
        del node[_LEAF]
        self._size -= 1
        for parent, t in reversed(path):
            if parent[t]:
                break
            del parent[t]
        return True

    def _node(self, prefix: Sequence[int]) -> dict | None:
        node = self._root
        for t in prefix:
            node = node.get(int(t))
            if node is None:
                return None
        return node

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that continue `prefix` towards some docid ([] at a leaf or off the trie)."""
        node = self._node(prefix)
        return [] if node is None else [t for t in node if t != _LEAF]

    def lookup(self, tokens: Sequence[int]) -> int | None:
        """The code of a complete docid sequence, or None."""
        node = self._node(tokens)
        return None if node is None else node.get(_LEAF)

    def codes(self) -> list[int]:
        out: list[int] = []
        stack = [self._root]
        while stack:
            node = stack.pop()
            for t, child in node.items():
                if t == _LEAF:
                    out.append(child)
                else:
                    stack.append(child)
        return sorted(out)

    def max_depth(self) -> int:
        best, stack = 0, [(self._root, 0)]
        while stack:
            node, d = stack.pop()
            best = max(best, d)
            stack.extend((child, d + 1) for t, child in node.items() if t != _LEAF)
        return best


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
