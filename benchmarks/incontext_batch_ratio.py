"""In-context `search_batch` against single searches on an existing store (a quick check of
query packing; the full table is `benchmarks/roofline.py`'s).

    python benchmarks/incontext_batch_ratio.py --store ../stores/icr_train/incontext

Prints the median single search over `--singles` queries, one `search_batch` of `--queries`
SciFact test queries, their ratio, and whether the first three batched rankings equal single
searches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="an in-context store")
    ap.add_argument("--dataset", default=str(HERE.parent.parent / "shared/data/scifact"))
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--singles", type=int, default=8)
    ap.add_argument("--readout-layers", default="0-8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from intrinsic_retrieval import load_retriever

    torch.set_num_threads(args.threads)
    r = load_retriever(args.store, show_progress=False)
    lo, hi = (int(x) for x in args.readout_layers.split("-"))
    r.configure(route_layer=None, readout_layers=list(range(lo, hi + 1)), ssmax="auto")
    data = Path(args.dataset)
    lines = (data / "qrels/test.tsv").read_text().splitlines()[1:]
    test = {line.split("\t")[0] for line in lines if line}
    rows = [json.loads(x) for x in (data / "queries.jsonl").read_text().splitlines() if x]
    queries = [q["text"] for q in rows if q["_id"] in test][: args.queries]
    r.search(queries[0], k=10)  # warm-up: the calibration pass is cached after it
    singles = []
    for q in queries[: args.singles]:
        t = time.perf_counter()
        r.search(q, k=10)
        singles.append(time.perf_counter() - t)
    t = time.perf_counter()
    batch = r.search_batch(queries, k=10)
    batch_s = time.perf_counter() - t
    med = statistics.median(singles)
    same = all(
        [h.chunk_id for h in b] == [h.chunk_id for h in r.search(q, k=10)]
        for q, b in list(zip(queries, batch, strict=True))[:3]
    )
    n = len(queries)
    print(
        f"N={r.store.num_rows} documents: single search median {med:.2f} s; batch of {n} "
        f"{batch_s:.1f} s; {n} x single {n * med:.1f} s; ratio {batch_s / (n * med):.3f}; "
        f"same top-10 (3 checked): {same}"
    )


if __name__ == "__main__":
    main()
