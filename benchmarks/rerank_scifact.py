"""Second stages on the full SciFact corpus (5,183 documents, 300 test queries): BM25's top
candidates reranked by in-context retrieval and by INTRA, and reciprocal-rank fusion of BM25 and
dense, beside BM25 and dense in the same run. Reports nDCG@10 / R@10 / RR@10, median latency per
stage, and the stored bytes per document of each index.

Phases (stores live in `--workdir`, outside the repository; every phase resumes):

    python benchmarks/rerank_scifact.py --phase build --retrievers bm25,incontext,dense
    python benchmarks/rerank_scifact.py --phase eval --fusion-first \
        --out benchmarks/results/rerank_scifact.json
    python benchmarks/rerank_scifact.py --phase int8 --queries 40 --candidates 20 \
        --out benchmarks/results/rerank_int8_cost.json

`build` indexes BM25, dense (all-MiniLM-L6-v2), in-context (Gemma 3 270M, one 300-token block
per document, int8 K/V of every layer) and INTRA (Gemma 3 270M as T5Gemma2, retrieval head and
a rank-8 query LoRA trained on SciFact's training queries); an interrupted build resumes where it
stopped (documents already stored are skipped). `eval` composes the stored indexes (`Rerank`,
`Fusion`) without re-encoding anything; a store that is not complete is left out. `int8` measures
what int8 K/V costs the in-context second stage against float16 on the same candidates.
`--subset N` runs on N documents (all test positives kept) in its own `--workdir`;
`--reuse-incontext` lets that run rerank from the full-corpus in-context store.
`--ic-build` overrides the in-context index options (e.g. fewer `kv_layers`, float16), and
`--ic-query-lora` loads a query LoRA trained on another index of the same model
(`InContextRetriever.save_query_lora`, e.g. from `train_incontext_scifact.py`'s store) into the
in-context store before `eval`: trained once on a sample, used on the whole corpus.
`--intra-head` does the same for INTRA at build time: a retrieval head saved with
`IntraRetriever.save_head` from another index of the same model and recipe (e.g. the
1,000-document store of `eval_intra_scifact.py`) is stored instead of fitting one here.
`--phase fit-incontext` then trains that LoRA further for the reranker's own task (each
training query over its positives and BM25's top `--fit-candidates` of the whole corpus) for
`--fit-minutes`; `eval` notes the training it had.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _report import result_head, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

#: the index each stage reads, built once by `--phase build`
STORES: dict[str, dict[str, Any]] = {
    "bm25": {},
    "dense": {},
    "incontext": {"model": "gemma3", "max_doc_tokens": 300, "store_dtype": "int8"},
    "intra": {"store_dtype": "float16"},
}
#: INTRA's training: the recipe that ranked best in docs/intra.md (frozen backbone, retrieval
#: head plus a rank-8 query LoRA, softmax over 1,024 chunks)
INTRA_FIT = {"lora_rank": 8, "n_candidates": 1024}


def _data(args: argparse.Namespace) -> Any:
    """The test split, on `--subset` documents when given: every test and training positive
    (so INTRA trains on all its queries) plus random others (seed 0)."""
    import random

    from intrinsic_retrieval.eval import BeirDataset, load_beir

    data = load_beir(args.dataset, split="test")
    if not args.subset:
        return data
    train = load_beir(args.dataset, split="train")
    keep = {d for q in (data.qrels, train.qrels) for rel in q.values() for d, r in rel.items() if r}
    keep &= set(data.corpus)
    others = sorted(set(data.corpus) - keep)
    random.Random(0).shuffle(others)
    keep |= set(others[: max(0, args.subset - len(keep))])
    corpus = {d: doc for d, doc in data.corpus.items() if d in keep}
    return BeirDataset(f"{data.name}[{len(corpus)}]", corpus, data.queries, data.qrels)


def build(args: argparse.Namespace) -> None:
    from intrinsic_retrieval import create_retriever, load_retriever
    from intrinsic_retrieval.eval import load_beir

    data = _data(args)
    docs = data.documents()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = (
        json.loads((work / "build.json").read_text()) if (work / "build.json").exists() else {}
    )
    ic_build = json.loads(args.ic_build)
    for name in args.retrievers.split(","):
        path = work / name
        options = {**STORES[name], **(ic_build if name == "incontext" else {})}
        built = log.get(name, {}).get("options")
        if (path / "manifest.json").exists() and built is not None and built != options:
            sys.exit(f"{path} was built with {built}, not {options}: use another --workdir")
        r = (
            load_retriever(path)
            if (path / "manifest.json").exists()
            else create_retriever(name, path=str(path), **options)
        )
        t0 = time.perf_counter()
        added = r.add(docs, on_duplicate="skip")
        entry = log.setdefault(name, {"index_seconds": 0.0})
        entry.setdefault("options", options)
        entry["index_seconds"] += time.perf_counter() - t0
        entry["documents"] = len({d.id for d in docs})
        print(f"[{name}] indexed {len(added)} new documents", flush=True)
        digest = _sha256(args.intra_head) if name == "intra" and args.intra_head else None
        if digest and entry.get("head", {}).get("sha256") != digest:
            r.load_head(args.intra_head)  # trained on another index of the same model
            if not r.trained:
                sys.exit(f"{args.intra_head} holds an untrained head")
            r.save_head()  # persisted in this store (bound to it from now on)
            entry["head"] = {"file": args.intra_head, "sha256": digest}
            entry.pop("fit", None)
        elif name == "intra" and not entry.get("fit") and not entry.get("head"):
            train = load_beir(args.dataset, split="train")
            t0 = time.perf_counter()
            report = r.fit(
                {q: train.queries[q] for q in train.qrels if q in train.queries},
                train.qrels,
                **INTRA_FIT,
                epochs=args.intra_epochs,
                checkpoint_dir=str(work / "intra.fit"),
            )
            entry["fit"] = {
                "seconds": time.perf_counter() - t0,
                "steps": report.steps,
                "examples": report.num_examples,
                "epochs": args.intra_epochs,
                **INTRA_FIT,
            }
            r.save(path)
        r.close()
        (work / "build.json").write_text(json.dumps(log, indent=2))


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/scifact"))
    ap.add_argument("--workdir", default=str(ROOT.parent / "stores/rerank_scifact"))
    ap.add_argument(
        "--phase", choices=["build", "fit-incontext", "eval", "int8", "dev"], required=True
    )
    ap.add_argument("--retrievers", default="bm25,dense,incontext,intra")
    ap.add_argument("--intra-epochs", type=int, default=1)
    ap.add_argument("--candidates", default="50,100", help="first-stage depths to rerank")
    ap.add_argument("--queries", type=int, default=0, help="sample this many (0: all 300)")
    ap.add_argument("--subset", type=int, default=0, help="documents (0: the full corpus)")
    ap.add_argument(
        "--reuse-incontext", help="an in-context store of the full corpus to rerank with"
    )
    ap.add_argument(
        "--ic-build",
        default="{}",
        help="JSON: in-context index options over the defaults, e.g. '{\"kv_layers\": 9}'",
    )
    ap.add_argument(
        "--ic-query-lora",
        help="a query LoRA file (InContextRetriever.save_query_lora) to load into the "
        "in-context store before evaluating",
    )
    ap.add_argument(
        "--intra-head",
        help="build: a retrieval head file (IntraRetriever.save_head) trained on another index "
        "of the same model, stored instead of fitting on the full corpus",
    )
    ap.add_argument("--fusion-first", action="store_true", help="also rerank RRF's top 50")
    ap.add_argument("--whole-corpus-queries", type=int, default=3)
    ap.add_argument("--ic-options", help="JSON: a further in-context configuration to evaluate")
    ap.add_argument("--ic-label", default="options chosen on training queries")
    ap.add_argument(
        "--dev-configs", help="dev: run only these DEV_CONFIGS (indices), adding to --out's rows"
    )
    ap.add_argument("--out", default=str(HERE / "results/rerank_scifact.json"))
    ap.add_argument("--fit-minutes", type=float, default=15.0, help="fit-incontext time budget")
    ap.add_argument("--fit-candidates", type=int, default=50, help="fit-incontext set size")
    ap.add_argument(
        "--fit-hard",
        type=int,
        help="fit-incontext: BM25 hard negatives per set (default: all of --fit-candidates); "
        "random documents fill the set up to --fit-candidates with the positives",
    )
    ap.add_argument("--fit-lr", type=float, default=1e-3, help="fit-incontext learning rate")
    args = ap.parse_args()
    phases = {"build": build, "fit-incontext": fit_incontext, "eval": evaluate}
    {**phases, "int8": int8_cost, "dev": dev}[args.phase](args)


def fit_incontext(args: argparse.Namespace) -> None:
    """Train the full-corpus in-context store's query LoRA for the reranker's own task: each
    SciFact training query attends over a set of `--fit-candidates` documents of the whole
    corpus: its positives, BM25's best `--fit-hard` others (by default as many as fill the set:
    a BM25 top-k second stage's candidates, with the positives always in), then random
    documents up to the set size; for `--fit-minutes` at most. Starts from the store's LoRA (or
    `--ic-query-lora`) when there is one."""
    from intrinsic_retrieval import load_retriever
    from intrinsic_retrieval.eval import load_beir

    work = Path(args.workdir)
    ic = load_retriever(work / "incontext")
    if args.ic_query_lora:
        ic.load_query_lora(args.ic_query_lora)
    start = ic.query_lora  # fit continues from it at its own rank
    train = load_beir(args.dataset, split="train")
    queries = {q: train.queries[q] for q in train.qrels if q in train.queries}
    hard = args.fit_candidates if args.fit_hard is None else args.fit_hard
    t0 = time.perf_counter()
    report = ic.fit(
        queries,
        train.qrels,
        objective="readout",
        lora_rank=start.rank if start is not None else 8,
        candidates=args.fit_candidates,
        hard_negatives=hard,
        lr=args.fit_lr,
        temperature=0.05,
        batch_size=4,
        epochs=1,
        time_limit_s=60 * args.fit_minutes,
        checkpoint_dir=str(work / "incontext.fit"),
        checkpoint_every=25,
    )
    log = json.loads((work / "build.json").read_text())
    log["incontext"]["fit"] = {
        "seconds": time.perf_counter() - t0,
        "steps": report.steps,
        "examples": report.num_examples,
        "started_from": (
            "a new LoRA" if start is None else args.ic_query_lora or "the store's LoRA"
        ),
        "candidates": args.fit_candidates,
        "hard_negatives": hard,
        "lr": args.fit_lr,
        "completed": report.completed,
    }
    (work / "build.json").write_text(json.dumps(log, indent=2))
    print(json.dumps(log["incontext"]["fit"]), flush=True)


def _fit_sets(build_log: dict[str, Any]) -> str:
    """What `--phase fit-incontext` trained on (records before --fit-hard: hard negatives only)."""
    fit = build_log["incontext"]["fit"]
    hard = fit.get("hard_negatives", fit["candidates"])
    sets = f"sets of {fit['candidates']}: positives + {hard} BM25 negatives"
    if fit["candidates"] > hard:
        sets += " + random documents to fill"
    return f"{sets}, lr {fit.get('lr', 1e-3):g}"


def _ready(work: Path, name: str, n_docs: int) -> bool:
    """Whether the build finished `name` (every document stored, INTRA trained)."""
    log = json.loads((work / "build.json").read_text()) if (work / "build.json").exists() else {}
    entry = log.get(name, {})
    trained = "fit" in entry or "head" in entry
    return entry.get("documents") == n_docs and (name != "intra" or trained)


def evaluate(args: argparse.Namespace) -> None:
    from intrinsic_retrieval import Fusion, Rerank, load_retriever
    from intrinsic_retrieval.eval.metrics import parse_measures
    from intrinsic_retrieval.eval.runner import evaluate as run_eval

    data = _data(args)
    if args.queries:
        data = data.sample_queries(args.queries, seed=0)
    work = Path(args.workdir)
    measures = parse_measures(METRICS)
    stores = {
        n: load_retriever(work / n, show_progress=False)
        for n in STORES
        if n in args.retrievers.split(",") and _ready(work, n, len(data.corpus))
    }
    if args.reuse_incontext:  # a store of a larger corpus: rerank reads the candidates only
        stores["incontext"] = load_retriever(args.reuse_incontext, show_progress=False)
    if args.ic_query_lora and "incontext" in stores:  # trained elsewhere, same model
        if "fit" in json.loads((work / "build.json").read_text()).get("incontext", {}):
            sys.exit("--ic-query-lora would replace the LoRA --phase fit-incontext trained here")
        stores["incontext"].load_query_lora(args.ic_query_lora)
    print(f"stores ready: {sorted(stores)}", flush=True)
    if "bm25" not in stores:
        sys.exit(f"eval needs the BM25 store (the first stage): build it in {work}")
    check = not args.reuse_incontext
    build_log = json.loads((work / "build.json").read_text())
    # (label, retriever, in-context query-time options in force while it runs)
    contenders: list[tuple[str, Any, dict[str, Any]]] = [("BM25", stores["bm25"], {})]
    if "dense" in stores:
        contenders += [
            ("dense (all-MiniLM-L6-v2)", stores["dense"], {}),
            ("RRF(BM25, dense)", Fusion([stores["bm25"], stores["dense"]], depth=100), {}),
        ]
    # (label suffix, in-context options, at every depth or only at the first)
    ic_configs: list[tuple[str, dict[str, Any], bool]] = [("", {}, True)]
    if args.ic_options:
        ic_configs = [("", {}, False), (f", {args.ic_label}", json.loads(args.ic_options), True)]
    trained = "incontext" in stores and stores["incontext"].query_lora is not None
    if trained:
        suffix, options, _ = ic_configs[-1]  # zero-shot beside trained, on the same store
        ic_configs = [
            (f"{suffix}, zero-shot", {**options, "use_query_lora": False}, False),
            (f"{suffix}, trained query LoRA", options, True),
        ]
    depths = [int(x) for x in args.candidates.split(",")]
    for n in depths:
        for suffix, options, every in ic_configs:
            if "incontext" in stores and (every or n == depths[0]):
                r = Rerank(stores["bm25"], stores["incontext"], candidates=n, check_stages=check)
                contenders.append((f"BM25 top-{n} -> in-context{suffix}", r, options))
        if "intra" in stores:
            r = Rerank(stores["bm25"], stores["intra"], candidates=n)
            contenders.append((f"BM25 top-{n} -> INTRA", r, {}))
    # the INTRA paper's hybrid: RRF of the first stage and its reranking (any second stage)
    # (at the first depth; in-context in its last configuration only)
    n = depths[0]
    for label, r, options in list(contenders):
        if not (isinstance(r, Rerank) and label.startswith(f"BM25 top-{n} -> ")):
            continue
        if r.second is stores.get("incontext") and options != ic_configs[-1][1]:
            continue
        hybrid = Fusion([stores["bm25"], r], depth=n, check_stages=check)
        contenders.append((f"RRF(BM25, {label})", hybrid, options))
    if "incontext" in stores and "dense" in stores and args.fusion_first:
        rrf = Fusion([stores["bm25"], stores["dense"]], depth=100)
        suffix, options, _ = ic_configs[-1]
        r = Rerank(rrf, stores["incontext"], candidates=50, check_stages=check)
        contenders.append((f"RRF top-50 -> in-context{suffix}", r, options))
    rows, results = [], []
    for label, r, options in contenders:
        print(f"[{label}] {len(data.judged_queries())} queries", flush=True)
        if hasattr(r, "reset_timings"):
            r.reset_timings()
        ic = stores.get("incontext")
        with ic.using(**options) if options else contextlib.nullcontext():
            res = run_eval(r, data, name=label, k=10, batch_size=1, measures=measures)
        res.extra["incontext_options"] = options
        stage_ms = r.median_stage_ms() if hasattr(r, "median_stage_ms") else {}
        res.extra["stage_ms"] = stage_ms
        results.append(res.to_dict())
        m = res.metrics
        rows.append(
            [
                label,
                m.get("nDCG@10"),
                m.get("R@10"),
                m.get("RR@10"),
                res.median_query_ms,
                ", ".join(f"{k} {v:.0f}" for k, v in stage_ms.items() if v is not None) or "–",
                res.bytes_per_document,
            ]
        )
        print(rows[-1], flush=True)
    whole = []
    if "incontext" in stores and args.whole_corpus_queries:
        ic = stores["incontext"]
        for q in list(data.judged_queries().values())[: args.whole_corpus_queries]:
            t0 = time.perf_counter()
            ic.search(q, k=10)
            whole.append(time.perf_counter() - t0)
    fitted = trained and "fit" in build_log.get("incontext", {})
    parts = []
    if trained:
        parts.append(
            "in-context zero-shot and with a trained query LoRA"
            + (f", further trained on the full corpus ({_fit_sets(build_log)})" if fitted else "")
        )
    if "intra" in stores:
        where = "another index" if "head" in build_log["intra"] else "this index"
        parts.append(f"INTRA, its head trained on {where}")
    head = result_head(
        __file__,
        "rerank_scifact_trained" if trained else "rerank_scifact",
        "Second stages on the full SciFact corpus" + (": " + "; ".join(parts) if parts else ""),
    )
    notes = [
        f"{len(data.corpus)} documents, {len(data.judged_queries())} test queries; one process, "
        "batch size 1; latency is the median per query, per stage in milliseconds",
        "stores built once by `--phase build` (seconds, all documents): "
        + "; ".join(f"{n} {v['index_seconds']:.0f}" for n, v in build_log.items()),
    ]
    if "incontext" in stores:
        ic = stores["incontext"]
        notes.append(
            f"in-context: Gemma 3 270M, one {ic.max_doc_tokens}-token block per document (longer "
            f"documents truncated), {ic.store_dtype} K/V of layers 0-{ic.kv_layers - 1}, "
            + (
                "zero-shot readout"
                if ic.query_lora is None
                else f"trained query LoRA ({args.ic_query_lora or 'the store holds it'})"
            )
            + (
                f"; then trained on the full corpus by --phase fit-incontext: {fit}"
                if (fit := build_log.get("incontext", {}).get("fit"))
                else ""
            )
            + (
                "; its store holds the full corpus (built by the full run): a second stage "
                "reads only the candidates, all from this subset"
                if args.reuse_incontext
                else ""
            )
        )
    if "intra" in stores:
        intra, entry = stores["intra"], build_log["intra"]
        if "head" in entry:
            lora = intra.head.lora_rank
            trained_on = (
                f"retrieval head loaded from {entry['head']['file']} (trained on another index "
                f"of the same model{f'; rank-{lora} query LoRA' if lora else ''})"
            )
        else:
            fit = entry["fit"]
            recipe = {**INTRA_FIT, **fit}  # records before INTRA_FIT was stored used it
            trained_on = (
                f"retrieval head trained on SciFact's training queries over this index "
                f"({fit['examples']} examples, {fit['epochs']} epoch(s), "
                f"{fit['seconds'] / 60:.0f} min, rank-{recipe['lora_rank']} query LoRA, softmax "
                f"over {recipe['n_candidates']:,} chunks)"
            )
        notes.append(
            f"INTRA: Gemma 3 270M as T5Gemma2, {intra.store_dtype} encoder states, chunks of "
            f"up to max_length={intra.max_length} tokens, "
            f"{trained_on}; C0 = the first stage's top k0={intra.k0}"
        )
    if whole:
        notes.append(
            f"whole-corpus in-context search (no first stage), {len(whole)} queries: median "
            f"{statistics.median(whole):.1f} s per query"
        )
    result = {
        **head,
        "tables": [
            {
                "title": "nDCG@10 / R@10 / RR@10, latency and stored bytes",
                "columns": [
                    "retriever",
                    "nDCG@10",
                    "R@10",
                    "RR@10",
                    "median ms / query",
                    "ms per stage",
                    "stored bytes / doc",
                ],
                "rows": rows,
                "notes": notes,
            }
        ],
        "results": results,
        "whole_corpus_incontext_s": whole,
    }
    write_result(args.out, result)
    print(json.dumps(rows, indent=1))


def int8_cost(args: argparse.Namespace) -> None:
    """What int8 K/V storage costs the in-context second stage: the same queries and the same
    BM25 candidates reranked from the int8 full-corpus store and from a float16 store of just
    the candidate documents (the second stage reads nothing else)."""
    from intrinsic_retrieval import Rerank, create_retriever, load_retriever
    from intrinsic_retrieval.eval.metrics import parse_measures
    from intrinsic_retrieval.eval.runner import evaluate as run_eval

    data = _data(args).sample_queries(args.queries or 40, seed=0)
    n = int(args.candidates.split(",")[0])
    work = Path(args.workdir)
    bm25 = load_retriever(work / "bm25", show_progress=False)
    int8 = load_retriever(work / "incontext", show_progress=False)
    wanted = {h.document_id for hs in bm25.search_batch(list(data.queries.values()), k=n)
              for h in hs}  # fmt: skip
    path = work / f"incontext_fp16_q{len(data.queries)}_top{n}"
    fp16 = (
        load_retriever(path)
        if (path / "manifest.json").exists()
        else create_retriever(
            "incontext", path=str(path), **{**STORES["incontext"], "store_dtype": "float16"}
        )
    )
    t0 = time.perf_counter()
    fp16.add([data.corpus[d] for d in sorted(wanted)], on_duplicate="skip")
    index_s = time.perf_counter() - t0
    measures = parse_measures(METRICS)
    rows = []
    for label, second in (("int8", int8), ("float16", fp16)):
        r = Rerank(bm25, second, candidates=n, check_stages=False)
        res = run_eval(r, data, name=label, k=10, batch_size=1, measures=measures)
        bpd = second.bytes_per_chunk()
        rows.append(
            [
                f"BM25 top-{n} -> in-context, {label} K/V",
                *_row(res),
                r.median_stage_ms()["second"],
                bpd.get("stored"),
            ]
        )
        print(rows[-1], flush=True)
    _write_table(
        args,
        ("rerank_int8_cost", "In-context second stage: int8 vs float16"),
        "The same candidates reranked from int8 and from float16 K/V",
        ["second stage", *METRICS, "median ms / query (second stage)", "stored bytes / block"],
        rows,
        [
            f"{len(data.queries)} SciFact test queries (seed 0), full corpus; the float16 store "
            f"holds the {len(wanted)} documents among BM25's top {n} for them ({index_s:.0f} s "
            "to prefill)",
        ],
    )


#: query-time options of the in-context second stage compared on training queries (`dev`)
DEV_CONFIGS: dict[str, dict[str, Any]] = {
    "default (all layers, all tokens, calibrated)": {},
    "scalable softmax auto": {"ssmax": "auto"},
    "readout: query tokens only": {"readout_tokens": "query"},
    "not calibrated": {"calibrate": False},
    "readout layers 0-8": {"readout_layers": list(range(9))},
    "readout layers 9-17": {"readout_layers": list(range(9, 18))},
    "readout layers 0-5": {"readout_layers": list(range(6))},
    "readout layers 0-8, scalable softmax auto": {
        "readout_layers": list(range(9)),
        "ssmax": "auto",
    },
    "readout layers 3-8": {"readout_layers": list(range(3, 9))},
}


def dev(args: argparse.Namespace) -> None:
    """The in-context second stage's query-time options on SciFact *training* queries (the
    full corpus, BM25's top `--candidates`), so that the test queries stay unseen."""
    from intrinsic_retrieval import Rerank, load_retriever
    from intrinsic_retrieval.eval import BeirDataset, load_beir
    from intrinsic_retrieval.eval.metrics import parse_measures
    from intrinsic_retrieval.eval.runner import evaluate as run_eval

    train = load_beir(args.dataset, split="train")
    train = BeirDataset(train.name + "-train", train.corpus, train.queries, train.qrels)
    data = train.sample_queries(args.queries or 40, seed=0)
    n = int(args.candidates.split(",")[0])
    work = Path(args.workdir)
    bm25 = load_retriever(work / "bm25", show_progress=False)
    ic = load_retriever(work / "incontext", show_progress=False)
    measures = parse_measures(METRICS)
    chosen = [int(i) for i in args.dev_configs.split(",")] if args.dev_configs else None
    earlier: list[str] = []
    if chosen is not None:  # further configurations beside an earlier run's rows
        before = json.loads(Path(args.out).read_text())
        rows = before["tables"][0]["rows"]
        earlier = [
            n for n in before["tables"][0].get("notes", []) if n.startswith("earlier rows")
        ] or [f"earlier rows: `{before['command']}` ({before['machine'].get('date')})"]
    else:
        bm = run_eval(bm25, data, k=10, batch_size=1, measures=measures)
        rows = [["BM25", *_row(bm), None]]
        print(rows[-1], flush=True)
    for i, (label, options) in enumerate(DEV_CONFIGS.items()):
        if chosen is not None and i not in chosen:
            continue
        r = Rerank(bm25, ic, candidates=n)
        with ic.using(**options):
            res = run_eval(r, data, name=label, k=10, batch_size=1, measures=measures)
        rows.append(
            [f"BM25 top-{n} -> in-context, {label}", *_row(res), r.median_stage_ms()["second"]]
        )
        print(rows[-1], flush=True)
    _write_table(
        args,
        ("rerank_incontext_dev", "In-context second stage: options"),
        "Query-time options of the in-context reranker, on training queries",
        ["retriever", *METRICS, "ms / query (second stage)"],
        rows,
        [
            f"{len(data.queries)} SciFact training queries (seed 0) on the full corpus (5,183 "
            f"documents); BM25's top {n}; Gemma 3 270M, int8 K/V",
            *earlier,
        ],
    )


#: the measures every table of this benchmark reports
METRICS = ["nDCG@10", "R@10", "RR@10"]


def _row(res: Any) -> list[Any]:
    return [res.metrics[m] for m in METRICS]


def _write_table(
    args: argparse.Namespace,
    name_title: tuple[str, str],
    title: str,
    columns: list[str],
    rows: list[list[Any]],
    notes: list[str],
) -> None:
    """One result file holding one table (rendered by render.py)."""
    head = result_head(__file__, *name_title)
    table = {"title": title, "columns": columns, "rows": rows, "notes": notes}
    write_result(args.out, {**head, "tables": [table]})


if __name__ == "__main__":
    main()
