"""Where INTRA's `search_batch` saves over single searches, phase by phase: the encoder over
the queries, the MaxSim scan that picks each query's C0, the decoder pass over C0 and the
Reverse-QWK scoring of every pooled vector. Each phase is timed for one batch of 32 distinct
SciFact test queries and for the same 32 queries searched one at a time, alternating, `--repeats`
times (medians reported: this machine is noisy), with each phase's FLOPs per query
(`roofline.intra_flops`) against this machine's float32 sgemm rate measured in the same run.
Then the decoder phase alone at several decoder batch sizes.

    python benchmarks/intra_batch_phases.py --store ../stores/roofline/intra \
        --out benchmarks/results/intra_batch_phases.json

The store is the one `roofline.py --phase build` makes (1,000 SciFact documents); its head may
be untrained, as in roofline.py: the work of a search does not depend on the head's values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _report import result_head, write_result
from roofline import intra_flops, sgemm_gflops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PHASES = ("encoder", "C0 scan", "decoder", "scoring")


def phase_seconds(r: Any, queries: Sequence[str], decoder_batch: int) -> dict[str, float]:
    """The steps of `IntraRetriever._score` for `queries` as one batch, each timed."""
    from intrinsic_retrieval.retrievers.intra.retriever import DECODER_BATCH

    live = r.store.live_rows()
    candidates = torch.zeros(r.store.num_rows, dtype=torch.bool)
    candidates[live] = True
    t = [time.perf_counter()]
    with torch.no_grad():
        states = r.encode_states(list(queries))
        t.append(time.perf_counter())
        first = r.initial_contexts(states, candidates, r.k0)
        t.append(time.perf_counter())
        c0s = [c0.tolist() for c0, _ in first]
        shared = [len({c for g in groups for c in g}) for groups in _groups(c0s, decoder_batch)]
        folded = r.retrieval_passes(list(queries), c0s, batch=decoder_batch or DECODER_BATCH)
        t.append(time.perf_counter())
        r.score_folded_many(folded, candidates, 10, [c0 for c0, _ in first])
        t.append(time.perf_counter())
    out = {p: b - a for p, a, b in zip(PHASES, t, t[1:], strict=False)}  # t has one more entry
    out["distinct C0 chunks"] = sum(shared) / max(1, sum(len(c) for c in c0s))
    return out


def _groups(c0s: list[list[int]], decoder_batch: int) -> list[list[list[int]]]:
    """The C0s each decoder call projects together (`retrieval_passes` batches)."""
    from intrinsic_retrieval.retrievers.intra.retriever import DECODER_BATCH

    size = decoder_batch or DECODER_BATCH
    return [c0s[i : i + size] for i in range(0, len(c0s), size)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--store", default=str(ROOT.parent / "stores" / "roofline" / "intra"))
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoder-batches", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "intra_batch_phases.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from intrinsic_retrieval import load_retriever
    from intrinsic_retrieval.eval import load_beir
    from intrinsic_retrieval.retrievers.intra.retriever import DECODER_BATCH

    r = load_retriever(args.store, show_progress=False)
    queries = list(load_beir(args.dataset, split="test").queries.values())[: args.queries]
    rate = sgemm_gflops()
    flops = intra_flops(r, queries)
    phase_seconds(r, queries[:4], 0)  # warm-up: caches are not in the figures
    batch: dict[str, list[float]] = {p: [] for p in PHASES}
    single: dict[str, list[float]] = {p: [] for p in PHASES}
    distinct = 1.0
    for rep in range(args.repeats):
        timed = phase_seconds(r, queries, 0)
        distinct = timed.pop("distinct C0 chunks")
        for p, s in timed.items():
            batch[p].append(s)
        per_query = [phase_seconds(r, [q], 0) for q in queries]
        for p in PHASES:
            single[p].append(sum(x[p] for x in per_query))
        print(f"repeat {rep}: batch {batch}, singles {single}", flush=True)
    n = len(queries)
    med_b = {p: statistics.median(batch[p]) for p in PHASES}
    med_s = {p: statistics.median(single[p]) for p in PHASES}
    med_b["total"], med_s["total"] = sum(med_b.values()), sum(med_s.values())
    flops["total"] = sum(flops[p] for p in PHASES)
    rows = []
    for p in [*PHASES, "total"]:
        b, s, f = med_b[p], med_s[p], flops[p]
        rows.append(
            [
                p,
                round(f / 1e9, 2),
                round(b, 2),
                round(s, 2),
                round(b / s, 3),
                round(f * n / b / 1e9, 1),
                round(b / (f * n / (rate * 1e9)), 2),
            ]
        )
    dec_rows = []
    for size in [int(x) for x in args.decoder_batches.split(",")]:
        dec_rows.append([size, round(phase_seconds(r, queries, size)["decoder"], 2)])
    live = int(r.store.live_rows().numel())
    result = {
        **result_head(__file__, "intra_batch_phases", "INTRA search_batch, phase by phase"),
        "sgemm_gflops": rate,
        "flops_per_query": flops,
        "batch_s": batch,
        "singles_s": single,
        "tables": [
            {
                "title": f"{n} queries as one batch against {n} single searches, per phase",
                "columns": [
                    "phase",
                    "GFLOP per query",
                    f"batch of {n} s",
                    f"{n} singles s",
                    "batch / singles",
                    "batch GFLOP/s",
                    "batch x compute bound",
                ],
                "rows": rows,
                "notes": [
                    f"{live} chunks (1,000 SciFact documents), Gemma 3 270M as T5Gemma2, "
                    f"k0={r.k0}, m={r.m}, p={r.p}, head {'trained' if r.trained else 'untrained'}"
                    f" (the work is the same); medians of {args.repeats} alternating "
                    f"repeats; decoder batch {DECODER_BATCH} (the library's); float32 sgemm "
                    f"{rate:.0f} GFLOP/s measured at the start",
                    "x compute bound = batch time / (FLOPs of the batch / sgemm rate); FLOPs "
                    "count every query's C0 projection, but a decoder batch projects each "
                    f"distinct C0 chunk once: {distinct:.0%} of the batch's C0 chunks were "
                    "distinct"
                    + (", so the decoder row did less work than counted" if distinct < 1 else ""),
                    "each query's decoder pass reads its own C0 (k0 chunks' stored token states, "
                    "projected to cross-attention keys and values in every layer) and its "
                    "scoring folds its own m x layers x heads queries against every pooled "
                    "vector: neither is shared between queries unless their C0s overlap",
                ],
            },
            {
                "title": "Decoder phase alone, by decoder batch size",
                "columns": ["decoder batch", f"decoder s for {n} queries"],
                "rows": dec_rows,
                "notes": ["one run each, after the table above"],
            },
        ],
    }
    write_result(args.out, result)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
