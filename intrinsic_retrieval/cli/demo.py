"""``intrinsic-retrieval demo``: the five retrievers side by side on a small real corpus.

A SciFact subset (test queries to evaluate, training queries for the retrievers that train,
their relevant documents and random others) is indexed by BM25, dense, INTRA, in-context and
generative retrieval; INTRA and generative retrieval are trained on the training queries,
in-context retrieval runs zero-shot. One table compares quality and cost; then each retriever's
top hits for a question, and INTRA's answer generated from the stored chunk states.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .output import format_table, markdown_table, print_hits, write_results

MEASURES = ("nDCG@10", "R@10")


def contenders(args: argparse.Namespace) -> list[Any]:
    """The demo's five columns with the settings the demo trains them with."""
    from ..eval.compare import Contender
    from ..retrievers import create_retriever

    progress = {"show_progress": not args.quiet}  # bars for indexing and training

    def make(name: str, **kw: Any) -> Callable[[], Any]:
        return lambda: create_retriever(name, **progress, **kw)

    return [
        Contender("bm25", make("bm25")),
        Contender("dense", make("dense")),
        Contender(
            "intra",
            make("intra"),
            fit_options={
                **progress,
                "lora_rank": 8,
                "epochs": args.intra_epochs,
                "time_limit_s": args.budget_s,
            },
        ),
        Contender("incontext", make("incontext", ssmax="auto"), fit=False),
        Contender(
            "generative",
            make("generative"),
            fit_options={
                **progress,
                "inputs": ("firstp", "daq", "labeled"),
                "epochs": 100.0,
                "time_limit_s": args.budget_s,
                "heldout_fraction": 0.0,
                "train_mode": "decoder",
            },
        ),
    ]


def cmd_demo(args: argparse.Namespace) -> int:
    from ..eval import parse_measures
    from ..eval.compare import RESULT_COLUMNS, demo_subset, result_rows, side_by_side

    scifact = Path(args.scifact)
    if not (scifact / "corpus.jsonl").exists():
        raise InvalidInputError(f"{scifact}: no SciFact here (pass --scifact <BEIR directory>)")
    data, train = demo_subset(
        str(scifact),
        n_docs=args.docs,
        n_test=args.queries,
        n_train=args.train_queries,
        seed=args.seed,
    )
    wanted = [n.strip() for n in args.retriever.split(",") if n.strip()]
    cols = [c for c in contenders(args) if c.label in wanted]
    if not cols:
        raise InvalidInputError(
            f"--retriever names none of the demo's retrievers: {args.retriever}"
        )
    shown = list(data.judged_queries().values())[: args.show]
    print(
        f"SciFact subset: {len(data.corpus)} documents, {len(data.judged_queries())} test queries,"
        f" {len(train[0])} training queries (for the retrievers that train)\n",
        flush=True,
    )
    notes: dict[str, list[str]] = {}

    def show(contender: Any, r: Any) -> None:
        lines = notes.setdefault(contender.label, [])
        for q, hits in zip(shown, r.search_batch(shown, k=3), strict=True):
            print_hits(f"[{contender.label}] {q}", hits, width=90)
            lines.append(f"{q} -> {[h.document_id for h in hits]}")
        if contender.label == "intra" and shown:
            ans = r.answer(shown[0], k=3, max_new_tokens=40)
            print(f"  INTRA answer() from stored chunk states: {ans.text.strip()!r}")
            lines.append(f"answer: {ans.text.strip()}")
        sys.stdout.flush()

    results = side_by_side(
        data,
        cols,
        train=train,
        k=100,
        measures=parse_measures(MEASURES),
        batch_size=1,
        show_progress=not args.quiet,
        on_ready=show,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    columns = ["retriever", *MEASURES, *RESULT_COLUMNS]
    rows = result_rows(results, list(MEASURES))
    print(f"\n{data.name}: {len(data.judged_queries())} test queries")
    print(format_table(columns, rows))
    if args.out:
        payload = {
            "name": "demo",
            "title": "make demo: the five retrievers side by side",
            "tables": [{"title": f"{data.name} (test queries)", "columns": columns, "rows": rows}],
            "markdown": markdown_table(columns, rows),
            "examples": notes,
        }
        write_results(args.out, payload, results)
    return 0
