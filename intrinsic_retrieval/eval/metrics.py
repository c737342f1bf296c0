"""Standard IR metrics through ir-measures (pytrec_eval underneath): nothing hand-written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import ir_measures
from ir_measures import MRR, R, nDCG

DEFAULT_MEASURES = (nDCG @ 10, R @ 10, R @ 100, MRR @ 10)


def parse_measures(names: Iterable[str]) -> list:
    """``["nDCG@10", "R@100", "RR@10"]`` -> ir-measures objects."""
    return [ir_measures.parse_measure(n) for n in names]


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Iterable = DEFAULT_MEASURES,
) -> dict[str, float]:
    """Mean of each measure over the judged queries (a query with no results counts as 0)."""
    measures = list(measures)
    qrels = {q: dict(d) for q, d in qrels.items()}
    # pytrec_eval skips queries absent from the run; a placeholder makes them count as zero.
    full_run = {q: dict(run.get(q) or {"__no_result__": 0.0}) for q in qrels}
    agg = ir_measures.calc_aggregate(measures, qrels, full_run)
    return {str(m): float(agg.get(m, 0.0)) for m in measures}
