"""In-context query pass: the layer-major K/V layout against the token-major one, side by side.

The two stores `roofline.py --phase build` makes (`incontext`, layer layout, and
`incontext-token`, the same numbers converted to the layout stores had before `kv_layout`)
answer the same queries, alternating store by store so that a noisy host slows both alike. For
each mode (every layer read; routing at layer r to B blocks) it reports the median time per
query, the ratio, how far each sits from this machine's sgemm rate (measured in the same run),
and whether the two gave the same ids and scores.

    python benchmarks/roofline.py --phase build --docs 1000 --retrievers incontext,incontext-token
    python benchmarks/incontext_layout.py --queries 6 --out benchmarks/results/incontext_layout.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _report import result_head, write_result
from roofline import ROOT, _data, _table, incontext_work, measured_queries, sgemm_gflops

STORES = ("incontext", "incontext-token")


def read_only(args: argparse.Namespace, rs: dict[str, Any], repeats: int = 5) -> None:
    """Read and convert every stored layer of every block, in the query pass's own block
    batches (for a 32-token query), layout against layout, alternating, median of `repeats`:
    the part of a query that the layout changes, beside the memory-copy rate of the same run."""
    from roofline import copy_gbs

    from intrinsic_retrieval.retrievers.incontext.attention import _docs_per_batch

    cpu = torch.device("cpu")
    times: dict[str, list[float]] = {n: [] for n in STORES}
    copy = [copy_gbs()]
    nbytes = 0.0
    for _ in range(repeats):
        for n, r in rs.items():
            corpus, a = r.corpus(), r.arch
            docs = r.store.live_rows()
            rows = int(r.model.config.num_attention_heads) * 32
            kv_bytes = 8 * a.num_kv_heads * a.head_dim
            step = _docs_per_batch(r.block_docs, rows, corpus.lengths[docs], kv_bytes, cpu)
            t = time.perf_counter()
            total = 0
            for layer in range(r._depth()):
                for start in range(0, len(docs), step):
                    k, v, _ = corpus.batch(layer, docs[start : start + step], cpu)
                    total += 2 * (k.numel() + v.numel())  # float16 bytes read
            times[n].append(time.perf_counter() - t)
            nbytes = float(total)
    copy.append(copy_gbs())
    med = {n: statistics.median(v) for n, v in times.items()}
    rate = statistics.mean(copy)
    row = {
        "work": "read + convert to float32: every stored layer of every block (one query's)",
        "MB read (float16)": round(nbytes / 1e6),
        "memory copy GB/s (mean before/after)": round(rate, 1),
        "layer layout s": round(med["incontext"], 2),
        "token layout s": round(med["incontext-token"], 2),
        "token / layer": round(med["incontext-token"] / med["incontext"], 2),
        "layer x memory bound": round(med["incontext"] / (nbytes / (rate * 1e9)), 2),
        "token x memory bound": round(med["incontext-token"] / (nbytes / (rate * 1e9)), 2),
    }
    print(row, flush=True)
    result = result_head(__file__, "incontext_layout_read", "In-context K/V layout: the read alone")
    title = (
        f"Reading one query's stored K/V, {args.docs} documents (Gemma 3 270M, 300-token blocks, "
        f"float16, memory-mapped, in the page cache), median of {repeats} sweeps per layout"
    )
    note = (
        "The query pass's own block batches (_docs_per_batch); the two stores alternate; x memory "
        "bound = time / (float16 bytes read / memory-copy rate of the same run)."
    )
    result.update(
        {
            "documents": args.docs,
            "repeats": repeats,
            "rows": [row],
            "tables": [_table(title, [row], [note])],
        }
    )
    write_result(args.out, result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    p.add_argument("--workdir", default=str(ROOT.parent / "stores" / "roofline"))
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--route-layer", type=int, default=8)
    p.add_argument("--route-top", type=int, default=100)
    p.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "incontext_layout.json")
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="time only the reading and float32 conversion of every stored layer of every block "
        "(what the layout changes), not whole queries",
    )
    args = p.parse_args()

    from intrinsic_retrieval import load_retriever

    work = Path(args.workdir)
    missing = [n for n in STORES if not (work / n).exists()]
    if missing:
        sys.exit(f"no {', '.join(missing)} store in {work}: run roofline.py --phase build first")
    queries = measured_queries(_data(args), args.queries)
    rs = {n: load_retriever(work / n, show_progress=False) for n in STORES}
    if args.read_only:
        read_only(args, rs)
        return
    route = (args.route_layer, args.route_top)
    sgemm = [sgemm_gflops()]
    rows: list[dict[str, Any]] = []
    for mode in (None, route):
        opts = {} if mode is None else {"route_layer": mode[0], "route_top": mode[1]}
        times: dict[str, list[float]] = {n: [] for n in STORES}
        same = True
        for r in rs.values():  # warm-up: the calibration pass is cached after it
            with r.using(**opts):
                r.search(queries[0], k=10)
        for q in queries:
            hits = {}
            for n, r in rs.items():
                with r.using(**opts):
                    t = time.perf_counter()
                    hits[n] = [(h.chunk_id, h.score) for h in r.search(q, k=10)]
                    times[n].append(time.perf_counter() - t)
            same &= hits["incontext"] == hits["incontext-token"]
        sgemm.append(sgemm_gflops())
        rate = statistics.mean(sgemm[-2:])
        flops, _ = incontext_work(rs["incontext"], queries, mode)
        bound = flops / (rate * 1e9)
        med = {n: statistics.median(v) for n, v in times.items()}
        rows.append(
            {
                "mode": "every layer"
                if mode is None
                else f"routing at layer {mode[0]} to {mode[1]}",
                "GFLOP per query": round(flops / 1e9, 1),
                "sgemm GFLOP/s (mean before/after)": round(rate, 1),
                "layer layout s": round(med["incontext"], 2),
                "token layout s": round(med["incontext-token"], 2),
                "token / layer": round(med["incontext-token"] / med["incontext"], 3),
                "layer x compute bound": round(med["incontext"] / bound, 2),
                "token x compute bound": round(med["incontext-token"] / bound, 2),
                "same ids and scores": same,
            }
        )
        print(rows[-1], flush=True)
    result = result_head(
        __file__, "incontext_layout", "In-context K/V layout: layer-major vs token-major"
    )
    result.update(
        {
            "documents": args.docs,
            "queries": len(queries),
            "threads": torch.get_num_threads(),
            "rows": rows,
            "tables": [
                _table(
                    f"Median s per query, {len(queries)} SciFact test queries, {args.docs} "
                    "documents (Gemma 3 270M, 300-token blocks, float16, memory-mapped; the two "
                    "stores alternate query by query)",
                    rows,
                    [
                        "x compute bound = median time / (FLOPs / float32 sgemm rate, the mean of "
                        "the rates measured before and after that mode's queries); FLOPs as in "
                        "roofline.py (`incontext_work`).",
                    ],
                )
            ],
        }
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
