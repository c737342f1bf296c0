"""Document codes and the prompt format.

A block reads ``Doc 0421: <text> (Doc 0421)``; the query block ends with ``... (Doc `` so the
model's next tokens are a code, one digit token per position. Codes are zero-padded integers of
a fixed width; a store holds at most ``10**digits`` live documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import IdSpaceExhaustedError, InvalidInputError, UnsupportedArchitectureError

FORMAT_VERSION = 1
QUERY_TEMPLATE = "\nQuery: {query}\nThe most relevant document is"
NULL_QUERY = "N/A"


def digits_needed(n: int) -> int:
    """Smallest code width that names `n` documents."""
    return max(1, len(str(max(n - 1, 0))))


def assign_codes(used: Iterable[int], n: int, digits: int, start: int = 0) -> list[int]:
    """The `n` smallest codes from `start` on that are not in `used`; codes of deleted
    documents are reused. (`start` > 0: a store part whose codes follow the parts before it.)"""
    taken = set(int(u) for u in used)
    space = 10**digits
    total = start + len(taken) + n
    if total > space:
        need = digits_needed(total)
        raise IdSpaceExhaustedError(
            f"{total} documents do not fit the {digits}-digit code space ({space} codes); "
            f"widen the code: build the index with code_digits={need} (codes are part of every "
            "stored block, so existing documents must be re-added)"
        )
    out: list[int] = []
    c = start
    while len(out) < n:
        if c not in taken:
            out.append(c)
        c += 1
    return out


@dataclass(frozen=True)
class PromptFormat:
    """Token-level block and query construction for one tokenizer and code width."""

    tokenizer: Any
    digits: int

    def __post_init__(self) -> None:
        ids = [self._ids(str(d)) for d in range(10)]
        if any(len(i) != 1 for i in ids):
            raise UnsupportedArchitectureError(
                "the tokenizer does not map each digit 0-9 to a single token; code decoding needs "
                "digit-level tokens"
            )
        object.__setattr__(self, "digit_ids", [i[0] for i in ids])
        sample = self._ids(f" (Doc {'0' * self.digits})")
        first = next(i for i, t in enumerate(sample) if t in self.digit_ids)
        object.__setattr__(self, "code_lead", sample[:first])  # " (Doc " tokens

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def code_str(self, code: int) -> str:
        return f"{int(code):0{self.digits}d}"

    def code_digit_ids(self, code: int) -> list[int]:
        return [self.digit_ids[int(c)] for c in self.code_str(code)]  # type: ignore[attr-defined]

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer([" " + t for t in texts], add_special_tokens=False)
        return [list(x) for x in enc["input_ids"]]

    def block(
        self, code: int, text_ids: Sequence[int], max_tokens: int
    ) -> tuple[list[int], int, int, bool]:
        """Block ids, the text span inside it, and whether the text was truncated."""
        prefix = self._ids(f"Doc {self.code_str(code)}:")
        suffix = self._ids(f" (Doc {self.code_str(code)})")
        budget = max_tokens - len(prefix) - len(suffix)
        if budget < 1:
            raise InvalidInputError(
                f"max_doc_tokens={max_tokens} leaves no room for text next to the code markers"
            )
        text = list(text_ids[:budget])
        return prefix + text + suffix, len(prefix), len(prefix) + len(text), len(text_ids) > budget

    def query(self, query: str, max_tokens: int) -> tuple[list[int], int, int, bool]:
        """Query block ids ending in the code lead, the query-text span, and truncation."""
        head, tail = QUERY_TEMPLATE.split("{query}")
        h = self._ids(head.rstrip(" "))
        q = self._ids(" " + query.strip())
        t = self._ids(tail) + list(self.code_lead)  # type: ignore[attr-defined]
        budget = max(1, max_tokens - len(h) - len(t))
        cut = len(q) > budget
        q = q[:budget]
        return h + q + t, len(h), len(h) + len(q), cut
