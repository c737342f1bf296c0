"""Generative retrieval (DSI) on a SciFact subset, trained on CPU, beside BM25 and dense.

The subset holds every document judged relevant for a test query plus random others
(`BeirDataset.subset`). Each generative configuration trains from the same warm start —
BERT2BERT from all-MiniLM-L6-v2, the best small seq2seq backbone available offline — for a fixed
wall-clock budget, then answers the 300 test queries zero-shot (the test queries are never
trained on; labeled training queries come from ``qrels/train.tsv`` for documents in the subset).

    python benchmarks/eval_generative_scifact.py --dataset ../shared/data/scifact \\
        --n-docs 1000 --minutes 6 --configs all

Writes benchmarks/results/generative_scifact.json (the format docs/benchmarks.md renders).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

MEASURES = ["R@1", "R@10", "nDCG@10"]

#: name -> (docid scheme, GenerativeFitConfig overrides)
ALL = ("firstp", "daq", "labeled", "synthetic")
#: name -> (docid scheme, GenerativeFitConfig overrides); the encoder is frozen (and its states
#: cached) unless train_mode says otherwise
CONFIGS: dict[str, tuple[str, dict]] = {
    "atomic-firstp+labeled": ("atomic", {"inputs": ("firstp", "labeled")}),
    "atomic-firstp+daq+labeled": ("atomic", {"inputs": ("firstp", "daq", "labeled")}),
    "atomic-all": ("atomic", {"inputs": ALL}),
    "atomic-all-train_all": ("atomic", {"inputs": ALL, "train_mode": "all"}),
    "atomic-all-decoder_late": ("atomic", {"inputs": ALL, "train_mode": "decoder_late"}),
    "naive-all": ("naive", {"inputs": ALL}),
    "semantic-all": ("semantic", {"inputs": ALL}),
    "semantic-firstp+labeled": ("semantic", {"inputs": ("firstp", "labeled")}),
    "semantic-all-decoder_late": ("semantic", {"inputs": ALL, "train_mode": "decoder_late"}),
    "naive-all-decoder_late": ("naive", {"inputs": ALL, "train_mode": "decoder_late"}),
    "atomic-firstp+daq+labeled-decoder_late": (
        "atomic",
        {"inputs": ("firstp", "daq", "labeled"), "train_mode": "decoder_late"},
    ),
    # documents only: no labeled query is read (the extractive generator, or an LM's questions)
    "atomic-labelfree-decoder_late": (
        "atomic",
        {"inputs": ("firstp", "daq", "synthetic"), "train_mode": "decoder_late"},
    ),
}
#: the same fits whose synthetic queries an LM writes (`--query-model`), the DSI-QG recipe
LM_CONFIGS = {"atomic-labelfree-lm-decoder_late": "atomic-labelfree-decoder_late"}
CONFIGS.update({lm: CONFIGS[base] for lm, base in LM_CONFIGS.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--n-docs", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per config")
    ap.add_argument(
        "--curve",
        default="",
        help="cumulative training minutes at which to evaluate, e.g. 5,10,20 (replaces "
        "--minutes: one row per point; each segment resumes the previous one's checkpoint)",
    )
    ap.add_argument("--query-model", default="smollm2", help="LM that writes queries (-lm configs)")
    ap.add_argument(
        "--plot",
        default="",
        help="with --curve: write nDCG@10 against training minutes here (repository-relative "
        "PNG, linked from the result); with --replot, draw it from an existing --out",
    )
    ap.add_argument("--replot", action="store_true", help="only draw --plot from --out")
    ap.add_argument("--configs", default="all", help=f"comma list of {sorted(CONFIGS)} or all")
    ap.add_argument("--baselines", default="bm25,dense")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--daq-spans", type=int, default=3)
    ap.add_argument("--synthetic-per-doc", type=int, default=2)
    ap.add_argument("--num-beams", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results/generative_scifact.json"))
    ap.add_argument(
        "--merge", nargs="+", help="merge result files of parallel runs into --out and exit"
    )
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.replot:
        plot_curve(Path(args.out), args.plot)
        return

    import torch

    torch.set_num_threads(args.threads)
    from intrinsic_retrieval.eval import evaluate, load_beir, load_qrels, parse_measures

    measures = parse_measures(MEASURES)
    full = load_beir(args.dataset, split="test")
    data = full.subset(args.n_docs, seed=0)
    docs = data.documents()
    in_subset = set(data.corpus)
    train_qrels = load_qrels(Path(args.dataset) / "qrels/train.tsv")
    labeled = [
        (full.queries[q], d)
        for q, rel in train_qrels.items()
        for d, s in rel.items()
        if s > 0 and d in in_subset and q in full.queries
    ]
    print(f"subset: {len(docs)} docs, {len(data.judged_queries())} test queries, "
          f"{len(labeled)} labeled training pairs", flush=True)  # fmt: skip

    rows: list[list] = []
    work = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    for name in [b for b in args.baselines.split(",") if b]:
        from intrinsic_retrieval import create_retriever

        t0 = time.perf_counter()
        r = create_retriever(name, path=str(work / name), show_progress=False)
        r.add(docs)
        idx_s = time.perf_counter() - t0
        res = evaluate(r, data, name=name, measures=measures, show_progress=False)
        m = res.metrics
        rows.append([name, "-", "-", "-", round(idx_s, 1), None, None, None,
                     round(m["R@1"], 4), round(m["R@10"], 4), round(m["nDCG@10"], 4)])  # fmt: skip
        print(rows[-1], flush=True)

    from intrinsic_retrieval.retrievers.generative import GenerativeDocidRetriever

    names = sorted(CONFIGS) if args.configs == "all" else args.configs.split(",")
    points = [float(x) for x in args.curve.split(",")] if args.curve else [args.minutes]
    details = {}
    for name in names:
        scheme, overrides = CONFIGS[name]
        r = GenerativeDocidRetriever(  # default backbone: BERT2BERT from all-MiniLM-L6-v2
            docids=scheme, num_beams=args.num_beams, path=str(work / name),
            show_progress=False,
        )  # fmt: skip
        r.add(docs)
        cfg = {
            "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 100,
            "daq_spans": args.daq_spans, "synthetic_per_doc": args.synthetic_per_doc,
            "epochs": 100.0, "heldout_fraction": 0.0, "show_progress": False,
            "train_mode": "decoder", "checkpoint_dir": str(work / f"{name}-ckpt"), **overrides,
        }  # fmt: skip
        extra, written = {}, {}
        queries_label = "extractive"
        if name in LM_CONFIGS:
            extra["query_generator"], written = _written_queries(r, args)
            queries_label = args.query_model
        inputs = "+".join(cfg["inputs"])
        if "synthetic" in cfg["inputs"]:
            inputs += f" ({queries_label} queries)"
        train_pairs = labeled if "labeled" in cfg["inputs"] else None
        done_min, fit_s = 0.0, 0.0
        for point in points:
            t0 = time.perf_counter()
            rep = r.fit(train_pairs, time_limit_s=(point - done_min) * 60, **cfg, **extra)
            fit_s += time.perf_counter() - t0
            done_min = point
            t0 = time.perf_counter()
            res = evaluate(r, data, name=name, measures=measures, show_progress=False, k=10)
            search_s = time.perf_counter() - t0
            m = res.metrics
            epochs = rep.examples_seen / max(1, rep.num_examples)
            label = name if len(points) == 1 else f"{name} @ {point:g} min"
            rows.append([
                label, scheme, inputs, cfg["train_mode"], round(fit_s, 1),
                round(rep.examples_per_s, 1), round(rep.steps * cfg["batch_size"]
                / max(1, rep.num_examples), 2),
                f"{rep.trainable_params / 1e6:.1f}M / {rep.total_params / 1e6:.1f}M",
                round(m["R@1"], 4), round(m["R@10"], 4), round(m["nDCG@10"], 4),
            ])  # fmt: skip
            details[label] = {
                "report": rep.to_json(), "search_seconds": search_s, "metrics": m,
                "config": cfg, "training_minutes": point, "epochs_this_segment": epochs,
                **written,
            }  # fmt: skip
            print(rows[-1], flush=True)
            _write(args, rows, details, len(docs), len(labeled))
        del r
    if args.plot and len(points) > 1:
        plot_curve(Path(args.out), args.plot)


def plot_curve(result: Path, image: str) -> None:
    """nDCG@10 of each curve config against its training minutes, the baselines as lines;
    the picture is linked from the result (rendered into docs/benchmarks.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(result.read_text())
    table = data["tables"][0]
    col = table["columns"].index("nDCG@10")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in table["rows"]:
        if " @ " in row[0]:
            name, minutes = row[0].rsplit(" @ ", 1)
            curves.setdefault(name, []).append((float(minutes.split()[0]), row[col]))
        else:
            ax.axhline(row[col], linestyle="--", linewidth=1, color="grey")
            ax.annotate(f"{row[0]} {row[col]:.3f}", (0, row[col]), fontsize=8, va="bottom")
    for name, pts in curves.items():
        ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=name)
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("nDCG@10")
    ax.set_xlim(left=0)
    ax.legend(fontsize=8)
    ax.set_title(data.get("title", data["name"]), fontsize=9)
    path = ROOT / image
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    data["images"] = [image]
    result.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")


