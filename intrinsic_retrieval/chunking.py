"""Token-aware chunking with overlap.

Chunks are cut on the retriever's own token boundaries (from the tokenizer's offset mapping), so a
chunk never exceeds what the model reads and the text of a chunk is an exact slice of its document.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DuplicateIdError, InvalidInputError
from .types import Chunk, Document

#: A function returning the (start, end) character span of every token of a text.
Spanner = Callable[[str], list[tuple[int, int]]]

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def word_spans(text: str) -> list[tuple[int, int]]:
    """Words and punctuation: the spanner for lexical retrievers without a subword tokenizer."""
    return [m.span() for m in _WORD.finditer(text)]


def tokenizer_spans(tokenizer: Any) -> Spanner:
    """Spanner from a Hugging Face *fast* tokenizer (special tokens excluded)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; token-aware chunking needs "
            "offset mappings (load the tokenizer with use_fast=True)"
        )

    def spans(text: str) -> list[tuple[int, int]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [(int(s), int(e)) for s, e in enc["offset_mapping"] if e > s]

    return spans


@dataclass(frozen=True)
class Chunker:
    """Split documents into windows of at most `chunk_size` tokens overlapping by `overlap`.

    `chunk_size=None` keeps each document whole (the model truncates). Chunk ids are
    ``"{document_id}#{i}"``; each chunk carries its document's metadata.
    """

    spanner: Spanner = word_spans
    chunk_size: int | None = 256
    overlap: int = 32

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InvalidInputError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.overlap < 0 or (self.chunk_size is not None and self.overlap >= self.chunk_size):
            raise InvalidInputError(
                f"overlap must be in [0, chunk_size), got {self.overlap} with {self.chunk_size}"
            )

    def split(self, doc: Document) -> list[Chunk]:
        assert doc.id is not None
        meta = dict(doc.metadata)
        text = doc.text
        spans = self.spanner(text) if self.chunk_size is not None else []
        if self.chunk_size is None or len(spans) <= self.chunk_size:
            return [Chunk(f"{doc.id}#0", doc.id, text, meta, 0, len(text))]
        # Cut only between words (a gap before the next token), so re-tokenising a chunk's text
        # gives the same tokens rather than a longer sequence of word pieces.
        n, size = len(spans), self.chunk_size
        starts_word = [i == 0 or spans[i][0] > spans[i - 1][1] for i in range(n)]
        chunks = []
        first = 0
        while True:
            last = min(first + size, n) - 1
            if last < n - 1:
                cut = next((j for j in range(last, first, -1) if starts_word[j + 1]), last)
                last = cut
            start, end = spans[first][0], spans[last][1]
            chunks.append(
                Chunk(f"{doc.id}#{len(chunks)}", doc.id, text[start:end], meta, start, end)
            )
            if last >= n - 1:
                return chunks
            nxt = max(first + 1, last + 1 - self.overlap)
            aligned = next((j for j in range(nxt, last + 1) if starts_word[j]), None)
            first = aligned if aligned is not None and aligned > first else nxt

    def split_all(self, docs: Sequence[Document]) -> list[Chunk]:
        check_unique_ids(d.id for d in docs)
        return [c for d in docs for c in self.split(d)]


def special_token_count(tokenizer: Any) -> int:
    """Special tokens the tokenizer adds around one text ([CLS]/[SEP], BOS...): what a chunk
    must leave free of the model's input limit."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    return max(0, len(with_special) - len(tokenizer("x", add_special_tokens=False)["input_ids"]))


def check_unique_ids(ids: Iterable[str | None]) -> None:
    seen: set[str | None] = set()
    dups: list[str] = []
    for i in ids:
        if i in seen:
            dups.append(str(i))
        seen.add(i)
    if dups:
        raise DuplicateIdError(dups, where="batch")
