"""Side-by-side benchmark of retrievers on one BEIR dataset, in one run.

Each retriever runs in its own subprocess so peak RSS is its own. Measured per retriever: quality
(nDCG@10, R@10, R@100, MRR@10), index build time and throughput, query latency p50/p95 and
throughput for single queries and for batches, store size (bytes per chunk), store open time
(load in a fresh process, model loading excluded and reported separately), peak RSS.

    python benchmarks/bench_retrievers.py --dataset ../shared/data/scifact --retrievers bm25,dense
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95))


def run_one(args: argparse.Namespace) -> dict:
    """Runs inside the child process."""
    import torch

    from intrinsic_retrieval import create_retriever
    from intrinsic_retrieval.eval import evaluate, load_beir
    from intrinsic_retrieval.store import EncodedChunkStore

    torch.set_num_threads(args.threads)
    dataset = load_beir(args.dataset, split=args.split)
    if args.subset:
        dataset = dataset.subset(args.subset, seed=0)
    docs = dataset.documents()
    queries = list(dataset.judged_queries().values())
    opts = json.loads(args.options) if args.options else {}
    store_dir = Path(args.workdir) / args.one

    t0 = time.perf_counter()
    retriever = create_retriever(args.one, path=str(store_dir), show_progress=False, **opts)
    model_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    retriever.add(docs)
    index_s = time.perf_counter() - t0
    n_chunks = len(retriever)

    quality = evaluate(retriever, dataset, name=args.one, show_progress=False)

    lat_queries = queries[: args.latency_queries]
    for q in lat_queries[:3]:  # warm-up
        retriever.search(q, k=10)
    single = []
    for q in lat_queries:
        t = time.perf_counter()
        retriever.search(q, k=10)
        single.append(time.perf_counter() - t)
    batch = []
    for i in range(0, len(lat_queries), args.batch_size):
        part = lat_queries[i : i + args.batch_size]
        t = time.perf_counter()
        retriever.search_batch(part, k=10)
        batch.append((time.perf_counter() - t, len(part)))
    p50, p95 = _percentiles(single)
    bp50, bp95 = _percentiles([t for t, _ in batch])

    store = EncodedChunkStore.open(store_dir, read_only=True)
    nbytes = store.nbytes()
    store.close()
    open_s = measure_open(store_dir)
    return {
        "retriever": args.one,
        "docs": len(docs),
        "chunks": n_chunks,
        "queries": len(queries),
        "metrics": quality.metrics,
        "model_load_s": model_load_s,
        "index_s": index_s,
        "index_docs_per_s": len(docs) / index_s,
        "latency_single_ms_p50": p50,
        "latency_single_ms_p95": p95,
        "qps_single": len(single) / sum(single),
        "batch_size": args.batch_size,
        "latency_batch_ms_p50": bp50,
        "latency_batch_ms_p95": bp95,
        "qps_batched": sum(n for _, n in batch) / sum(t for t, _ in batch),
        "store_bytes": nbytes,
        "bytes_per_chunk": nbytes / max(1, n_chunks),
        "store_open_ms": open_s * 1000.0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def measure_open(store_dir: Path) -> float:
    """Open the store (manifest, SQLite, shard maps, live mask) in a fresh process."""
    code = (
        "import time; from intrinsic_retrieval.store import EncodedChunkStore; "
        f"t = time.perf_counter(); s = EncodedChunkStore.open({str(store_dir)!r}, read_only=True); "
        "[s.fixed(n) for n, sp in s.specs.items() if sp.kind == 'fixed']; s.live_mask(); "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    p.add_argument("--split", default="test")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--retrievers", default="bm25,dense")
    p.add_argument("--options", default=None, help="JSON kwargs per retriever: {name: {...}}")
    p.add_argument("--latency-queries", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "retrievers.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print(json.dumps(run_one(args)))
        return

    from intrinsic_retrieval.cli import format_table, machine_info

    all_opts = json.loads(args.options) if args.options else {}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.retrievers.split(","):
            cmd = [
                sys.executable, __file__, "--one", name, "--workdir", work,
                "--dataset", args.dataset, "--split", args.split,
                "--latency-queries", str(args.latency_queries),
                "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            ]  # fmt: skip
            if args.subset:
                cmd += ["--subset", str(args.subset)]
            if name in all_opts:
                cmd += ["--options", json.dumps(all_opts[name])]
            print(f"[{name}] running", file=sys.stderr, flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"{name} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    quality_cols = ["retriever", "docs", "chunks", "nDCG@10", "R@10", "R@100", "RR@10"]
    quality = [
        [r["retriever"], r["docs"], r["chunks"],
         *(round(r["metrics"][m], 4) for m in quality_cols[3:])]
        for r in rows
    ]  # fmt: skip
    cost_cols = [
        "retriever", "index s", "docs/s", "p50 ms", "p95 ms", "qps", "batch p50 ms", "batched qps",
        "bytes/chunk", "open ms", "model load s", "peak RSS MB",
    ]  # fmt: skip
    cost = [
        [
            r["retriever"], round(r["index_s"], 2), round(r["index_docs_per_s"], 1),
            round(r["latency_single_ms_p50"], 2), round(r["latency_single_ms_p95"], 2),
            round(r["qps_single"], 1), round(r["latency_batch_ms_p50"], 2),
            round(r["qps_batched"], 1), round(r["bytes_per_chunk"]), round(r["store_open_ms"], 1),
            round(r["model_load_s"], 2), round(r["peak_rss_mb"]),
        ]
        for r in rows
    ]  # fmt: skip
    dataset = Path(args.dataset).name + (f" subset {args.subset}" if args.subset else "")
    result = {
        "name": "retrievers",
        "command": "python benchmarks/bench_retrievers.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "tables": [
            {
                "title": f"Quality on {dataset} ({args.split})",
                "columns": quality_cols,
                "rows": quality,
            },
            {
                "title": f"Cost on {dataset}: indexing, latency (k=10, {args.latency_queries} "
                f"queries, batches of {args.batch_size}), store, memory",
                "columns": cost_cols,
                "rows": cost,
                "notes": "open ms: opening the store in a fresh process (manifest, SQLite, shard "
                "maps, live mask), model loading excluded. Peak RSS: the retriever's own process.",
            },
        ],
        "raw": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for t in result["tables"]:
        print(f"\n{t['title']}\n{format_table(t['columns'], t['rows'])}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
