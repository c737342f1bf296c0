"""Training inputs for generative retrieval ("indexing = training").

Indexing examples map document text to its docid: FirstP (the first 64 tokens, DSI) and DaQ
(random 64-token spans, "document as query", Wang et al. 2022). Retrieval examples map queries to
docids: labeled queries (e.g. SciFact ``qrels/train.tsv``) and synthetic queries from a pluggable
`QueryGenerator` — a seq2seq doc2query model when one is available (`Doc2QueryGenerator`), or the
model-free `ExtractiveQueryGenerator` otherwise. `mix` sets the indexing:retrieval ratio.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import InvalidInputError
from ...training.queries import QueryGenerator, cached_queries  # shared by all trainers

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
    docs: Sequence[tuple[int, str]],
    generator: QueryGenerator,
    n_per_doc: int,
    *,
    store: Any = None,
    ids: Sequence[str] | None = None,
) -> list[Example]:
    """`n_per_doc` generated queries per (code, text) document as examples. With a `store`
    (and each document's stable `ids`), queries come from and go to its cache
    (`training.queries.cached_queries`), so a second fit writes none again."""
    if n_per_doc <= 0 or not docs:
        return []
    texts = [t for _, t in docs]
    if store is not None:
        keys = list(ids) if ids is not None else [str(code) for code, _ in docs]
        written = cached_queries(store, list(zip(keys, texts, strict=True)), generator, n_per_doc)
        queries = [written[k] for k in keys]
    else:
        queries = generator.generate(texts, n_per_doc)
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
