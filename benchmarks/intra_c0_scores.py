"""INTRA's encoder-side stage (C0) on the Gemma 3 build: raw dot-product MaxSim against
centred, standardised and cosine variants, beside BM25 and dense in one run.

The C0 stage ranks chunks by MaxSim between the query's encoder states and each chunk's pooled
states. Gemma 3's final states carry a few very large dimensions, so a raw dot product is
dominated by them. The variants transform both sides by statistics of the stored pooled vectors
(documents only, no labels): subtract their mean (centred), also divide by their per-dimension
standard deviation (standardised), and optionally L2-normalise each vector (cosine). This is a
diagnostic: the retriever still ranks C0 by the raw dot product.

Reads an INTRA store built by `roofline.py --phase build` (SciFact test subset, seed 0):

    python benchmarks/intra_c0_scores.py --store ../stores/roofline/intra --docs 1000 \
        --out benchmarks/results/intra_c0_scores.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

Transform = Callable[[torch.Tensor], torch.Tensor]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    p.add_argument("--store", default=str(ROOT.parent / "stores" / "roofline" / "intra"))
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "intra_c0_scores.json"))
    args = p.parse_args()

    import ir_measures
    from ir_measures import R, nDCG

    from intrinsic_retrieval import load_retriever
    from intrinsic_retrieval.eval import evaluate, load_beir
    from intrinsic_retrieval.retrievers.bm25 import BM25Retriever
    from intrinsic_retrieval.retrievers.dense import DenseRetriever

    torch.set_num_threads(args.threads)
    data = load_beir(args.dataset, split="test").subset(args.docs, seed=0)
    r = load_retriever(args.store, show_progress=False)
    stored = r.store.document_ids()
    if stored != set(data.corpus):
        sys.exit(f"{args.store} does not hold the {args.docs}-document subset (seed 0)")
    rows: list[list] = []
    for name, cls in (("BM25", BM25Retriever), ("dense (all-MiniLM-L6-v2)", DenseRetriever)):
        base = cls(path=None, show_progress=False)
        base.add(data.documents())
        m = evaluate(base, data, name=name, show_progress=False).metrics
        rows.append([name, round(m["nDCG@10"], 4), round(m["R@100"], 4), None])
        print(rows[-1], flush=True)

    live = r.store.live_rows()
    row_doc = {row: d for d, rs in r.store.rows_by_id(list(data.corpus)).items() for row in rs}
    docs_of = [row_doc[int(x)] for x in live]
    qids = sorted(data.qrels)
    t = time.perf_counter()
    states: list[torch.Tensor] = []
    for i in range(0, len(qids), 32):
        states += r.encode_states([data.queries[q] for q in qids[i : i + 32]])
    encode_ms = (time.perf_counter() - t) / len(qids) * 1000
    pooled = r.pooled_vectors().float()[live]
    n, per, d = pooled.shape
    flat = pooled.reshape(-1, d)
    mu, sd = flat.mean(0), flat.std(0) + 1e-6

    def unit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=-1)

    variants: list[tuple[str, Transform]] = [
        ("raw dot product (what the retriever uses)", lambda x: x),
        ("centred", lambda x: x - mu),
        ("centred, cosine", lambda x: unit(x - mu)),
        ("standardised", lambda x: (x - mu) / sd),
        ("standardised, cosine", lambda x: unit((x - mu) / sd)),
    ]
    for name, f in variants:
        t = time.perf_counter()
        docs_t = f(flat).t()
        run: dict[str, dict[str, float]] = {}
        for q, s in zip(qids, states, strict=True):
            scores = (f(s.float()) @ docs_t).view(-1, n, per).amax(-1).sum(0)
            best: dict[str, float] = {}
            for doc, v in zip(docs_of, scores.tolist(), strict=True):
                best[doc] = max(best.get(doc, float("-inf")), v)
            run[q] = dict(sorted(best.items(), key=lambda x: -x[1])[:100])
        scan_ms = (time.perf_counter() - t) / len(qids) * 1000
        m = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], data.qrels, run)
        rows.append(
            [f"INTRA C0 stage, {name}", round(m[nDCG @ 10], 4), round(m[R @ 100], 4), scan_ms]
        )
        print(rows[-1], flush=True)

    result = result_head(__file__, "intra_c0_scores", "INTRA's encoder-side stage (C0) scores")
    top = torch.topk(mu.abs(), 3)
    result["tables"] = [
        {
            "title": (
                f"Encoder-side MaxSim on {len(data.corpus)} SciFact documents ({n} chunks x {per} "
                f"pooled vectors), {len(qids)} test queries"
            ),
            "columns": ["ranking", "nDCG@10", "R@100", "scan ms/query"],
            "rows": rows,
            "notes": [
                "Gemma 3 270M T5Gemma2 build (causal encoder, generated memory adapters), the "
                "store roofline.py builds. Statistics (mean, per-dimension standard deviation) "
                "are over the stored pooled vectors: documents only, no labels.",
                f"Largest mean dimensions: {top.indices.tolist()} at "
                f"{[round(v, 1) for v in top.values.tolist()]} (median |mean| "
                f"{float(mu.abs().median()):.2f}). Query encoding: {encode_ms:.0f} ms/query, "
                "batches of 32 (not in the scan column).",
                "scan ms/query: the transform and an exhaustive scan in Python, not the "
                "library's kernel; for comparing rankings, not speed.",
            ],
        }
    ]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
