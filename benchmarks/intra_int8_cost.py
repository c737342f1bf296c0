"""What int8 token states cost IntraRetriever: float16 vs int8 stores of the same SciFact subset.

Both stores hold the same chunks, encoded by the same BERT2BERT-from-all-MiniLM-L6-v2 backbone
(`IntraRetriever(None)`, untrained retrieval head); only ``store_dtype`` differs. Pooled vectors
are float32 in both (CPU default), so the encoder stage reads identical data and any change comes
from the dequantised token states that full INTRA (C0 cross-attention memory) and `answer()`
read. Reported: stored bytes per chunk, nDCG@10 / R@10 of the encoder stage and of full INTRA
against the qrels, top-10 agreement of the int8 ranking with the float16 one, and for `answer()`
(k=5, greedy) the logit difference and share of identical outputs.

    nice -n 10 python benchmarks/intra_int8_cost.py
    # quick check: --docs 40 --queries 5 --out /tmp/intra_int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

DTYPES = ("float16", "int8")


def top10(run: dict[str, float]) -> list[str]:
    return [d for d, _ in sorted(run.items(), key=lambda x: -x[1])[:10]]


Run = dict[str, dict[str, float]]


def agreement(a: Run, b: Run) -> tuple[float, float]:
    """Mean |top-10(a) & top-10(b)| / 10 over queries, and the share of identical top-10 lists
    (same documents, same order)."""
    overlap = [len(set(top10(a[q])) & set(top10(b[q]))) / 10 for q in a]
    same = [top10(a[q]) == top10(b[q]) for q in a]
    return statistics.fmean(overlap), statistics.fmean(same)


def compared_steps(ids_a: list[int], ids_b: list[int]) -> int:
    """Steps whose logits are comparable: identical prefixes up to and including the first
    differing greedy token (later steps condition on different text)."""
    n = min(len(ids_a), len(ids_b))
    for i in range(n):
        if ids_a[i] != ids_b[i]:
            return i + 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--queries", type=int, default=50, help="first N judged test queries")
    ap.add_argument("--docs", type=int, default=500, help="their positives + random docs up to N")
    ap.add_argument("--workdir", default="/tmp/intra-int8-cost")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrieval-tokens", type=int, default=8)
    ap.add_argument("--pooled", type=int, default=8)
    ap.add_argument("--k0", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--cross-init", default="random", choices=("random", "self"))
    ap.add_argument("--answer-k", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results/intra_int8.json"))
    args = ap.parse_args()

    import shutil

    import torch
    from ir_measures import R, nDCG

    from intrinsic_retrieval.eval import load_beir
    from intrinsic_retrieval.eval.metrics import evaluate_run
    from intrinsic_retrieval.eval.runner import run_queries
    from intrinsic_retrieval.retrievers.intra import IntraRetriever
    from intrinsic_retrieval.retrievers.intra.generate import generate

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    data = load_beir(args.dataset, split="test")
    keep = [q for q in data.qrels if q in data.queries][: args.queries]  # qrels file order
    data.qrels = {q: data.qrels[q] for q in keep}
    data = data.subset(args.docs, seed=0)  # every positive of those queries + random others
    docs = data.documents()
    queries = data.judged_queries()
    measures = [nDCG @ 10, R @ 10]
    print(f"{len(docs)} documents, {len(queries)} queries", flush=True)

    stores: dict[str, IntraRetriever] = {}
    rows_bytes = []
    for dt in DTYPES:
        path = work / f"store-{dt}"
        shutil.rmtree(path, ignore_errors=True)
        r = IntraRetriever(
            None,
            store_dtype=dt,
            retrieval_tokens=args.retrieval_tokens,
            pooled=args.pooled,
            k0=args.k0,
            max_length=args.max_length,
            cross_init=args.cross_init,
            path=path,
            show_progress=False,
        )
        r.add(docs)
        r.search("warm-up: protein folding in cells", k=10)  # before the timed searches
        stores[dt] = r
        b = r.bytes_per_chunk()
        rows_bytes.append(
            [
                dt,
                len(r),
                round(b["tokens"], 1),
                round(b["states"]),
                round(b["pooled"]),
                round(b["stored"]),
                round(r.store.nbytes() / len(r)),
            ]
        )
        print(rows_bytes[-1], flush=True)
    ratio = rows_bytes[1][3] / rows_bytes[0][3]

    # ---- retrieval quality and agreement, per stage
    runs: dict[tuple[str, str], dict] = {}
    rows_quality = []
    for stage in ("encoder", "intra"):
        for dt in DTYPES:
            r = stores[dt]
            with r.using(mode=stage):
                t0 = time.perf_counter()
                run = run_queries(r, queries, k=10, show_progress=False)
                ms = (time.perf_counter() - t0) / max(len(queries), 1) * 1000
            runs[stage, dt] = run
            m = evaluate_run(data.qrels, run, measures)
            rows_quality.append(
                [stage, dt, round(m["nDCG@10"], 4), round(m["R@10"], 4), round(ms, 1)]
            )
            print(rows_quality[-1], flush=True)
    rows_agree = []
    for stage in ("encoder", "intra"):
        overlap, same = agreement(runs[stage, "int8"], runs[stage, "float16"])
        rows_agree.append([stage, round(overlap, 4), round(same, 4)])
    print(rows_agree, flush=True)

    # ---- answer(): end to end (retrieval may pick other chunks) and on the same chunks
    same_ctx, same_out, diffs, scale = [], [], [], []
    iso_out, iso_diffs = [], []
    r16, r8 = stores["float16"], stores["int8"]
    for q in queries.values():
        a16 = r16.answer(q, k=args.answer_k, max_new_tokens=args.new_tokens, return_logits=True)
        a8 = r8.answer(q, k=args.answer_k, max_new_tokens=args.new_tokens, return_logits=True)
        same_ctx.append([h.chunk_id for h in a8.context] == [h.chunk_id for h in a16.context])
        same_out.append(a8.token_ids == a16.token_ids)
        n = compared_steps(a8.token_ids, a16.token_ids)
        diffs.append(float((a8.logits[:n] - a16.logits[:n]).abs().max()))
        scale.append(float(a16.logits.abs().max()))
        # the int8 store's states for exactly the chunks the float16 answer used
        rows8 = [r8.store.row_of(h.chunk_id) for h in a16.context]
        memory, mask, _ = r8.memory_for(rows8)
        ids8, logits8 = generate(
            r8, q, memory, mask, max_new_tokens=args.new_tokens, return_logits=True
        )
        assert logits8 is not None
        iso_out.append(ids8 == a16.token_ids)
        n = compared_steps(ids8, a16.token_ids)
        iso_diffs.append(float((logits8[:n] - a16.logits[:n]).abs().max()))
    rows_answer = [
        [
            "answer() end to end",
            round(statistics.fmean(same_ctx), 4),
            round(statistics.fmean(same_out), 4),
            round(max(diffs), 5),
            round(statistics.median(diffs), 5),
            round(statistics.median(scale), 3),
        ],
        [
            "same chunks (float16 answer's context)",
            1.0,
            round(statistics.fmean(iso_out), 4),
            round(max(iso_diffs), 5),
            round(statistics.median(iso_diffs), 5),
            round(statistics.median(scale), 3),
        ],
    ]
    print(rows_answer, flush=True)

    setup = (
        f"SciFact test: first {len(queries)} judged queries (qrels file order), corpus subset of "
        f"{len(docs)} documents (their positives + random others, seed 0). Backbone BERT2BERT "
        f"from all-MiniLM-L6-v2, {args.cross_init} cross-attention (seed 0), untrained "
        f"retrieval head; m={args.retrieval_tokens}, p={args.pooled}, k0={args.k0}, "
        f"max_length={args.max_length}, pooled vectors {r16.pooled_dtype} in both stores. "
        f"{args.threads} torch thread(s)."
    )
    out = {
        **result_head(
            __file__,
            "intra_int8",
            "IntraRetriever: int8 vs float16 token states (bytes and quality cost)",
        ),
        "tables": [
            {
                "title": "Stored bytes per chunk",
                "columns": [
                    "store_dtype",
                    "chunks",
                    "tokens/chunk",
                    "token states B/chunk",
                    "pooled B/chunk",
                    "shard B/chunk",
                    "on disk B/chunk",
                ],
                "rows": rows_bytes,
                "notes": (
                    f"int8 token states = {ratio:.3f} x float16 (d int8 codes + one float16 "
                    "scale per token vs 2d bytes). Token states B/chunk from the stored tensors "
                    "(int8 scales included); shard bytes add offsets and safetensors headers; "
                    "on disk adds SQLite (chunk text, metadata) and the manifest. " + setup
                ),
            },
            {
                "title": "Retrieval quality (document level, BEIR qrels)",
                "columns": ["stage", "store_dtype", "nDCG@10", "R@10", "ms/query"],
                "rows": rows_quality,
                "notes": (
                    "encoder = C0 stage alone (reads only pooled vectors, unquantised in both "
                    "stores); intra = full INTRA (the retrieval pass reads C0's token states). "
                    + setup
                ),
            },
            {
                "title": "Agreement of the int8 store's ranking with the float16 store's",
                "columns": ["stage", "mean top-10 overlap", "identical top-10 lists"],
                "rows": rows_agree,
                "notes": "Document-level top 10 per query; identical = same documents, same order.",
            },
            {
                "title": f"answer(): int8 vs float16 store (k={args.answer_k}, "
                f"{args.new_tokens} greedy tokens)",
                "columns": [
                    "comparison",
                    "same context",
                    "identical greedy output",
                    "max abs logit diff",
                    "median per-query max abs logit diff",
                    "median max |logit| (float16)",
                ],
                "rows": rows_answer,
                "notes": (
                    "Logits compared over the steps with identical prefixes (up to and including "
                    "the first differing token). 'same chunks' generates from the int8 store's "
                    "states of exactly the chunks the float16 answer used, isolating the "
                    "quantisation from retrieval changes. " + setup
                ),
            },
        ],
    }
    for r in stores.values():
        r.close()
    write_result(args.out, out)
    print(json.dumps(out["tables"], indent=1))


if __name__ == "__main__":
    main()
