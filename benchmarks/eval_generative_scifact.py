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
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--n-docs", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per config")
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

    from intrinsic_retrieval.models import default_dense_model_path
    from intrinsic_retrieval.retrievers.generative import GenerativeDocidRetriever, bert2bert

    names = sorted(CONFIGS) if args.configs == "all" else args.configs.split(",")
    details = {}
    for name in names:
        scheme, overrides = CONFIGS[name]
        model, tok = bert2bert(default_dense_model_path())
        r = GenerativeDocidRetriever(
            model, tok, docids=scheme, num_beams=args.num_beams, path=str(work / name),
            show_progress=False,
        )  # fmt: skip
        r.add(docs)
        cfg = {
            "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 100,
            "daq_spans": args.daq_spans, "synthetic_per_doc": args.synthetic_per_doc,
            "epochs": 100.0, "time_limit_s": args.minutes * 60, "heldout_fraction": 0.0,
            "show_progress": False, "train_mode": "decoder", **overrides,
        }  # fmt: skip
        t0 = time.perf_counter()
        rep = r.fit(labeled, **cfg)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(r, data, name=name, measures=measures, show_progress=False, k=10)
        search_s = time.perf_counter() - t0
        m = res.metrics
        epochs = rep.examples_seen / max(1, rep.num_examples)
        rows.append([
            name, scheme, "+".join(cfg["inputs"]), cfg["train_mode"], round(fit_s, 1),
            round(rep.examples_per_s, 1), round(epochs, 2),
            f"{rep.trainable_params / 1e6:.1f}M / {rep.total_params / 1e6:.1f}M",
            round(m["R@1"], 4), round(m["R@10"], 4), round(m["nDCG@10"], 4),
        ])  # fmt: skip
        details[name] = {
            "report": rep.to_json(), "search_seconds": search_s, "metrics": m, "config": cfg,
        }  # fmt: skip
        print(rows[-1], flush=True)
        del r, model
        _write(args, rows, details, len(docs), len(labeled))


def _write(args, rows, details, n_docs, n_labeled) -> None:
    from intrinsic_retrieval.cli import machine_info

    cmd = "python benchmarks/eval_generative_scifact.py " + " ".join(sys.argv[1:])
    out = {
        "name": "generative_scifact",
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
                "notes": (
                    f"Backbone: BERT2BERT warm-started from all-MiniLM-L6-v2 (no pretrained T5 "
                    f"here). Each generative row trains for a {args.minutes:g}-minute wall-clock "
                    f"budget (batch {args.batch_size}, lr {args.lr}, {args.daq_spans} DaQ spans "
                    f"and {args.synthetic_per_doc} extractive synthetic queries per doc, "
                    f"{n_labeled} labeled (query, doc) pairs from qrels/train.tsv), then answers "
                    f"the test queries zero-shot with {args.num_beams}-beam trie-constrained "
                    "decoding (atomic: one step, docid-head logits). 'epochs' = examples seen / "
                    "training-set size. The machine was shared with other jobs, so wall-clock "
                    "figures are pessimistic."
                ),
            }
        ],
        "details": details,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


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
