"""Scale-out on this machine: indexing in one process against Ray with 1 and 2 workers, and
search over 2 store parts on Ray actors against the single store, side by side in one run.

Each retriever indexes the same SciFact documents three ways: `add()` in this process (torch on
all `--threads`), `index_distributed(parts=1)` (one Ray task with all threads: Ray's overhead)
and `index_distributed(parts=2)` (two tasks with half the threads each: the parallel speed-up a
2-core box allows, which is little, since one process already uses both cores). Times include
each worker's model load and the combine step; the Ray cluster is started once, before
(its start-up is reported apart). Every combined store is checked row for row against the
single-process one (ids and texts; tensors to 2e-3). Search: `--queries` test queries,
`search_batch` on the single store and on a `DistributedRetriever` over the 2 parts (merged
top-10 checked equal to the single store's; INTRA through its C0 phases, in-context not
searchable as parts). The plan table scales this run's bytes per chunk and encoding rates to 1M
and 10M chunks. INTRA and in-context run on Gemma 3 270M (their defaults; `make models`).

    python benchmarks/scale_out.py --docs 400 --intra-docs 60 --incontext-docs 60 \\
        --out benchmarks/results/scale_out.json
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _same_rows(a: Path, b: Path) -> bool:
    import torch

    from intrinsic_retrieval.store import EncodedChunkStore

    x, y = (EncodedChunkStore.open(p, read_only=True) for p in (a, b))
    with x, y:
        if x.num_rows != y.num_rows or x.fingerprint != y.fingerprint:
            return False
        rows = list(range(x.num_rows))
        if [(c.id, c.text) for c in x.get(rows)] != [(c.id, c.text) for c in y.get(rows)]:
            return False
        for name, spec in x.specs.items():
            if spec.kind == "fixed":
                pairs = [(x.fixed(name)[rows].float(), y.fixed(name)[rows].float())]
            else:
                pairs = list(zip(x.varlen(name, rows), y.varlen(name, rows), strict=True))
            for u, v in pairs:
                if not torch.allclose(u.float(), v.float(), atol=2e-3, rtol=2e-3):
                    return False
    return True


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError


def _same_top(got: list[Any], want: list[Any]) -> bool:
    """Same scores rank by rank (1e-4) and the same chunks wherever the score is not tied
    (BM25's zero-score tail, chunks with no query term, comes in any order)."""
    if len(got) != len(want):
        return False
    if any(abs(g.score - w.score) > 1e-4 for g, w in zip(got, want, strict=True)):
        return False
    scores = [round(w.score, 4) for w in want]
    return all(
        g.chunk_id == w.chunk_id
        for g, w, sc in zip(got, want, scores, strict=True)
        if scores.count(sc) == 1
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--retrievers", default="bm25,dense,intra,incontext")
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--intra-docs", type=int, default=60)
    ap.add_argument("--incontext-docs", type=int, default=60)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "scale_out.json"))
    args = ap.parse_args()

    import ray
    import torch

    from intrinsic_retrieval.distributed import (
        DistributedRetriever,
        index_distributed,
        parts_dir,
    )
    from intrinsic_retrieval.eval import load_beir
    from intrinsic_retrieval.retrievers import create_retriever

    torch.set_num_threads(args.threads)
    ds = load_beir(args.dataset, split="test")
    ids = sorted(ds.corpus)
    random.Random(0).shuffle(ids)
    all_docs = ds.documents()
    by_id = {d.id: d for d in all_docs}
    queries = list(ds.queries.values())[: args.queries]
    options = {
        "bm25": {},
        "dense": {},
        "intra": {},
        "incontext": {"max_doc_tokens": 300, "chunk_size": None},
    }
    sizes = {"intra": args.intra_docs, "incontext": args.incontext_docs}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-out-"))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0

    index_rows: list[list[Any]] = []
    plan_rows: list[list[Any]] = []
    search_rows: list[list[Any]] = []
    for name in args.retrievers.split(","):
        n = sizes.get(name, args.docs)
        docs = [by_id[i] for i in ids[:n]]
        opts = options[name]
        single_path = work / f"{name}-single"
        t = time.perf_counter()
        r = create_retriever(name, path=str(single_path), show_progress=False, **opts)
        load_s = time.perf_counter() - t
        t_add = time.perf_counter()
        r.add(docs)
        encode_s = time.perf_counter() - t_add
        single_s = time.perf_counter() - t
        chunks = len(r)
        per_chunk = r.store.nbytes() / max(1, r.store.num_rows)
        rate = chunks / encode_s  # chunks/s of one process on all threads, model loaded
        plan_rows.append([
            name, _human(per_chunk), _human(per_chunk * 1e6), _human(per_chunk * 1e7),
            round(rate, 2), round(1e6 / rate / 3600, 1), round(1e7 / rate / 3600 / 64, 1),
        ])  # fmt: skip
        index_rows.append([name, n, chunks, "1 process", args.threads, round(single_s, 1),
                           round(n / single_s, 2), 1.0, "-"])  # fmt: skip
        print(index_rows[-1], f"(model load {load_s:.1f}s)", flush=True)
        for parts in (1, 2):
            dest = work / f"{name}-ray{parts}"
            rep = index_distributed(
                name, docs, dest, options=opts, parts=parts, cpus_per_worker=args.threads / parts
            )
            same = _same_rows(single_path, dest)
            index_rows.append([
                name, n, rep.chunks, f"Ray, {parts} worker{'s' * (parts > 1)}",
                args.threads // parts, round(rep.seconds, 1), round(n / rep.seconds, 2),
                round(single_s / rep.seconds, 2), "yes" if same else "NO",
            ])  # fmt: skip
            print(index_rows[-1], flush=True)
        if name == "incontext":
            r.close()
            continue  # attention over every block at once: not searchable as parts
        index_distributed(name, docs, work / f"{name}-parts", options=opts, parts=2,
                          combine_parts=False, cpus_per_worker=args.threads / 2)  # fmt: skip
        d = DistributedRetriever(
            parts_dir(work / f"{name}-parts"),
            cpus_per_part=args.threads / 2,
        )
        t = time.perf_counter()
        want = r.search_batch(queries, k=10)
        one_s = time.perf_counter() - t
        t = time.perf_counter()
        got = d.search_batch(queries, k=10)
        dist_s = time.perf_counter() - t
        same_ids = sum(_same_top(g, w) for g, w in zip(got, want, strict=True))
        for how, secs in (("single store", one_s), ("2 parts on Ray actors", dist_s)):
            search_rows.append([name, n, how, round(1000 * secs / len(queries), 2),
                                f"{same_ids}/{len(queries)}" if "Ray" in how else "-"])  # fmt: skip
            print(search_rows[-1], flush=True)
        d.close()
        r.close()
    ray.shutdown()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)

    result = result_head(__file__, "scale_out", "Scale-out on Ray: indexing and search, 1 vs 2")
    result.update(
        {
            "ray_start_s": round(ray_start, 1),
            "tables": [
                {
                    "title": "Indexing: one process vs Ray (same documents, same store at the end)",
                    "columns": [
                        "retriever",
                        "docs",
                        "chunks",
                        "how",
                        "threads per worker",
                        "seconds",
                        "docs/s",
                        "speed vs 1 process",
                        "same rows",
                    ],
                    "rows": index_rows,
                    "notes": [
                        f"SciFact documents (seeded sample); in-context retrieval on "
                        f"{args.incontext_docs} of them (Gemma 3 270M, 300-token blocks).",
                        "Ray times include each worker's model load and the combine; the local "
                        f"cluster started once before ({ray_start:.1f} s, not counted).",
                    ],
                },
                {
                    "title": "Plan for 1M and 10M chunks, from this run's stores and rates",
                    "columns": [
                        "retriever",
                        "bytes / chunk",
                        "store at 1M chunks",
                        "store at 10M chunks",
                        "chunks/s per 2-core worker",
                        "hours for 1M, 1 worker",
                        "hours for 10M, 64 workers",
                    ],
                    "rows": plan_rows,
                    "notes": [
                        "Bytes per chunk: the single-process store on disk (shards, SQLite with "
                        "the texts, aux) over its rows; SciFact chunks (abstracts).",
                        "Rates: add() of the single process with its model loaded (CPU, "
                        f"{args.threads} threads); hours = chunks / rate, assuming workers scale "
                        "linearly (each encodes its own part; the combine copies bytes).",
                    ],
                },
                {
                    "title": "Search: single store vs 2 parts on Ray actors (search_batch, top-10)",
                    "columns": ["retriever", "docs", "how", "ms per query", "same top-10"],
                    "rows": search_rows,
                    "notes": [
                        f"{len(queries)} SciFact test queries in one search_batch. Same top-10: "
                        "the same scores rank by rank and the same chunks wherever a score is "
                        "not tied (BM25's zero-score tail comes in any order)."
                    ],
                },
            ],
        }
    )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
