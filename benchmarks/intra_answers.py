"""INTRA `answer()` on SciFact claims: the retrieved chunks and the continuation generated from
their stored encoder states, beside re-encoding the same chunks' text (token equality, latency).

Reuses (or builds) an INTRA store of SciFact documents with the default backbone (T5Gemma2 from
Gemma 3 270M, generated memory adapters). Each claim is answered twice: from the stored states
and with ``reencode=True`` (the text-RAG baseline: the chunks' text encoded afresh); the JSON
records both texts, whether the token ids are identical, and both latencies.

    nice -n 10 python benchmarks/intra_answers.py --store /tmp/intra-gemma/store-generated
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--store", default="/tmp/intra-answers/store")
    ap.add_argument("--subset", type=int, default=300, help="documents to index if no store")
    ap.add_argument("--claims", type=int, default=5)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--query-positions", default="query+retrieval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results/intra_answers.json"))
    args = ap.parse_args()

    import torch

    from intrinsic_retrieval.eval import load_beir
    from intrinsic_retrieval.retrievers.intra import IntraRetriever

    torch.set_num_threads(args.threads)
    data = load_beir(args.dataset, split="test")
    qids = sorted(data.judged_queries())[: args.claims]
    r = IntraRetriever(
        path=args.store, query_positions=args.query_positions, max_length=256, show_progress=True
    )
    if len(r) == 0:
        pos = [d for q in qids for d in data.qrels[q]]
        rest = [d for d in sorted(data.corpus) if d not in pos][: args.subset - len(pos)]
        data.corpus = {d: data.corpus[d] for d in [*pos, *rest]}
        r.add(data.documents())
    r.answer(data.queries[qids[0]], k=args.k, max_new_tokens=4)  # warm-up
    rows, t_store, t_text, same = [], [], [], 0
    for q in qids:
        claim = data.queries[q]
        t0 = time.perf_counter()
        stored = r.answer(claim, k=args.k, max_new_tokens=args.max_new_tokens)
        t1 = time.perf_counter()
        fresh = r.answer(claim, k=args.k, max_new_tokens=args.max_new_tokens, reencode=True)
        t2 = time.perf_counter()
        t_store.append(t1 - t0)
        t_text.append(t2 - t1)
        identical = stored.token_ids == fresh.token_ids
        same += identical
        gold = sorted(data.qrels[q])
        top = [h.document_id for h in stored.context]
        rows.append(
            [
                claim,
                ", ".join(top) + f" (gold: {', '.join(gold)})",
                stored.text,
                "yes" if identical else "NO: " + fresh.text,
                round(1000 * (t1 - t0)),
                round(1000 * (t2 - t1)),
            ]
        )
        print(rows[-1], flush=True)
    out = {
        **result_head(__file__, "intra_answers", "INTRA answer(): SciFact claims, Gemma 3 270M"),
        "tables": [
            {
                "title": "Generation from stored chunk states vs re-encoding the chunks' text",
                "columns": [
                    "claim",
                    "chunks (document ids)",
                    "generated from stored states",
                    "identical tokens when re-encoding",
                    "ms stored",
                    "ms re-encode",
                ],
                "rows": rows,
                "notes": (
                    f"{same}/{len(rows)} identical; median end-to-end latency (retrieval + "
                    f"generation of {args.max_new_tokens} greedy tokens): "
                    f"{1000 * statistics.median(t_store):.0f} ms from stored states vs "
                    f"{1000 * statistics.median(t_text):.0f} ms re-encoding "
                    f"({statistics.median(t_store) / statistics.median(t_text):.2f}x). Backbone "
                    f"{r.model_name} (untrained retrieval head, query positions "
                    f"{args.query_positions}), k={args.k} chunks, {len(r)} chunks in the store. "
                    f"{args.threads} torch threads."
                ),
            }
        ],
    }
    write_result(args.out, out)


if __name__ == "__main__":
    main()
