"""Roofline: how far each retriever's query work sits from what this machine can do.

For the in-context query pass (full storage, and with routing), INTRA's search (encoder, MaxSim
scan, decoder pass, Reverse-QWK scoring), dense retrieval (query encoding + exhaustive search, and
document encoding) and generative beam search, one run prints the work's FLOPs and bytes (counted
from the shapes the retriever actually used), the median time per query, the achieved GFLOP/s and
GB/s, and this machine's float32 matrix-multiply and memory-copy rates measured in the same run:
``x compute bound`` = time / (FLOPs / sgemm rate). It also measures `search_batch` of 32 queries
against 32 single searches, and model load times (cold: the GGUF dequantised; warm: the cached
safetensors copy memory-mapped).

Stores are built once (SciFact documents, test positives kept) in `--workdir`, outside the
repository, and reused:

    python benchmarks/roofline.py --phase build --docs 1000
    python benchmarks/roofline.py --phase measure --docs 1000 --queries 20 \
        --out benchmarks/results/roofline.json
    python benchmarks/roofline.py --phase load --out benchmarks/results/model_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

#: index-time settings of each store (the retrievers' defaults otherwise)
STORES: dict[str, dict[str, Any]] = {
    "incontext": {"model": "gemma3", "max_doc_tokens": 300, "store_dtype": "float16"},
    # the same store in the layout stores had before `kv_layout` (one strided tensor per kind)
    "incontext-token": {
        "model": "gemma3",
        "max_doc_tokens": 300,
        "store_dtype": "float16",
        "kv_layout": "token",
    },
    "intra": {"store_dtype": "float16"},
    "dense": {},
    "generative": {"docids": "naive"},
}
BATCH = 32
DEFAULT_RETRIEVERS = ",".join(STORES)
#: a store measured in both K/V layouts: (the other layout's store, this one's layout); the
#: second is converted from the first (`convert_kv_layout`: same numbers, no prefill) and
#: copies it as it is (for another --docs, use another --workdir)
LAYOUT_TWINS = {
    "incontext": ("incontext-token", "layer"),
    "incontext-token": ("incontext", "token"),
}


# ---------------------------------------------------------------- machine rates
def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 matrix multiply (n x n), median rate over `repeats` after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def copy_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Memory copy rate (bytes read + written per second) of a `mb` MB float32 tensor."""
    src = torch.randn(mb * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


# ---------------------------------------------------------------- data and stores
def _data(args: argparse.Namespace) -> Any:
    from intrinsic_retrieval.eval import load_beir

    return load_beir(args.dataset, split="test").subset(args.docs, seed=0)


def measured_queries(data: Any, n: int) -> list[str]:
    """The first `n` judged test queries of the subset (sorted by id): every timing uses them."""
    return [data.queries[q] for q in sorted(data.qrels)][:n]


def build(args: argparse.Namespace) -> None:
    from intrinsic_retrieval import create_retriever, load_retriever

    data = _data(args)
    docs = [{"id": d, "text": doc.text} for d, doc in data.corpus.items()]
    work = Path(args.workdir)
    for name in args.retrievers.split(","):
        path = work / name
        twin = LAYOUT_TWINS.get(name)
        if twin is not None and (work / twin[0]).exists():  # resumes a partial conversion
            t = time.perf_counter()
            load_retriever(work / twin[0]).convert_kv_layout(path, twin[1])
            print(f"{name}: converted from {twin[0]} in {time.perf_counter() - t:.0f} s")
            continue
        r = (
            load_retriever(path)
            if path.exists()
            else create_retriever(name.split("-")[0], path=str(path), **STORES[name])
        )
        t = time.perf_counter()
        added = r.add(docs, on_duplicate="skip")
        if name == "generative" and added:
            # generative search needs a trained model; its search work does not depend on how
            # well it was trained, so one label-free step makes it searchable
            r.fit(max_steps=1)
        print(f"{name}: {len(added)} added in {time.perf_counter() - t:.0f} s", flush=True)


def _table(title: str, rows: list[dict], notes: list[str] | None = None) -> dict[str, Any]:
    """A renderable table (benchmarks/render.py) from row dicts: columns in first-seen order."""
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    return {"title": title, "columns": cols, "rows": [[r.get(c, "") for c in cols] for r in rows],
            "notes": notes or []}  # fmt: skip


# ---------------------------------------------------------------- counting
def _nonembedding_params(model: torch.nn.Module) -> int:
    emb = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


@dataclass
class Timed:
    """Per-item timings of one measured work. `beside` holds, when probed, the sgemm rate
    measured right before each item: on a shared host the rate drifted 1.7x within one run, so
    a query's distance from the bound is read against the rate of its own moment too."""

    median: float
    outs: list[Any]
    times: list[float]
    beside: list[float] = field(default_factory=list)


def _median_time(fn: Callable[[Any], Any], items: list[Any], probe: bool = False) -> Timed:
    fn(items[0])  # warm-up: caches (calibration pass, FAISS, tries) are not in the figures
    times, outs, beside = [], [], []
    for x in items:
        if probe:
            beside.append(sgemm_gflops(repeats=3))
        t = time.perf_counter()
        outs.append(fn(x))
        times.append(time.perf_counter() - t)
    return Timed(statistics.median(times), outs, times, beside)


def _row(
    name: str, flops: float, nbytes: float, timed: Timed | float, rates: dict[str, float]
) -> dict:
    seconds = timed.median if isinstance(timed, Timed) else timed
    row = {
        "work": name,
        "GFLOP per query": round(flops / 1e9, 2),
        "MB read per query": round(nbytes / 1e6, 1),
        "median s per query": round(seconds, 3),
        "achieved GFLOP/s": round(flops / seconds / 1e9, 1),
        "achieved GB/s": round(nbytes / seconds / 1e9, 2),
        "x compute bound": round(seconds / (flops / (rates["sgemm_gflops"] * 1e9)), 2),
        "x memory bound": (
            round(seconds / (nbytes / (rates["copy_gbs"] * 1e9)), 2) if nbytes else None
        ),
    }
    if isinstance(timed, Timed) and timed.beside:
        each = [t * r * 1e9 / flops for t, r in zip(timed.times, timed.beside, strict=True)]
        row["x compute bound, sgemm beside each query (median; min-max)"] = (
            f"{statistics.median(each):.2f} ({min(each):.2f}-{max(each):.2f})"
        )
        row["sgemm beside GFLOP/s (min-max)"] = f"{min(timed.beside):.0f}-{max(timed.beside):.0f}"
    return row


def _batch_ratio(r: Any, queries: list[str], single_s: float) -> dict[str, Any]:
    qs = (queries * (BATCH // len(queries) + 1))[:BATCH]
    r.search_batch(qs[:2], k=10)
    t = time.perf_counter()
    batch = r.search_batch(qs, k=10)
    dt = time.perf_counter() - t
    singles = [r.search(q, k=10) for q in qs[:3]]
    same = all(
        [h.chunk_id for h in a] == [h.chunk_id for h in b]
        for a, b in zip(batch[:3], singles, strict=True)
    )
    return {
        "batch of 32 s": round(dt, 2),
        "32 single searches s (32 x median)": round(BATCH * single_s, 2),
        "batch / singles": round(dt / (BATCH * single_s), 3),
        "same top-10 as single searches": same,
    }


# ---------------------------------------------------------------- per retriever
def incontext_work(
    r: Any, queries: list[str], route: tuple[int, int] | None
) -> tuple[float, float]:
    """(FLOPs, bytes of stored K/V read) of one in-context query, without routing or with
    `route` = (layer, blocks kept): 4 x heads x query tokens x keys attended x head_dim per layer
    (QK and PV) + 2 x the layers' weights x query tokens. With routing and calibration, the
    content-free query's continuation over the routed blocks is counted too (it runs per query).
    """
    from intrinsic_retrieval.retrievers.incontext.codes import NULL_QUERY

    a = r.arch
    live = r.store.live_rows()
    lengths = r.store.varlen_lengths("ids")[live].float()
    all_tokens = float(lengths.sum())
    per_layer_w = _nonembedding_params(r.model) / a.num_layers
    elem = {"float16": 2, "int8": 1, "float32": 4}[r.store_dtype]
    kv_token = 2 * a.num_kv_heads * a.head_dim * elem
    tq = statistics.mean(len(r.format.query(q, r.max_query_tokens)[0]) for q in queries)
    heads = int(r.model.config.num_attention_heads)

    def work(layers_tokens: list[float], tokens: float = tq) -> tuple[float, float]:
        flops = sum(
            4 * heads * tokens * s * a.head_dim + 2 * per_layer_w * tokens for s in layers_tokens
        )
        return flops, sum(s * kv_token for s in layers_tokens)

    if route is None:
        return work([all_tokens] * r._depth())
    layer, top = route
    with r.using(route_layer=layer, route_top=top):
        depth, after = r._depth(), r._depth() - r._routed_from()
        routed_tokens = float(lengths.mean()) * min(top, len(live))
        flops, nbytes = work([all_tokens] * (depth - after) + [routed_tokens] * after)
        if r.calibrate and after > 0:
            t_null = len(r.format.query(NULL_QUERY, r.max_query_tokens)[0])
            null_flops, null_bytes = work([routed_tokens] * after, t_null)
            flops, nbytes = flops + null_flops, nbytes + null_bytes
    return flops, nbytes


def incontext_rows(r: Any, queries: list[str], rates: dict, route: tuple[int, int]) -> list:
    """Full storage (readout over every layer, calibrated), then routing at layer r to B
    blocks (FLOPs and bytes: `incontext_work`)."""
    layout = f"{r.kv_layout} layout"
    n_blocks = len(r.store.live_rows())
    rows = []
    single = _median_time(lambda q: r.search(q, k=10), queries, probe=True)
    flops, nbytes = incontext_work(r, queries, None)
    rows.append(
        _row(
            f"in-context, {n_blocks} blocks, {r._depth()} layers ({layout})",
            flops,
            nbytes,
            single,
            rates,
        )
    )
    rows[-1].update(_batch_ratio(r, queries, single.median))
    layer, top = route
    with r.using(route_layer=layer, route_top=top):
        routed_s = _median_time(lambda q: r.search(q, k=10), queries, probe=True)
    flops, nbytes = incontext_work(r, queries, route)
    rows.append(
        _row(
            f"in-context, routing at layer {layer} to {top} blocks ({layout})",
            flops,
            nbytes,
            routed_s,
            rates,
        )
    )
    return rows


def intra_flops(r: Any, queries: list[str], probe: int = 5) -> dict[str, float]:
    """FLOPs per query of each INTRA phase, from the shapes the searches use: the encoder over
    the query, the MaxSim scan of every pooled vector (C0), the decoder pass over C0 and the
    Reverse-QWK scoring of every pooled vector. Decoder: its layers' weights over its own
    tokens (start, query, m retrieval tokens), and per layer over the memory (C0's stored
    token states) the K/V projections (memory adapter folded in: "decoder K/V", apart because a
    batch projects a chunk shared by several C0s once) and the merged attention. The LM head
    does not run. Query lengths from the first `probe` queries."""
    live_rows = r.store.live_rows()
    live = int(live_rows.numel())
    tq = statistics.mean(int(r.encode_states([q])[0].shape[0]) for q in queries[:probe])
    enc_w = _nonembedding_params(r.arch.encoder())
    decoder_module = r.arch.decoder()
    adapters = sum(p.numel() for n, p in decoder_module.named_parameters() if "memory_proj" in n)
    dec_w = _nonembedding_params(decoder_module) - adapters
    cfg = r.model.config.get_text_config(decoder=True)
    heads, layers = int(cfg.num_attention_heads), len(r.layers)
    kv_width = int(r.layers[0].weight.shape[0])  # KV heads x head_dim
    hd = int(r.layers[0].head_dim)
    memory = r.k0 * float(r.store.varlen_lengths("states")[live_rows].float().mean())
    td = statistics.mean(len(r.decoder_prefix(q)) for q in queries) + r.m
    return {
        "encoder": 2 * enc_w * tq,
        "C0 scan": 2 * tq * live * r.p * r.dim,
        "decoder K/V": layers * 2 * memory * int(cfg.hidden_size) * 2 * kv_width,
        # its layers over its own tokens, and the merged attention (QK and PV)
        "decoder": 2 * dec_w * td + layers * 4 * heads * td * (td + memory) * hd,
        "scoring": 2 * layers * heads * r.m * live * r.p * r.dim,
    }


def intra_rows(r: Any, queries: list[str], rates: dict) -> list:
    """The encoder stage alone and the full pass (`intra_flops`)."""
    live = int(r.store.live_rows().numel())
    elem = r.pooled_vectors().element_size()
    flops = intra_flops(r, queries)
    rows = []
    with r.using(mode="encoder"):
        enc_s = _median_time(lambda q: r.search(q, k=10), queries)
        f = flops["encoder"] + flops["C0 scan"]
        rows.append(
            _row(
                f"INTRA encoder stage (scan of {live} chunks)",
                f,
                live * r.p * r.dim * elem,
                enc_s,
                rates,
            )
        )
        rows[-1].update(_batch_ratio(r, queries, enc_s.median))
    full_s = _median_time(lambda q: r.search(q, k=10), queries)
    f = sum(flops.values())
    rows.append(
        _row(
            "INTRA full pass (C0 scan, decoder, Reverse-QWK)",
            f,
            2 * live * r.p * r.dim * elem,
            full_s,
            rates,
        )
    )
    rows[-1].update(_batch_ratio(r, queries, full_s.median))
    return rows


def dense_rows(r: Any, queries: list[str], docs: list[str], rates: dict) -> list:
    w = _nonembedding_params(r.model)
    vecs = r.store.fixed("embedding")
    n, dim = int(vecs.shape[0]), int(vecs.shape[1])
    tok = r.tokenizer
    tq = statistics.mean(len(tok(q)["input_ids"]) for q in queries)
    single = _median_time(lambda q: r.search(q, k=10), queries)
    f = 2 * w * tq + 2 * n * dim
    rows = [
        _row(
            f"dense query (encode + exact search of {n})",
            f,
            n * dim * vecs.element_size(),
            single,
            rates,
        )
    ]
    rows[-1].update(_batch_ratio(r, queries, single.median))
    sample = docs[:64]
    t = time.perf_counter()
    r.embed(sample, show_progress=False)
    dt = time.perf_counter() - t
    dtok = statistics.mean(min(len(tok(d)["input_ids"]), 256) for d in sample)
    f = 2 * w * dtok
    rows.append(_row("dense document encoding (per document)", f, 0.0, dt / len(sample), rates))
    rows[-1]["documents/s"] = round(len(sample) / dt, 1)
    return rows


def generative_rows(r: Any, queries: list[str], rates: dict) -> list:
    m = r.backbone.model
    total = _nonembedding_params(m)
    vocab = int(m.config.get_text_config(decoder=True).vocab_size)
    hidden = int(m.config.get_text_config(decoder=True).hidden_size)
    steps = max((len(t) for t in r._map.tokens if t is not None), default=1)
    beams = r.num_beams
    tq = statistics.mean(len(r.backbone.tokenizer(q)["input_ids"]) for q in queries)
    # encoder once; decoder per beam per step (half the weights: encoder-decoder), vocab head
    f = 2 * (total / 2) * tq + beams * steps * (2 * (total / 2) + 2 * hidden * vocab)
    single = _median_time(lambda q: r.search(q, k=10), queries)
    row = _row(f"generative beam search ({beams} beams, {steps} steps)", f, 0.0, single, rates)
    row.update(_batch_ratio(r, queries, single.median))
    return [row]


def measure(args: argparse.Namespace) -> None:
    from intrinsic_retrieval import load_retriever

    data = _data(args)
    queries = measured_queries(data, args.queries)
    rates = {"sgemm_gflops": round(sgemm_gflops(), 1), "copy_gbs": round(copy_gbs(), 1)}
    print(rates, flush=True)
    rows: list[dict] = []
    done = 0
    work = Path(args.workdir)
    for name in args.retrievers.split(","):
        if not (work / name).exists():
            print(f"{name}: no store in {work} (run --phase build)", flush=True)
            continue
        r = load_retriever(work / name, show_progress=False)
        if name in LAYOUT_TWINS:
            rows += incontext_rows(r, queries, rates, (args.route_layer, args.route_top))
        elif name == "intra":
            rows += intra_rows(r, queries, rates)
        elif name == "dense":
            docs = [d.text for d in list(data.corpus.values())[:64]]
            rows += dense_rows(r, queries, docs, rates)
        elif name == "generative":
            rows += generative_rows(r, queries, rates)
        for row in rows[done:]:
            print(json.dumps(row), flush=True)
        done = len(rows)
        del r
    rates_after = {"sgemm_gflops": round(sgemm_gflops(), 1), "copy_gbs": round(copy_gbs(), 1)}
    title = "Roofline: query work against this machine's rates"
    if args.retrievers != DEFAULT_RETRIEVERS:  # a partial run gets its own heading
        title = f"Roofline, {args.retrievers} only: query work against this machine's rates"
    result = result_head(__file__, "roofline", title)
    machine = [
        {"when": "start", "sgemm GFLOP/s (float32)": rates["sgemm_gflops"],
         "memory copy GB/s": rates["copy_gbs"]},
        {"when": "end", "sgemm GFLOP/s (float32)": rates_after["sgemm_gflops"],
         "memory copy GB/s": rates_after["copy_gbs"]},
    ]  # fmt: skip
    batch_cols = ("batch of 32 s", "32 single searches s (32 x median)", "batch / singles",
                  "same top-10 as single searches")  # fmt: skip
    roof = [{k: v for k, v in r.items() if k not in batch_cols} for r in rows]
    batched = [
        {"work": r["work"], **{k: r[k] for k in batch_cols}} for r in rows if batch_cols[0] in r
    ]
    result.update(
        {
            "documents": len(data.corpus),
            "queries": len(queries),
            "machine_rates_start": rates,
            "machine_rates_end": rates_after,
            "rows": rows,
            "tables": [
                _table("This machine's rates, measured in the same run", machine),
                _table(
                    f"Query work against those rates ({len(data.corpus)} SciFact documents, "
                    f"median of {len(queries)} test queries)",
                    roof,
                ),
                _table("search_batch of 32 queries against 32 single searches", batched),
            ],
            "notes": [
                "x compute bound = median time / (FLOPs / float32 sgemm rate measured at the start "
                "of this run, 2048x2048, all torch threads); x memory bound = median time / "
                "(bytes of stored vectors read / memory-copy rate, read + write of 512 MB).",
                "FLOPs are counted from the shapes each search used: attention from the tokens "
                "attended, dense layers as 2 x non-embedding weights x tokens (beam search: half "
                "the weights per decoder step plus the vocabulary projection, an estimate).",
                "batch / singles = one search_batch of 32 queries against 32 x the median single "
                "search; in-context packs readout queries (query_batch=16) into one row without "
                "padding and shares the pass over the stored blocks; INTRA shares the encoder and "
                "the MaxSim scan, runs the decoder over 8 queries at a time (each over its own "
                "C0, rows padded; each distinct C0 chunk's cross K/V projected once) and scores "
                "8 at a time in one scan of the pooled vectors; "
                "generative batches the encoder and beam search (8 queries at a time).",
                "Warm-up: one search before timing (the calibration pass over the candidates is "
                "cached after it).",
                "In-context rows also measure the sgemm rate right before each timed query (same "
                "2048x2048 multiply, 3 repeats) and read each query against the rate of its own "
                "moment: on a shared host the rate drifted 1.7x within one run (29-48 GFLOP/s), "
                "so the start-of-run rate alone can put a query's distance from the bound off "
                "either way. Each query is read against the mean query's FLOPs (the spread mixes "
                "query length with the rate's drift), and the probe itself runs between queries, "
                "so these medians are not strictly comparable with runs made without it.",
            ],
        }
    )
    result["tables"][1]["notes"] = result.pop("notes")
    write_result(args.out, result)


# ---------------------------------------------------------------- model loading
def _load_seconds(model: str, env: dict[str, str]) -> float:
    code = (
        "import time,sys;t=time.perf_counter();"
        "from intrinsic_retrieval.retrievers.incontext.retriever import InContextRetriever;"
        f"InContextRetriever({model!r}, show_progress=False);"
        "print(time.perf_counter()-t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def load_times(args: argparse.Namespace) -> None:
    """Cold: the GGUF copied to an empty folder, so it is dequantised and the safetensors copy
    written; warm: the same folder again (the copy memory-mapped). Each in a fresh process
    (imports included)."""
    from intrinsic_retrieval.models.loading import gemma3_gguf_path, smollm2_gguf_path

    rows = []
    for name, find in (("smollm2", smollm2_gguf_path), ("gemma3", gemma3_gguf_path)):
        src = find()
        if src is None:
            print(f"{name}: not fetched (make models)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp) / Path(src).name
            shutil.copy(src, dst)
            env = dict(os.environ)
            cold = _load_seconds(str(dst), env)
            warm = [_load_seconds(str(dst), env) for _ in range(3)]
        rows.append(
            {
                "model": name,
                "cold s (dequantise + write copy)": round(cold, 1),
                "warm s (median of 3)": round(statistics.median(warm), 1),
                "cold / warm": round(cold / statistics.median(warm), 1),
            }
        )
        print(rows[-1], flush=True)
    result = result_head(__file__, "model_load", "Model load: GGUF cold vs cached copy warm")
    result["rows"] = rows
    result["tables"] = [_table("Load time of a packaged model in a fresh process", rows)]
    result["tables"][0]["notes"] = [
        "Seconds for a fresh Python process to import the library and build an "
        "InContextRetriever on the model (no store). Cold = first use of that GGUF file "
        "(dequantised by transformers, then saved as float32 safetensors beside it, keyed by "
        "the file's sha256); warm = later processes, which map the saved copy."
    ]
    write_result(args.out, result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--phase", choices=("build", "measure", "load"), required=True)
    p.add_argument("--dataset", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    p.add_argument("--workdir", default=str(ROOT.parent / "stores" / "roofline"))
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--retrievers", default=DEFAULT_RETRIEVERS)
    p.add_argument("--route-layer", type=int, default=8)
    p.add_argument("--route-top", type=int, default=100)
    p.add_argument("--out", default=str(HERE / "results" / "roofline.json"))
    args = p.parse_args()
    {"build": build, "measure": measure, "load": load_times}[args.phase](args)


if __name__ == "__main__":
    main()
