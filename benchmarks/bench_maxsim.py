"""MaxSim kernel throughput on synthetic data, against a plain copy of the same tensor.

For each device (CPU; CUDA when available), document dtype and query count: median time of
`maxsim_topk(queries, docs, k=10)` over several repeats after a warm-up, the bytes of the
document tensor scanned per second, and that rate as a fraction of `dst.copy_(docs)` measured in
the same run (a copy reads and writes the data once: the practical memory-bandwidth ceiling for
a scan). Also one sparse-filter row (10% candidates, gathered) per dtype.

    python benchmarks/bench_maxsim.py --n 100000 --p 8 --d 512 --m 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def timed_pair(
    fn: Callable[[], object], ref: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float, float, float]:
    """Interleaved timing of `fn` and the reference copy `ref`, so both see the same machine
    load: (median fn seconds, median ref seconds, median per-repeat ref/fn ratio, median fn CPU
    seconds). CUDA work is synchronised around each call. One warm-up call each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one(f: Callable[[], object]) -> tuple[float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    one(fn)
    one(ref)
    fn_t, ref_t, ratio, cpu_t = [], [], [], []
    for _ in range(repeats):
        a, ca = one(fn)
        b, _ = one(ref)
        fn_t.append(a)
        ref_t.append(b)
        ratio.append(b / a)
        cpu_t.append(ca)
    med = statistics.median
    return med(fn_t), med(ref_t), med(ratio), med(cpu_t)


def bench_device(args: argparse.Namespace, device: torch.device) -> list[list[object]]:
    from intrinsic_retrieval.models import maxsim_topk

    rows: list[list[object]] = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        docs = torch.randn(args.n, args.p, args.d, generator=gen).to(dtype).to(device)
        nbytes = docs.numel() * docs.element_size()
        dst = torch.empty_like(docs)
        dst.copy_(docs)  # touch every page before timing

        def copy(docs=docs, dst=dst):
            return dst.copy_(docs)

        cases: list[tuple[int, torch.Tensor | None, str]] = [
            (int(q), None, "all") for q in args.queries.split(",")
        ]
        cand = torch.rand(args.n, generator=gen) < 0.1
        cases.append((1, cand, "10% (gathered)"))
        for nq, candidates, label in cases:
            queries = torch.randn(nq, args.m, args.d, generator=gen).to(device)
            scanned = nbytes if candidates is None else nbytes * int(candidates.sum()) / args.n

            def run(queries=queries, docs=docs, candidates=candidates):
                return maxsim_topk(queries, docs, args.k, candidates=candidates)

            secs, copy_s, ratio, cpu_s = timed_pair(run, copy, device, args.repeats)
            n_scored = args.n if candidates is None else int(candidates.sum())
            # fraction of copy speed for the bytes actually scanned
            fraction = ratio * (scanned / nbytes)
            rows.append(
                [
                    device.type,
                    dname,
                    nq,
                    label,
                    round(nbytes / 2**20, 1),
                    round(secs * 1000, 2),
                    round(cpu_s * 1000, 2) if device.type == "cpu" else None,
                    round(scanned / secs / 1e9, 3),
                    round(nbytes / copy_s / 1e9, 3),
                    round(fraction, 3),
                    round(n_scored / secs),
                ]
            )
            print("  ".join(str(v) for v in rows[-1]), flush=True)
        del docs, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of chunks")
    parser.add_argument("--p", type=int, default=8, help="pooled vectors per chunk")
    parser.add_argument("--d", type=int, default=512, help="vector dimension")
    parser.add_argument("--m", type=int, default=8, help="vectors per query")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", default="1,16", help="query batch sizes")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (both if present)")
    parser.add_argument("--out", default=str(HERE / "results" / "maxsim.json"))
    args = parser.parse_args()

    from intrinsic_retrieval.cli import format_table, machine_info

    torch.set_num_threads(args.threads)
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")
    columns = [
        "device",
        "dtype",
        "Q",
        "candidates",
        "docs MiB",
        "median ms",
        "CPU ms",
        "GB/s scanned",
        "copy GB/s",
        "fraction of copy",
        "chunks/s",
    ]
    print("  ".join(columns))
    rows: list[list[object]] = []
    load_before = os.getloadavg()[0]
    for dev in devices:
        rows += bench_device(args, torch.device(dev))
    load_after = os.getloadavg()[0]

    command = "python benchmarks/bench_maxsim.py " + " ".join(sys.argv[1:])
    machine = machine_info()
    machine["torch_threads"] = args.threads
    result = {
        "name": "maxsim",
        "title": "MaxSim scan over pooled vectors: throughput vs a plain copy",
        "command": command.strip(),
        "machine": machine,
        "tables": [
            {
                "title": (
                    f"MaxSim top-{args.k} scan: N={args.n:,} chunks x p={args.p} vectors x "
                    f"d={args.d}, m={args.m} vectors per query"
                ),
                "columns": columns,
                "rows": rows,
                "notes": (
                    "Median of the repeats after warm-up. 'GB/s scanned' = bytes of the "
                    "document rows scored / time; 'copy GB/s' = the same tensor through "
                    "dst.copy_(src) in the same run, interleaved with the kernel (reads + "
                    "writes it once); 'fraction of copy' = median per-repeat ratio of the two "
                    "rates. 'CPU ms' = process CPU time (wall time above it means other "
                    "processes held the cores). fp16/bf16 blocks are converted to fp32 before "
                    "the matmul. With many query vectors (Q x m) the "
                    f"CPU matmul is compute-bound, not memory-bound. CPU threads: {args.threads}; "
                    f"1-min load average {load_before:.1f} before, {load_after:.1f} after."
                ),
            }
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(format_table(columns, rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
