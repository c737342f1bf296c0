"""GPU check: the CUDA paths against the CPU results, and their timings, in a few minutes.

Run it whenever a GPU machine is available (`make gpu-check`) and record the figures with the
device named. Each check computes the same thing on the CPU (float32, the reference every test
pins) and on `--device`, compares, and times both:

* MaxSim top-k (INTRA's scan): float32 and bfloat16 document vectors;
* one in-context attention layer over 1,000 stored 300-token blocks (Gemma 3 270M's shapes:
  4 query heads, 1 KV head, head_dim 256), einsum and flex backends, float32 inputs: output,
  log-sum-exp and per-document masses (the readout), top-10 documents;
* a whole query pass through a small random Gemma 3 model (transformers), CPU einsum against
  the device's einsum backend (what "auto" picks) and, last, its flex backend;
* FAISS on the GPU when the installed faiss has GPU support (recorded as unavailable otherwise).

Each check runs under a time limit (``--check-seconds``): one past it is recorded as failed and
the next starts; the checks that compile (flex attention) run last, and the JSON is rewritten
after every check, so a run cut short keeps what it measured. Exits 1 when a comparison fails.
`--device cpu --small` runs every comparison CPU against CPU at
small sizes (what the test suite does, so the script cannot rot without a GPU).

    python benchmarks/gpu_check.py --out "$OUT/gpu_check.json"
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
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def _timed(
    fn: Callable[[], Any], device: torch.device, repeats: int = 5
) -> tuple[float, Any, float]:
    """(median seconds of `fn` after one warm-up, its output, the warm-up's seconds): the
    warm-up is where a compiled backend compiles, so it is reported, not hidden. Synchronised
    on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out, first


def _record(rows: list[dict], name: str, ok: bool, cpu_s: float, dev_s: float, **extra: Any):
    rows.append(
        {
            "check": name,
            "ok": bool(ok),
            "cpu ms": round(cpu_s * 1000, 2),
            "device ms": round(dev_s * 1000, 2),
            "speed-up": round(cpu_s / dev_s, 1) if dev_s > 0 else None,
            **extra,
        }
    )
    print(json.dumps(rows[-1]), flush=True)


def check_maxsim(rows: list[dict], dev: torch.device, small: bool) -> None:
    from intrinsic_retrieval.models.maxsim import maxsim_topk

    n, p, d, tq = (500, 4, 64, 8) if small else (100_000, 8, 640, 32)
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(n, p, d, generator=g)
    q = torch.randn(4, tq, d, generator=g)
    cpu_s, (ref_s, ref_i), _ = _timed(lambda: maxsim_topk(q, docs, 10), torch.device("cpu"), 3)
    for dtype in (torch.float32, torch.bfloat16):
        dd = docs.to(dev, dtype)
        dev_s, (s, i), first = _timed(lambda dd=dd: maxsim_topk(q.to(dev), dd, 10, device=dev), dev)
        same = float((i.cpu() == ref_i).float().mean())
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        close = torch.allclose(s.float().cpu(), ref_s, rtol=tol, atol=tol * d**0.5)
        ok = close and (same == 1.0 if dtype == torch.float32 else same >= 0.8)
        _record(rows, f"maxsim top-10 ({n}x{p} vectors, {dtype})", ok, cpu_s, dev_s,
                top10_agreement=round(same, 3), first_call_ms=round(first * 1000, 1))  # fmt: skip


def check_attention(rows: list[dict], dev: torch.device, small: bool) -> None:
    """One attention layer through the einsum backend (two matrix multiplies)."""
    _attention(rows, dev, small, "einsum")


def check_flex_plain(rows: list[dict], dev: torch.device, small: bool) -> None:
    """The layer through flex attention (compiled on CUDA) without the per-document masses:
    values keep head_dim 256, so a kernel problem with the readout's indicator columns (one
    per document, an odd value width) does not hide whether flex itself compiles and agrees."""
    _attention(rows, dev, small, "flex", doc_lse=False)


def check_flex(rows: list[dict], dev: torch.device, small: bool) -> None:
    """The same layer through flex attention with the per-document masses (the readout)."""
    _attention(rows, dev, small, "flex")


def _attention(
    rows: list[dict], dev: torch.device, small: bool, backend: str, doc_lse: bool = True
) -> None:
    from intrinsic_retrieval.retrievers.incontext.blockattn import BatchLogits, attend_batch

    n, t, hkv, g, tq, d = (40, 30, 1, 4, 8, 32) if small else (1000, 300, 1, 4, 32, 256)
    gen = torch.Generator().manual_seed(1)
    qg = torch.randn(1, hkv, g, tq, d, generator=gen)
    k = torch.randn(n * t, hkv, d, generator=gen)
    v = torch.randn(n * t, hkv, d, generator=gen)
    lengths = torch.full((n,), t)
    spec = BatchLogits(d**-0.5, None, torch.full((tq,), 1.1), 512, torch.arange(tq) + t)
    cpu = torch.device("cpu")
    cpu_s, ref, _ = _timed(
        lambda: attend_batch("einsum", qg, k, v, lengths, spec, doc_lse=True), cpu, 3
    )
    ref_mass = ref.doc_lse.logsumexp((1, 2, 3))[0]
    ref_top = set(torch.topk(ref_mass, 10).indices.tolist())
    dtype = torch.float32  # the query pass always attends in float32
    args = [x.to(dev, dtype) for x in (qg, k, v)]
    spec_d = BatchLogits(spec.scale, None, spec.factor.to(dev), spec.window, spec.q_pos.to(dev))
    what = "" if doc_lse else ", no per-document masses"
    name = f"attention layer over {n} blocks x {t} tokens ({backend}{what}, {dtype})"
    try:
        dev_s, res, first = _timed(
            lambda: attend_batch(
                backend, args[0], args[1], args[2], lengths.to(dev), spec_d, doc_lse=doc_lse
            ),
            dev,
        )
    except Exception as exc:  # an unsupported combination is a finding, not a crash
        rows.append({"check": name, "ok": False, "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
        return
    close = torch.allclose(res.out.float().cpu(), ref.out, rtol=1e-3, atol=1e-3)
    close = close and torch.allclose(res.lse.float().cpu(), ref.lse, rtol=1e-3, atol=1e-3)
    extra: dict[str, Any] = {"first_call_ms": round(first * 1000, 1)}
    if doc_lse:
        mass = res.doc_lse.float().cpu().logsumexp((1, 2, 3))[0]
        extra["top10_overlap"] = len(set(torch.topk(mass, 10).indices.tolist()) & ref_top) / 10
        close = close and extra["top10_overlap"] == 1.0
    _record(rows, name, close, cpu_s, dev_s, **extra)


def check_query_pass(rows: list[dict], dev: torch.device, small: bool) -> None:
    """A whole query pass on the device through the einsum backend (what "auto" picks)."""
    _query_pass(rows, dev, small, "einsum")


def check_query_pass_flex(rows: list[dict], dev: torch.device, small: bool) -> None:
    """The same through flex attention (compiled on CUDA), float32 and bfloat16 weights."""
    _query_pass(rows, dev, small, "flex")


def _query_pass(rows: list[dict], dev: torch.device, small: bool, backend: str) -> None:
    try:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    except ImportError as exc:
        rows.append({"check": "query pass (random Gemma 3)", "ok": None, "skipped": repr(exc)})
        return
    from intrinsic_retrieval.models.architectures import decoder_only_for
    from intrinsic_retrieval.retrievers.incontext.attention import CorpusKV, query_pass
    from intrinsic_retrieval.retrievers.incontext.prefill import prefill_blocks

    cfg = Gemma3TextConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=64,
        max_position_embeddings=1024, layer_types=["sliding_attention", "full_attention"] * 2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    n_docs = 16 if small else 256
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(20, 60, (n_docs,), generator=gen).tolist()
    blocks = [torch.randint(5, 500, (int(n),), generator=gen).tolist() for n in sizes]
    ids = torch.randint(5, 500, (1, 12), generator=gen)
    out: dict[str, Any] = {}
    runs = [("cpu", torch.device("cpu"), "einsum", torch.float32)]
    runs += [("dev", dev, backend, torch.float32), ("dev-bf16", dev, backend, torch.bfloat16)]
    for name, where, run_backend, dtype in runs:
        m = model.to(where, dtype)
        arch = decoder_only_for(m)
        with torch.no_grad():
            kv = prefill_blocks(arch, blocks, arch.num_layers)
            corpus = CorpusKV([k.cpu() for k, _ in kv], [v.cpu() for _, v in kv])
            out[name] = _timed(
                lambda a=arch, c=corpus, b=run_backend: query_pass(
                    a, c, ids, q_offset=64, num_layers=a.num_layers, mass_layers=[0, 1, 2, 3],
                    backend=b,
                ),
                where,
                3,
            )  # fmt: skip
    (cpu_s, a, _) = out["cpu"]

    def readout(res: Any) -> torch.Tensor:
        return sum(res.masses[x][1][0].float().cpu().sum(0) for x in res.masses)

    ref_top = set(torch.topk(readout(a), 5).indices.tolist())
    for name, tol in (("dev", 1e-3), ("dev-bf16", None)):
        dev_s, b, first = out[name]
        overlap = len(set(torch.topk(readout(b), 5).indices.tolist()) & ref_top) / 5
        if tol is None:  # bfloat16 weights: rankings, not values
            ok = overlap >= 0.8
        else:
            ok = torch.allclose(b.hidden.float().cpu(), a.hidden, rtol=tol, atol=tol) and all(
                torch.allclose(b.masses[x][1].float().cpu(), a.masses[x][1], rtol=tol, atol=1e-5)
                for x in a.masses
            )
        label = "bfloat16" if name == "dev-bf16" else "float32"
        _record(rows, f"query pass, random Gemma 3 ({label}), {n_docs} blocks: cpu einsum vs "
                f"device {backend}", ok, cpu_s, dev_s, top5_overlap=overlap,
                first_call_ms=round(first * 1000, 1))  # fmt: skip


def check_faiss(rows: list[dict], dev: torch.device, small: bool) -> None:
    try:
        import faiss
    except ImportError as exc:
        rows.append({"check": "faiss", "ok": None, "skipped": repr(exc)})
        return
    if dev.type != "cuda" or not hasattr(faiss, "StandardGpuResources"):
        rows.append({"check": "faiss GPU", "ok": None, "skipped": "faiss has no GPU support here"})
        print(json.dumps(rows[-1]), flush=True)
        return
    n, d = (2000, 32) if small else (200_000, 384)
    x = torch.randn(n, d).numpy()
    q = torch.randn(64, d).numpy()
    cpu_index = faiss.IndexFlatIP(d)
    cpu_index.add(x)
    gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index)
    cpu_s, (_, ci), _ = _timed(lambda: cpu_index.search(q, 10), torch.device("cpu"), 3)
    dev_s, (_, gi), _ = _timed(lambda: gpu_index.search(q, 10), torch.device("cpu"), 3)
    _record(rows, f"faiss flat IP ({n} x {d})", bool((ci == gi).mean() > 0.99), cpu_s, dev_s)


#: the columns of the rendered table (docs/benchmarks.md), in order
TABLE_COLUMNS = (
    "check", "ok", "cpu ms", "device ms", "speed-up", "first_call_ms",
    "top10_agreement", "top10_overlap", "top5_overlap", "error", "skipped",
)  # fmt: skip


def results_table(rows: list[dict], device: str) -> dict[str, Any]:
    """The rows as one table for `render.py`: the `TABLE_COLUMNS` some row has, in that order,
    then any other key a row has (so nothing measured is dropped)."""
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r} - set(columns))
    return {
        "title": f"CUDA paths on {device} against the CPU float32 reference (cpu ms: that "
        "machine's own CPU; first_call_ms: the warm-up call, where a compiled backend compiles)",
        "columns": columns,
        "rows": [[r.get(c) for c in columns] for r in rows],
    }


