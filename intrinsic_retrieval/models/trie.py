"""`PrefixTrie`: token sequences -> integer codes, for constrained decoding.

Generative retrieval decodes docid token sequences (each ending with EOS) from it; in-context
retrieval decodes fixed-width digit codes. No sequence may be a prefix of another, so a node
reached by a sequence's last token is a leaf holding its code. Deleting a sequence prunes its
branch, so it can never be decoded again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_LEAF = -1  # key under which a leaf node stores its code


class PrefixTrie:
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
            raise ValueError("a token sequence cannot be empty")
        node = self._root
        for t in tokens:
            if _LEAF in node:
                raise ValueError(f"sequence {list(tokens)} extends an existing one (missing EOS?)")
            node = node.setdefault(int(t), {})
        if node:
            raise ValueError(f"sequence {list(tokens)} is a prefix of another one (missing EOS?)")
        node[_LEAF] = int(code)
        self._size += 1

    def remove(self, tokens: Sequence[int]) -> bool:
        """Remove a sequence and prune empty branches; False when it was not present."""
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
        """Tokens that continue `prefix` towards some sequence ([] at a leaf or off the trie)."""
        node = self._node(prefix)
        return [] if node is None else [t for t in node if t != _LEAF]

    def lookup(self, tokens: Sequence[int]) -> int | None:
        """The code of a complete sequence, or None."""
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
