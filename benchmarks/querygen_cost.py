"""What model-written queries cost: queries per second for each packaged LM, and samples.

    python benchmarks/querygen_cost.py --docs 24 --per-doc 3 --models smollm2,gemma3

Writes benchmarks/results/querygen_cost.json (table: model, documents, queries written, seconds,
queries/s, documents/s) plus a few written queries per model, so their quality can be read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _report import result_head, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="../shared/data/scifact")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--per-doc", type=int, default=3)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/querygen_cost.json")
    args = ap.parse_args()

    import torch

    from intrinsic_retrieval.eval import load_beir
    from intrinsic_retrieval.training.queries import LMQueryGenerator

    torch.set_num_threads(args.threads)
    corpus = list(load_beir(args.dataset).corpus.values())[: args.docs]
    texts = [d.text for d in corpus]
    rows, samples = [], {}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        gen = LMQueryGenerator(name, batch_size=args.batch_size, show_progress=False)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        written = gen.generate(texts, args.per_doc)
        secs = time.perf_counter() - t0
        n = sum(len(qs) for qs in written)
        rows.append([name, len(texts), n, round(secs, 1), round(n / secs, 2),
                     round(len(texts) / secs, 2), round(load_s, 1)])  # fmt: skip
        samples[name] = [
            {"document": corpus[i].text[:160], "queries": written[i]} for i in range(3)
        ]
        print(rows[-1], flush=True)
    result = result_head(__file__, "querygen_cost", "Model-written queries: cost per packaged LM")
    result["tables"] = [
        {
            "title": f"Queries written for {args.docs} SciFact documents ({args.per_doc} asked "
            f"per document, batch {args.batch_size})",
            "columns": [
                "model",
                "documents",
                "queries written",
                "seconds",
                "queries/s",
                "documents/s",
                "load s",
            ],
            "rows": rows,
            "notes": "queries written counts the usable ones (at least two words, no duplicates); "
            "SmolLM2-135M-Instruct writes all of a document's questions in one chat answer, "
            "Gemma 3 270M base samples one per sequence after a two-example prompt.",
        }
    ]
    result["samples"] = samples
    write_result(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
