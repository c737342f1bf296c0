"""Where INTRA's `search_batch` saves over single searches, phase by phase: the encoder over
the queries, the MaxSim scan that picks each query's C0, the decoder pass over C0 and the
Reverse-QWK scoring of every pooled vector. Each phase is timed for one batch of 32 distinct
SciFact test queries (roofline.py's: the first judged test queries of the 1,000-document subset)
and for the same queries searched one at a time, alternating, `--repeats` times (medians
reported: this machine is noisy), beside each phase's FLOPs (`roofline.intra_flops`) and this
machine's float32 sgemm rate measured in the same run. Then the decoder phase alone at several
decoder batch sizes.

    python benchmarks/intra_batch_phases.py --out benchmarks/results/intra_batch_phases.json

The store is the one `roofline.py --phase build` makes; its head may be untrained, as in
roofline.py: the work of a search does not depend on the head's values.
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
from roofline import intra_flops, measured_queries, sgemm_gflops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

PHASES = ("encoder", "C0 scan", "decoder", "scoring")


def phase_seconds(r: Any, queries: Sequence[str], decoder_batch: int) -> dict[str, float]:
    """The steps of `IntraRetriever._score` (and `retrieval_passes`' grouping), each timed, and
    the share of C0 chunks that are distinct within each decoder call (each is projected once).
    Keep in step with those two methods."""
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
        folded = r.retrieval_passes(list(queries), c0s, batch=decoder_batch)
        t.append(time.perf_counter())
        r.score_folded_many(folded, candidates, 10, [c0 for c0, _ in first])
        t.append(time.perf_counter())
    out = {p: b - a for p, a, b in zip(PHASES, t, t[1:], strict=False)}  # t has one more entry
    calls = [c0s[i : i + decoder_batch] for i in range(0, len(c0s), decoder_batch)]
    distinct = sum(len({c for c0 in call for c in c0}) for call in calls)
    out["distinct"] = distinct / max(1, sum(len(c) for c in c0s))
    return out


def main() -> None:
    from intrinsic_retrieval.retrievers.intra.retriever import DECODER_BATCH

    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--store", default=str(ROOT.parent / "stores" / "roofline" / "intra"))
    ap.add_argument("--docs", type=int, default=1000, help="the subset the store holds")
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoder-batches", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "intra_batch_phases.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from intrinsic_retrieval import load_retriever
    from intrinsic_retrieval.eval import load_beir

    r = load_retriever(args.store, show_progress=False)
    data = load_beir(args.dataset, split="test").subset(args.docs, seed=0)
    queries = measured_queries(data, args.queries)
    rate = sgemm_gflops()
    flops = intra_flops(r, queries, probe=len(queries))
    # warm-up of both code paths: caches are not in the figures
    phase_seconds(r, queries[:4], DECODER_BATCH)
    phase_seconds(r, queries[:1], DECODER_BATCH)
    batch: dict[str, list[float]] = {p: [] for p in PHASES}
    single: dict[str, list[float]] = {p: [] for p in PHASES}
    distinct: list[float] = []
    for rep in range(args.repeats):
        timed = phase_seconds(r, queries, DECODER_BATCH)
        distinct.append(timed.pop("distinct"))
        for p, s in timed.items():
            batch[p].append(s)
        per_query = [phase_seconds(r, [q], DECODER_BATCH) for q in queries]
        for p in PHASES:
            single[p].append(sum(x[p] for x in per_query))
        print(f"repeat {rep}: batch {batch}, singles {single}", flush=True)
    share = statistics.median(distinct)
    n = len(queries)
    # FLOPs per query: a single search projects all of its C0, a batch each distinct chunk once
    counted = {
        "encoder": flops["encoder"],
        "C0 scan": flops["C0 scan"],
        "decoder": flops["decoder"] + flops["decoder K/V"],
        "scoring": flops["scoring"],
    }
    done = {**counted, "decoder": flops["decoder"] + share * flops["decoder K/V"]}
    med_b = {p: statistics.median(batch[p]) for p in PHASES}
    med_s = {p: statistics.median(single[p]) for p in PHASES}
    for d in (med_b, med_s, counted, done):
        d["total"] = sum(d[p] for p in PHASES)
    bound = {p: n * f / (rate * 1e9) for p, f in done.items()}  # batch work at the sgemm rate
    bound_single = {p: n * f / (rate * 1e9) for p, f in counted.items()}
    rows = [
        [
            p,
            round(counted[p] / 1e9, 2),
            round(done[p] / 1e9, 2),
            round(med_b[p], 2),
            round(med_s[p], 2),
            round(med_b[p] / med_s[p], 3),
            round(med_b[p] / bound[p], 2),
            round(med_s[p] / bound_single[p], 2),
        ]
        for p in [*PHASES, "total"]
    ]
    dec_rows = [
        [size, round(phase_seconds(r, queries, size)["decoder"], 2)]
        for size in [int(x) for x in args.decoder_batches.split(",")]
    ]
    live = int(r.store.live_rows().numel())
    result = {
        **result_head(__file__, "intra_batch_phases", "INTRA search_batch, phase by phase"),
        "sgemm_gflops": rate,
        "flops_per_query": flops,
        "distinct_c0_share": distinct,
        "batch_s": batch,
        "singles_s": single,
        "tables": [
            {
                "title": f"{n} queries as one batch against {n} single searches, per phase",
                "columns": [
                    "phase",
                    "GFLOP / query, single",
                    "GFLOP / query, in the batch",
                    f"batch of {n} s",
                    f"{n} singles s",
                    "batch / singles",
                    "batch x compute bound",
                    "singles x compute bound",
                ],
                "rows": rows,
                "notes": [
                    f"{live} chunks ({args.docs} SciFact documents), the first {n} judged test "
                    f"queries; Gemma 3 270M as T5Gemma2, k0={r.k0}, m={r.m}, p={r.p}, head "
                    f"{'trained' if r.trained else 'untrained'} (the work is the same); medians "
                    f"of {args.repeats} alternating repeats; decoder batch {DECODER_BATCH} (the "
                    f"library's); float32 sgemm {rate:.0f} GFLOP/s measured at the start",
                    "x compute bound = time / (FLOPs / sgemm rate). A single search projects "
                    "its whole C0 to cross-attention keys and values in every layer; a decoder "
                    "call projects each distinct chunk of its queries' C0s once: "
                    f"{share:.0%} of them were distinct (median), and the batch's decoder "
                    "FLOPs count only those",
                    "per query and not shared by a batch: the decoder layers over the query's "
                    "own tokens and its attention over its own C0, and its m x layers x heads "
                    "folded vectors against every pooled vector",
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
