"""Training inputs for generative retrieval ("indexing = training").

Indexing examples map document text to its docid: FirstP (the first 64 tokens, DSI) and DaQ
(random 64-token spans, "document as query", Wang et al. 2022). Retrieval examples map queries to
docids: labeled queries (e.g. SciFact ``qrels/train.tsv``) and synthetic queries from a pluggable
`QueryGenerator` — a seq2seq doc2query model when one is available (`Doc2QueryGenerator`), or the
model-free `ExtractiveQueryGenerator` otherwise. `mix` sets the indexing:retrieval ratio.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ...errors import InvalidInputError

INPUT_KINDS = ("firstp", "daq", "labeled", "synthetic")
INDEXING_KINDS = ("firstp", "daq")

#: text -> (start, end) character spans of its tokens
Spanner = Callable[[str], list[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class Example:
    """One training pair: input text -> docid `code`; `kind` is one of `INPUT_KINDS`."""

    text: str
    code: int
    kind: str


def first_p(text: str, spans: Sequence[tuple[int, int]], n_tokens: int = 64) -> str:
    """The first `n_tokens` tokens of `text` (FirstP)."""
    if len(spans) <= n_tokens:
        return text
    return text[: spans[n_tokens - 1][1]]


def daq(
    text: str,
    spans: Sequence[tuple[int, int]],
    rng: random.Random,
    n_tokens: int = 64,
    count: int = 10,
) -> list[str]:
    """Up to `count` distinct random windows of `n_tokens` consecutive tokens (DaQ). A document
    no longer than one window yields itself once."""
    if len(spans) <= n_tokens:
        return [text]
    starts = list(range(len(spans) - n_tokens + 1))
    picked = sorted(rng.sample(starts, min(count, len(starts))))
    return [text[spans[s][0] : spans[s + n_tokens - 1][1]] for s in picked]


# ---------------------------------------------------------------------- query generators
@runtime_checkable
class QueryGenerator(Protocol):
    """Anything that writes `n` pseudo-queries for each text."""

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]: ...


_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-]+")
_STOP_WORDS = """
    a an and are as at be been being but by can could did do does for from had has have how
    in into is it its may might more most no not of on or our than that the their them then
    there these they this those to was we were what when where which while who whom why will
    with within without would also between both each such using used use via after before
    during however here other over under than
"""
_STOP = frozenset(_STOP_WORDS.split())


class ExtractiveQueryGenerator:
    """Model-free pseudo-queries, for when no doc2query model is available.

    Query *i* of a document is, in turn: (0) its title/first sentence cut to `max_words`;
    (1) the `keywords` terms with the highest TF-IDF in the document (IDF over the texts given
    in one call, i.e. the corpus being indexed), in document order; (2+) a random other sentence
    cut to `max_words`. Deterministic for a given `seed`. These mimic the short, term-heavy
    queries of scientific search much better than they mimic natural questions; they narrow the
    length gap between indexing inputs and queries but add no vocabulary the document lacks.
    """

    def __init__(self, *, max_words: int = 16, keywords: int = 6, seed: int = 0) -> None:
        self.max_words, self.keywords, self.seed = max_words, keywords, seed

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]:
        docs_terms = [[w.lower() for w in _WORD.findall(t)] for t in texts]
        df = Counter(w for terms in docs_terms for w in set(terms))
        n_docs = max(1, len(texts))
        out: list[list[str]] = []
        for i, (text, terms) in enumerate(zip(texts, docs_terms, strict=True)):
            rng = random.Random(f"{self.seed}:{i}:{text[:64]}")
            sents = [s.strip() for s in _SENT.split(text) if len(s.split()) >= 3] or [text]
            tf = Counter(w for w in terms if w not in _STOP)
            score = {w: c * math.log((1 + n_docs) / (1 + df[w])) for w, c in tf.items()}
            top = set(sorted(score, key=lambda w: (-score[w], w))[: self.keywords])
            seen: set[str] = set()
            kw = [w for w in terms if w in top and not (w in seen or seen.add(w))]  # type: ignore[func-returns-value]
            queries: list[str] = []
            for j in range(n):
                if j == 0:
                    q = " ".join(sents[0].split()[: self.max_words])
                elif j == 1 and kw:
                    q = " ".join(kw)
                else:
                    q = " ".join(rng.choice(sents).split()[: self.max_words])
                queries.append(q)
            out.append(queries)
        return out


class Doc2QueryGenerator:
    """Sampled queries from a seq2seq doc2query model (e.g. docT5query), if you have one."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_input_length: int = 256,
        max_new_tokens: int = 32,
        top_k: int = 10,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_input_length, self.max_new_tokens = max_input_length, max_new_tokens
        self.top_k, self.batch_size, self.seed = top_k, batch_size, seed

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]:
        import torch

        torch.manual_seed(self.seed)
        out: list[list[str]] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            part = list(texts[i : i + self.batch_size])
            enc = self.tokenizer(
                part,
                truncation=True,
                max_length=self.max_input_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    do_sample=True,
                    top_k=self.top_k,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=n,
                )
            decoded = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            out.extend(decoded[j * n : (j + 1) * n] for j in range(len(part)))
        return out


