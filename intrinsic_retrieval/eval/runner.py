"""Run a retriever over a BEIR dataset and score it; the numbers every benchmark reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..protocol import Retriever
from ..types import Hit
from .beir import BeirDataset
from .metrics import DEFAULT_MEASURES, evaluate_run


def document_run(hits: Sequence[Hit]) -> dict[str, float]:
    """Chunk hits -> document scores (a document scores as its best chunk)."""
    out: dict[str, float] = {}
    for h in hits:
        if h.document_id not in out or h.score > out[h.document_id]:
            out[h.document_id] = float(h.score)
    return out


@dataclass
class EvalResult:
    retriever: str
    dataset: str
    num_docs: int
    num_chunks: int
    num_queries: int
    metrics: dict[str, float]
    index_seconds: float | None = None
    search_seconds: float = 0.0
    #: median over queries of each batch's wall time / its size (with batch_size=1: per query)
    median_query_ms: float | None = None
    fit_seconds: float | None = None
    bytes_per_document: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_queries(
    retriever: Retriever,
    queries: dict[str, str],
    *,
    k: int = 100,
    batch_size: int = 32,
    show_progress: bool = True,
    timings: list[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Document-level runs of `queries`; per-query seconds (batch time / batch size) are
    appended to `timings` when given."""
    qids = list(queries)
    run: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(qids), desc="searching", unit="q", disable=not show_progress)
    with bar:
        for i in range(0, len(qids), batch_size):
            part = qids[i : i + batch_size]
            # documents have several chunks: fetch more so k distinct documents survive
            t0 = time.perf_counter()
            results = retriever.search_batch([queries[q] for q in part], k=k * 2)
            if timings is not None:
                timings.extend([(time.perf_counter() - t0) / len(part)] * len(part))
            for qid, hits in zip(part, results, strict=True):
                docs = document_run(hits)
                run[qid] = dict(sorted(docs.items(), key=lambda x: -x[1])[:k])
            bar.update(len(part))
    return run


def evaluate(
    retriever: Retriever,
    dataset: BeirDataset,
    *,
    name: str | None = None,
    k: int = 100,
    batch_size: int = 32,
    measures: Iterable = DEFAULT_MEASURES,
    index_seconds: float | None = None,
    show_progress: bool = True,
) -> EvalResult:
    """Search every judged query of `dataset` and compute `measures` at document level."""
    queries = dataset.judged_queries()
    t0 = time.perf_counter()
    timings: list[float] = []
    run = run_queries(
        retriever,
        queries,
        k=k,
        batch_size=batch_size,
        show_progress=show_progress,
        timings=timings,
    )
    elapsed = time.perf_counter() - t0
    metrics = evaluate_run(dataset.qrels, run, measures)
    return EvalResult(
        retriever=name or type(retriever).__name__,
        dataset=dataset.name,
        num_docs=len(dataset.corpus),
        num_chunks=len(retriever),
        num_queries=len(queries),
        metrics=metrics,
        index_seconds=index_seconds,
        search_seconds=elapsed,
        median_query_ms=1000 * statistics.median(timings) if timings else None,
        bytes_per_document=_bytes_per_document(retriever),
    )


def _bytes_per_document(retriever: Retriever) -> float | None:
    fn = getattr(retriever, "bytes_per_document", None)
    return float(fn()) if callable(fn) else None
