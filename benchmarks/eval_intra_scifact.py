"""INTRA quality on SciFact test beside BM25 and dense, in one run.

Rows: BM25, dense (all-MiniLM-L6-v2), INTRA encoder-side stage alone (C0 ranking), full INTRA
with the untrained retrieval head, and full INTRA after `fit` on SciFact ``qrels/train.tsv`` (the
paper's recipe: backbone frozen, retrieval tokens and per-layer weights trained), for each
memory adapter (stores differ) and each choice of scoring query positions (query-time).
Backbone: `IntraRetriever`'s default (T5Gemma2 built from Gemma 3 270M when fetched), or
``--model bert2bert:all-MiniLM-L6-v2`` (then ``--cross-init`` applies).

    nice -n 10 python benchmarks/eval_intra_scifact.py --subset 1000 --threads 2 \
        --memory-adapter generated,none --query-positions retrieval,query+retrieval \
        --out benchmarks/results/intra_gemma_scifact.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--workdir", default="/tmp/intra-scifact")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--subset", type=int, default=0, help="0: full corpus; N: N documents")
    ap.add_argument("--max-queries", type=int, default=0, help="0: every judged test query")
    ap.add_argument("--train-queries", type=int, default=0, help="0: every train query")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-candidates", type=int, default=256)
    ap.add_argument("--retrieval-tokens", type=int, default=8)
    ap.add_argument("--pooled", type=int, default=8)
    ap.add_argument("--k0", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--pooled-dtype", default=None, help="default: float32 on CPU")
    ap.add_argument(
        "--cross-init",
        default="random",
        help="comma list of BERT2BERT cross-attention initialisations to compare: random,self",
    )
    ap.add_argument("--model", default=None, help="IntraRetriever model (default: its default)")
    ap.add_argument("--encoder-attention", default="causal")
    ap.add_argument(
        "--memory-adapter", default="generated", help="comma list: generated,none,<file>"
    )
    ap.add_argument(
        "--query-positions", default="retrieval", help="comma list: retrieval,query+retrieval"
    )
    ap.add_argument(
        "--c0-scores",
        default="dot",
        help="comma list of encoder-side (C0) scorings: dot,standardised",
    )
    ap.add_argument("--no-fit", action="store_true", help="skip the fit rows")
    ap.add_argument(
        "--lora-ranks",
        default="0",
        help="comma list of query-LoRA ranks to fit (0: the paper's recipe, head only)",
    )
    ap.add_argument("--out", default=str(HERE / "results/intra_scifact.json"))
    args = ap.parse_args()

    import torch

    from intrinsic_retrieval.eval import evaluate, load_beir, load_qrels
    from intrinsic_retrieval.retrievers.bm25 import BM25Retriever
    from intrinsic_retrieval.retrievers.dense import DenseRetriever
    from intrinsic_retrieval.retrievers.intra import IntraRetriever

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = load_beir(args.dataset, split="test")
    if args.max_queries:
        keep = sorted(data.judged_queries())[: args.max_queries]
        data.qrels = {q: data.qrels[q] for q in keep}
    train_qrels = load_qrels(Path(args.dataset) / "qrels/train.tsv")
    if args.subset:  # every test and train positive, plus random other documents up to N
        import random

        pos = {d for rel in [*data.qrels.values(), *train_qrels.values()] for d in rel}
        others = sorted(set(data.corpus) - pos)
        random.Random(0).shuffle(others)
        keep = pos | set(others[: max(0, args.subset - len(pos))])
        data.corpus = {d: v for d, v in data.corpus.items() if d in keep}
    docs = data.documents()
    rows: list[list] = []
    log: dict[str, float] = {}

    def record(name: str, retriever, index_s: float | None) -> None:
        res = evaluate(retriever, data, name=name, show_progress=False)
        m = res.metrics
        rows.append(
            [
                name,
                round(m["nDCG@10"], 4),
                round(m["R@10"], 4),
                round(m["R@100"], 4),
                res.num_queries,
                None if index_s is None else round(index_s, 1),
                round(res.search_seconds / max(res.num_queries, 1) * 1000, 1),
            ]
        )
        print(rows[-1], flush=True)

    # reruns skip the (unchanged) baselines
    cache = work / f"baselines-{args.max_queries}-{args.subset}.json"
    if cache.exists():
        rows.extend(json.loads(cache.read_text()))
    else:
        for name, cls in (("bm25", BM25Retriever), ("dense (MiniLM)", DenseRetriever)):
            t0 = time.perf_counter()
            r = cls(path=None, show_progress=False)
            r.add(docs)
            record(name, r, time.perf_counter() - t0)
            r.close()
        cache.write_text(json.dumps(rows))

    from intrinsic_retrieval.retrievers.intra import default_model

    model_name = args.model or default_model()
    bert = model_name.startswith("bert2bert")
    # one store per (cross-attention init or memory adapter): they change the model
    stores = args.cross_init.split(",") if bert else args.memory_adapter.split(",")
    fits: dict[str, dict] = {}
    trained = {"examples": 0, "steps": 0}  # of the last fit, for the notes
    for variant in stores:
        t0 = time.perf_counter()
        extra = (
            {"cross_init": variant}
            if bert
            else {"encoder_attention": args.encoder_attention, "memory_adapter": variant}
        )
        tag = Path(variant).stem if not bert else variant
        intra = IntraRetriever(
            model_name,
            retrieval_tokens=args.retrieval_tokens,
            pooled=args.pooled,
            k0=args.k0,
            max_length=args.max_length,
            pooled_dtype=args.pooled_dtype,
            path=work / f"store-{tag}",
            show_progress=False,
            **extra,
        )
        load_s = time.perf_counter() - t0
        added = intra.add(docs, on_duplicate="skip")  # resumes an interrupted run
        # a resumed run indexed only part of the corpus: no index time then
        index_s = time.perf_counter() - t0 - load_s if len(added) == len(docs) else None
        log["model_load_s"] = load_s
        log["intra_index_s"] = index_s
        store_label = f"cross-attention {variant}" if bert else f"memory adapter {tag}"
        c0_scores = args.c0_scores.split(",")
        if variant == stores[0]:  # the encoder is the same for every variant
            for c0 in c0_scores:
                with intra.using(mode="encoder", c0_score=c0):
                    record(f"INTRA (a) encoder-side stage (C0 MaxSim, {c0})", intra, index_s)
        for positions, c0 in [(p, c) for p in args.query_positions.split(",") for c in c0_scores]:
            intra.configure(c0_score=c0)
            label = store_label if c0_scores == ["dot"] else f"{store_label}, C0 {c0}"
            intra.query_positions = positions
            intra.reset_head()  # a rerun reopens a store whose head was already trained
            record(f"INTRA (b) full, untrained head, {label}, queries: {positions}", intra, None)
            if args.no_fit:
                continue
            train_q = load_beir(args.dataset, split="train").queries
            qids = sorted(q for q in train_qrels if q in train_q)
            if args.train_queries:
                qids = qids[: args.train_queries]
            for rank in (int(x) for x in args.lora_ranks.split(",")):
                intra.reset_head()
                t0 = time.perf_counter()
                report = intra.fit(
                    {q: train_q[q] for q in qids},
                    {q: train_qrels[q] for q in qids},
                    epochs=args.epochs,
                    lr=args.lr,
                    n_candidates=args.n_candidates,
                    lora_rank=rank,
                    checkpoint_dir=work / f"ckpt-{tag}-{positions}-{args.epochs}-{args.lr}-"
                    f"{args.n_candidates}-{len(qids)}-lora{rank}-{c0}",
                    show_progress=False,
                )
                fit_s = time.perf_counter() - t0
                losses = report.losses
                n = max(1, len(losses) // 10)
                trained = {"examples": report.num_examples, "steps": report.steps}
                log.update(
                    fit_s=fit_s,
                    fit_steps=report.steps,
                    fit_examples=report.num_examples,
                    loss_first=sum(losses[:n]) / n,
                    loss_last=sum(losses[-n:]) / n,
                )
                print(log, flush=True)
                what = "paper recipe" if not rank else f"+ query LoRA r={rank}"
                record(
                    f"INTRA (c) full, after fit ({what}), {label}, queries: {positions}",
                    intra,
                    None,
                )
                fits[f"{tag}/{positions}/lora{rank}/{c0}"] = dict(log)
        intra.close()

    out = {
        **result_head(
            __file__,
            "intra_scifact",
            f"IntraRetriever on SciFact ({'BERT2BERT' if bert else 'Gemma 3 270M'} backbone): "
            "encoder stage and full INTRA, before and after fit",
        ),
        "tables": [
            {
                "title": "SciFact test: INTRA beside BM25 and dense (document-level, BEIR qrels)"
                + (f" [corpus subset: {len(docs)} docs]" if args.subset else ""),
                "columns": [
                    "retriever",
                    "nDCG@10",
                    "R@10",
                    "R@100",
                    "queries",
                    "index s",
                    "ms/query",
                ],
                "rows": rows,
                "notes": (
                    (
                        "Backbone BERT2BERT from all-MiniLM-L6-v2; cross-attention either randomly "
                        "initialised (seed 0) or copied from each layer's self-attention "
                        "(cross_init='self'); "
                        if bert
                        else f"Backbone {model_name} (T5Gemma2 built from Gemma 3 270M, "
                        f"{args.encoder_attention} encoder; memory adapters 'generated': fitted "
                        "in closed form on 64 texts Gemma 3 wrote itself from generic prompts, "
                        "no SciFact text, no labels; 'none': the naive build). Model load "
                        f"{log.get('model_load_s', 0):.0f} s; "
                    )
                    + f"m={args.retrieval_tokens} retrieval tokens, p={args.pooled} pooled "
                    f"vectors/chunk, k0={args.k0}, max_length={args.max_length}, "
                    "fp16 token states, "
                    f"{intra.pooled_dtype} pooled vectors. fit: "
                    f"{trained['examples']} train queries, {trained['steps']} steps "
                    f"({args.epochs} epoch(s), "
                    f"batch 8, lr {args.lr}), softmax over {args.n_candidates} chunks (half the "
                    "encoder stage's best, half uniform from the rest) + positives, or the whole "
                    "corpus when smaller; mean loss first/last 10% of steps, fit seconds: "
                    + "; ".join(
                        f"{c}: {f['loss_first']:.3f} -> {f['loss_last']:.3f}, {f['fit_s']:.0f} s"
                        for c, f in fits.items()
                    )
                    + ". "
                    f"{args.threads} torch thread(s), shared 2-core CPU. Corpus: "
                    + (
                        f"subset of {len(docs)} of 5183 documents (all test and train positives "
                        "+ random others, seed 0); all rows use it."
                        if args.subset
                        else "full (5183 documents)."
                    )
                ),
            }
        ],
    }
    write_result(args.out, out)
    print(json.dumps(out["tables"][0], indent=1))


if __name__ == "__main__":
    main()