def _label(check: Callable[..., None]) -> str:
    """A row name for a check that produced none (timed out, crashed): its docstring's first
    line, so the table reads alike for finished and unfinished checks."""
    doc = (check.__doc__ or check.__name__).strip().splitlines()[0]
    return f"{check.__name__.removeprefix('check_')}: {doc}"


class CheckTimeout(BaseException):
    """A check ran past ``--check-seconds`` (raised from SIGALRM in the main thread). Not an
    `Exception`, so a check's own ``except Exception`` (or a compiler's) cannot swallow it."""


def _run_bounded(check: Callable[..., None], rows: list[dict], dev: torch.device, args) -> None:
    """Run one check, recording a time-out or a crash as a failed row instead of losing the
    rows already measured: the first run on an H200 spent its whole 290 s budget inside the
    compiled flex check and wrote nothing. The alarm cannot interrupt one blocking C call (a
    CUDA synchronise, say); it fires when that call returns to Python."""
    import signal

    def expire(_sig: int, _frame: Any) -> None:
        raise CheckTimeout

    print(f"gpu-check: running {check.__name__}", flush=True)
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(args.check_seconds)))
    try:
        check(rows, dev, args.small)
    except CheckTimeout:
        rows.append({"check": _label(check), "ok": False,
                     "error": f"did not finish within {args.check_seconds} s"})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    except Exception as exc:  # a crash is a finding too; the next check still runs
        rows.append({"check": _label(check), "ok": False, "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


#: every check, in the order they run: the ones that compile (flex) last, so a slow compile
#: cannot cost the others; the whole flex query pass before the full-size flex layers, whose
#: compiles have not finished in time on an H200 and would leave compile workers running
ORDER: dict[str, Callable[..., None]] = {
    "maxsim": check_maxsim,
    "attention": check_attention,
    "query_pass": check_query_pass,
    "faiss": check_faiss,
    "query_pass_flex": check_query_pass_flex,
    "flex_plain": check_flex_plain,
    "flex": check_flex,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="small sizes (a quick CPU self-check)")
    p.add_argument(
        "--check-seconds",
        type=int,
        default=150,
        help="each check's time limit: one that runs past it is recorded as failed (a compile "
        "that does not finish) and the next one starts",
    )
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    p.add_argument("--out", default=str(default_out / "gpu_check.json"))
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated checks to run (default: all, in this order: {', '.join(ORDER)})",
    )
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (run it on a GPU machine, or --device cpu --small)")
        sys.exit(2)
    from _report import result_head, write_result

    result = result_head(__file__, "gpu_check", "GPU check: CUDA paths against the CPU")
    result["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows: list[dict] = []
    only = None if args.only is None else {x.strip() for x in args.only.split(",")}
    unknown = (only or set()) - set(ORDER)
    if unknown:
        print(f"gpu-check: unknown checks {sorted(unknown)}; known: {', '.join(ORDER)}")
        sys.exit(2)
    for name, check in ORDER.items():
        if only is not None and name not in only:
            continue
        _run_bounded(check, rows, dev, args)
        result["rows"] = rows
        result["tables"] = [results_table(rows, result["device"])]
        write_result(args.out, result)  # after every check: a killed run keeps what it measured
    failed = [r["check"] for r in rows if r.get("ok") is False]
    print(
        f"gpu-check: {len(rows) - len(failed)} of {len(rows)} passed or skipped; failed: {failed}"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
