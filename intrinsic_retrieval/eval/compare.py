"""Retrievers side by side on one corpus: index, train where it trains, evaluate, measure.

The demo, ``intrinsic-retrieval eval`` and the benchmarks report quality and cost from one run
(BM25 and dense beside every neural figure): nDCG@10 and R@10, indexing and training seconds,
median query milliseconds and stored bytes per document.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .beir import BeirDataset, load_beir
from .metrics import DEFAULT_MEASURES
from .runner import EvalResult, evaluate

Labels = tuple[dict[str, str], dict[str, dict[str, int]]]


@dataclass
class Contender:
    """One column of a comparison: `build` makes a fresh, empty retriever; `fit` trains it on
    the training labels after indexing (with `fit_options`) when it is a retriever that trains."""

    label: str
    build: Callable[[], Any]
    fit: bool = True
    fit_options: dict[str, Any] = field(default_factory=dict)


def labels_within(labels: Labels, doc_ids: Iterable[str]) -> Labels:
    """Training labels restricted to queries with a relevant document in the corpus."""
    queries, qrels = labels
    docs = set(doc_ids)
    kept = {
        q: {d: r for d, r in rel.items() if d in docs and r > 0}
        for q, rel in qrels.items()
        if q in queries
    }
    kept = {q: rel for q, rel in kept.items() if rel}
    return {q: queries[q] for q in kept}, kept


def side_by_side(
    dataset: BeirDataset,
    contenders: Sequence[Contender],
    *,
    train: Labels | None = None,
    k: int = 100,
    measures: Iterable = DEFAULT_MEASURES,
    batch_size: int = 1,
    show_progress: bool = True,
    on_ready: Callable[[Contender, Any], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> list[EvalResult]:
    """Evaluate each contender in turn (one model in memory at a time); `on_ready(contender,
    retriever)` runs after evaluation, before the retriever is closed (to show hits)."""
    docs = dataset.documents()
    labels = labels_within(train, dataset.corpus) if train is not None else None
    results: list[EvalResult] = []
    for c in contenders:
        log(f"[{c.label}] building")
        r = c.build()
        try:
            t0 = time.perf_counter()
            r.add(docs)
            index_s = time.perf_counter() - t0
            fit_s = None
            report = None
            if c.fit and getattr(r, "fit_config", None) is not None:
                log(f"[{c.label}] training" + (f" on {len(labels[0])} queries" if labels else ""))
                t0 = time.perf_counter()
                report = r.fit(*(labels or (None, None)), **c.fit_options)
                fit_s = time.perf_counter() - t0
            log(f"[{c.label}] evaluating {len(dataset.judged_queries())} queries")
            res = evaluate(
                r,
                dataset,
                name=c.label,
                k=k,
                measures=measures,
                batch_size=batch_size,
                index_seconds=index_s,
                show_progress=show_progress,
            )
            res.fit_seconds = fit_s
            if report is not None:
                res.extra["fit"] = {
                    "steps": report.steps,
                    "stopped": report.stopped,
                    "examples": report.num_examples,
                }
            results.append(res)
            if on_ready is not None:
                on_ready(c, r)
        finally:
            close = getattr(r, "close", None)
            if close is not None:
                close()
    return results


def demo_subset(
    path: str,
    *,
    n_docs: int,
    n_test: int,
    n_train: int,
    seed: int = 0,
) -> tuple[BeirDataset, Labels]:
    """A small BEIR evaluation set with training labels: `n_test` test queries, `n_train`
    training queries, all their relevant documents, and random others up to `n_docs`."""
    test = load_beir(path, split="test").sample_queries(n_test, seed=seed)
    full_train = load_beir(path, split="train")
    qids = sorted(q for q in full_train.qrels if q in full_train.queries)
    random.Random(seed).shuffle(qids)
    train_qrels = {q: full_train.qrels[q] for q in qids[:n_train]}
    keep = {d for rel in (*test.qrels.values(), *train_qrels.values()) for d, r in rel.items() if r}
    keep &= set(test.corpus)
    others = sorted(set(test.corpus) - keep)
    random.Random(seed).shuffle(others)
    keep |= set(others[: max(0, n_docs - len(keep))])
    corpus = {d: doc for d, doc in test.corpus.items() if d in keep}
    data = BeirDataset(
        name=f"{test.name}[{len(corpus)}]", corpus=corpus, queries=test.queries, qrels=test.qrels
    )
    return data, ({q: full_train.queries[q] for q in train_qrels}, train_qrels)


def result_rows(results: Sequence[EvalResult], measures: Sequence[str]) -> list[list[Any]]:
    """One table row per result: label, measures (floats), then index seconds, training
    seconds, median query milliseconds and stored bytes per document, formatted."""
    rows = []
    for r in results:
        rows.append(
            [
                r.retriever,
                *(r.metrics.get(m) for m in measures),
                f"{r.index_seconds or 0.0:.1f}",
                None if r.fit_seconds is None else f"{r.fit_seconds:.1f}",
                None if r.median_query_ms is None else f"{r.median_query_ms:.1f}",
                None if r.bytes_per_document is None else _human_bytes(r.bytes_per_document),
            ]
        )
    return rows


RESULT_COLUMNS = ("index s", "train s", "median query ms", "stored / doc")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