# ---------------------------------------------------------------------- assembly
def indexing_examples(
    docs: Sequence[tuple[int, str]],
    spanner: Spanner,
    kinds: Sequence[str],
    *,
    n_tokens: int = 64,
    daq_count: int = 10,
    seed: int = 0,
) -> list[Example]:
    out: list[Example] = []
    for code, text in docs:
        rng = random.Random(f"daq:{seed}:{code}")
        spans = spanner(text)
        if "firstp" in kinds:
            out.append(Example(first_p(text, spans, n_tokens), code, "firstp"))
        if "daq" in kinds:
            out.extend(Example(s, code, "daq") for s in daq(text, spans, rng, n_tokens, daq_count))
    return out


def synthetic_examples(
    docs: Sequence[tuple[int, str]], generator: QueryGenerator, n_per_doc: int
) -> list[Example]:
    if n_per_doc <= 0 or not docs:
        return []
    queries = generator.generate([t for _, t in docs], n_per_doc)
    if len(queries) != len(docs):
        raise InvalidInputError(
            f"query generator returned {len(queries)} query lists for {len(docs)} documents"
        )
    return [
        Example(q, code, "synthetic")
        for (code, _), qs in zip(docs, queries, strict=True)
        for q in qs
        if q.strip()
    ]


def mix(
    indexing: Sequence[Example], retrieval: Sequence[Example], ratio: float | None, seed: int = 0
) -> list[Example]:
    """Combine so that there are `ratio` indexing examples per retrieval example, by repeating or
    subsampling the retrieval side (None: keep both as they are)."""
    if ratio is None or not retrieval or not indexing:
        return [*indexing, *retrieval]
    if ratio <= 0:
        raise InvalidInputError(f"index_retrieval_ratio must be > 0, got {ratio}")
    target = max(1, round(len(indexing) / ratio))
    rng = random.Random(f"mix:{seed}")
    reps, rest = divmod(target, len(retrieval))
    chosen = list(retrieval) * reps + rng.sample(list(retrieval), rest)
    return [*indexing, *chosen]


def split_heldout(
    examples: Sequence[Example], fraction: float, *, seed: int = 0, max_heldout: int = 200
) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction of the *query* examples (labeled first, else synthetic) for early
    stopping; indexing examples always stay in training."""
    if fraction <= 0:
        return list(examples), []
    pool_kind = "labeled" if any(e.kind == "labeled" for e in examples) else "synthetic"
    pool = [i for i, e in enumerate(examples) if e.kind == pool_kind]
    if len(pool) < 2:
        return list(examples), []
    rng = random.Random(f"heldout:{seed}")
    n = min(max_heldout, max(1, int(len(pool) * fraction)))
    held = set(rng.sample(pool, n))
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def describe(examples: Sequence[Example]) -> dict[str, Any]:
    return dict(Counter(e.kind for e in examples))