def _written_queries(r, args) -> tuple[object, dict]:
    """The LM query generator, with its queries written (and cached in the store) before
    training, so that writing is timed apart from training."""
    from intrinsic_retrieval.training.queries import LMQueryGenerator, cached_queries

    t0 = time.perf_counter()
    gen = LMQueryGenerator(args.query_model, show_progress=True)
    load_s = time.perf_counter() - t0
    chunks = [c for _, c in r.store.iter_chunks()]
    t0 = time.perf_counter()
    written = cached_queries(r.store, [(c.id, c.text) for c in chunks], gen, args.synthetic_per_doc)
    write_s = time.perf_counter() - t0
    n_q = sum(len(v) for v in written.values())
    print(f"{args.query_model} wrote {n_q} queries for {len(chunks)} documents in {write_s:.0f} s")
    sample = {d: written[d] for d in list(written)[:5]}
    writer = {
        "model": args.query_model, "load_s": round(load_s, 1), "write_s": round(write_s, 1),
        "documents": len(chunks), "queries": n_q,
        "queries_per_s": round(n_q / max(write_s, 1e-9), 2), "sample": sample,
    }  # fmt: skip
    return gen, {"query_writer": writer}


def _write(args, rows, details, n_docs, n_labeled) -> None:
    from intrinsic_retrieval.cli import machine_info

    cmd = "python benchmarks/eval_generative_scifact.py " + " ".join(sys.argv[1:])
    out = {
        "name": Path(args.out).stem,
        "title": f"Generative retrieval (DSI) on {n_docs} SciFact documents, CPU "
        f"({Path(args.out).stem})",
        "command": cmd,
        "machine": machine_info(),
        "tables": [
            {
                "title": f"Generative retrieval vs BM25 and dense on a SciFact subset "
                f"({n_docs} docs, 300 test queries), CPU",
                "columns": [
                    "retriever",
                    "docids",
                    "training inputs",
                    "trained weights",
                    "index/train s",
                    "train examples/s",
                    "epochs",
                    "trainable / total params",
                    "R@1",
                    "R@10",
                    "nDCG@10",
                ],
                "rows": rows,
                "notes": _notes(args, n_labeled),
            }
        ],
        "details": details,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


def _notes(args, n_labeled: int) -> str:
    budget = (
        f"trains for a {args.minutes:g}-minute wall-clock budget"
        if not args.curve
        else f"trains once and is evaluated after {args.curve} cumulative minutes of training "
        "(each segment resumes the previous one's checkpoint: same weights, optimizer and "
        "schedule as one uninterrupted run; 'index/train s' adds up the fit calls, example "
        "building and the frozen-encoder pre-pass included)"
    )
    return (
        "Backbone: BERT2BERT warm-started from all-MiniLM-L6-v2 (no pretrained T5 here). Each "
        f"generative row {budget} (batch {args.batch_size}, lr {args.lr}, {args.daq_spans} DaQ "
        f"spans and {args.synthetic_per_doc} synthetic queries per doc; rows whose inputs include "
        f"'labeled' also read {n_labeled} labeled (query, doc) pairs from qrels/train.tsv, "
        "'labelfree' rows read no labeled query at all; synthetic queries are extractive unless "
        "the inputs name the LM that wrote them, before training, cached in the store: writing "
        "time in details.query_writer), then answers the test queries zero-shot with "
        f"{args.num_beams}-beam trie-constrained decoding (atomic: one step, docid-head logits). "
        "'epochs' = examples seen / training-set size. The machine was shared with other jobs, "
        "so wall-clock figures are pessimistic."
    )


def merge(paths: list[str], out: str) -> None:
    """One result file from runs of disjoint configs (e.g. two single-threaded streams)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = parts[0]
    merged["command"] = " && ".join(p["command"] for p in parts)
    for p in parts[1:]:
        merged["tables"][0]["rows"].extend(p["tables"][0]["rows"])
        merged["details"].update(p["details"])
    Path(out).write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
