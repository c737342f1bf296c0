"""`intrinsic-retrieval` command line: index, search, eval, info, demo."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidFilterError, InvalidInputError, RetrievalError
from .types import Document, as_document

TEXT_SUFFIXES = {".md", ".txt", ".rst"}


# ---------------------------------------------------------------------- inputs
def read_corpus(path: str | Path, *, limit: int | None = None) -> list[Document]:
    """A BEIR directory, a JSONL file of {"_id"|"id", "title"?, "text", "metadata"?}, or a
    directory of .md/.txt/.rst files (one document per file, id = relative path)."""
    root = Path(path)
    docs: list[Document] = []
    if (root / "corpus.jsonl").exists():
        from .eval import load_beir

        docs = load_beir(root).documents()
    elif root.is_file() and root.suffix == ".jsonl":
        from .eval.beir import _jsonl

        for rec in _jsonl(root):
            title = (rec.get("title") or "").strip()
            text = rec.get("text", "")
            docs.append(
                as_document(
                    {
                        "text": f"{title}\n{text}" if title and isinstance(text, str) else text,
                        "id": rec.get("_id", rec.get("id")),
                        "metadata": rec.get("metadata"),
                    }
                )
            )
    elif root.is_dir():
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in TEXT_SUFFIXES:
                text = f.read_text("utf-8", errors="replace")
                if text.strip():
                    rel = str(f.relative_to(root))
                    docs.append(Document(text=text, id=rel, metadata={"source": rel}))
    else:
        raise InvalidInputError(f"{root}: not a BEIR directory, a .jsonl file or a text directory")
    return docs[:limit] if limit else docs


def parse_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise InvalidInputError(f"--option needs key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on; every benchmark records it."""
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join(
        [line, sep, *("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body)]
    )


def _print_hits(query: str, hits: Sequence[Any], width: int = 100) -> None:
    print(f"\nquery: {query}")
    for h in hits:
        snippet = " ".join(h.text.split())[:width]
        print(f"  {h.rank:>2}. {h.score:8.4f}  {h.document_id}  {snippet}")


def _batched(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ---------------------------------------------------------------------- commands
def cmd_index(args: argparse.Namespace) -> int:
    from .retrievers import create_retriever, load_retriever

    docs = read_corpus(args.input, limit=args.limit)
    store = Path(args.store)
    t0 = time.perf_counter()
    if (store / "manifest.json").exists():
        retriever = load_retriever(store, **parse_options(args.option))
    else:
        retriever = create_retriever(args.retriever, path=str(store), **parse_options(args.option))
    # resumable: documents already stored (e.g. before an interruption) are skipped
    added = retriever.add(docs, on_duplicate="skip")
    print(
        f"indexed {len(added)} new documents ({len(docs) - len(added)} already present) into "
        f"{store} with {retriever.name}: {len(retriever)} chunks, "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .retrievers import load_retriever

    retriever = load_retriever(args.store, **parse_options(args.option))
    try:
        flt = json.loads(args.filter) if args.filter else None
    except json.JSONDecodeError as exc:
        raise InvalidFilterError(f"--filter is not valid JSON: {exc}") from None
    results = retriever.search_batch(args.query, k=args.k, filter=flt)
    if args.json:
        print(json.dumps([[_hit_dict(h) for h in hs] for hs in results], indent=2))
    else:
        for q, hits in zip(args.query, results, strict=True):
            _print_hits(q, hits)
    return 0


def _hit_dict(h: Any) -> dict[str, Any]:
    return {
        "chunk_id": h.chunk_id,
        "document_id": h.document_id,
        "score": h.score,
        "rank": h.rank,
        "text": h.text,
        "metadata": dict(h.metadata),
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate, load_beir, parse_measures
    from .retrievers import create_retriever

    dataset = load_beir(args.dataset, split=args.split)
    if args.subset:
        dataset = dataset.subset(args.subset, seed=args.seed)
    measures = parse_measures(args.measures.split(","))
    options = parse_options(args.option)
    results = []
    for name in [n.strip() for n in args.retriever.split(",") if n.strip()]:
        print(f"[{name}] indexing {len(dataset.corpus)} documents", file=sys.stderr)
        retriever = create_retriever(name, show_progress=not args.quiet, **options.get(name, {}))
        t0 = time.perf_counter()
        retriever.add(dataset.documents())
        index_s = time.perf_counter() - t0
        res = evaluate(
            retriever,
            dataset,
            name=name,
            k=args.k,
            measures=measures,
            index_seconds=index_s,
            show_progress=not args.quiet,
        )
        results.append(res)
    cols = ["retriever", *[str(m) for m in measures], "index s", "search s", "docs", "queries"]
    rows = [
        [
            r.retriever,
            *r.metrics.values(),
            round(r.index_seconds or 0, 1),
            round(r.search_seconds, 1),
            r.num_docs,
            r.num_queries,
        ]
        for r in results
    ]
    print(f"\n{dataset.name} ({args.split})")
    print(format_table(cols, rows))
    if args.out:
        payload = {
            "name": f"eval-{dataset.name}",
            "title": f"CLI eval: {dataset.name} ({args.split})",
            "tables": [
                {
                    "title": f"{dataset.name} ({args.split}), from the CLI",
                    "columns": cols,
                    "rows": rows,
                }
            ],
            "dataset": dataset.name,
            "split": args.split,
            "command": " ".join(["intrinsic-retrieval", *sys.argv[1:]]),
            "machine": machine_info(),
            "results": [r.to_dict() for r in results],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .store import EncodedChunkStore

    store = EncodedChunkStore.open(args.store, read_only=True)
    m = store.manifest
    info = {
        "path": str(store.path),
        "retriever": m["config"].get("retriever"),
        "format_version": m["format_version"],
        "fingerprint": m["fingerprint"],
        "chunks": len(store),
        "rows (incl. tombstones)": store.num_rows,
        "shards": len(m["shards"]),
        "bytes": store.nbytes(),
        "tensors": m["tensors"],
        "init": m["config"].get("init"),
    }
    if args.verify:
        store.verify()
        info["verified"] = True
    print(json.dumps(info, indent=2))
    return 0


DEMO_QUERIES = [
    "how do I persist an index and load it again?",
    "what does the store refuse to open?",
    "which metrics does the evaluation report?",
]
SCIFACT_QUERIES = [
    "Vitamin D deficiency is associated with multiple sclerosis.",
    "Smoking increases the risk of lung cancer.",
]


def cmd_demo(args: argparse.Namespace) -> int:
    from .retrievers import create_retriever

    corpora: list[tuple[str, list[Document], list[str]]] = []
    docs_dir = Path(args.docs)
    if docs_dir.is_dir() and read_corpus(docs_dir):
        corpora.append((f"project docs ({docs_dir})", read_corpus(docs_dir), DEMO_QUERIES))
    scifact = Path(args.scifact)
    if (scifact / "corpus.jsonl").exists():
        corpora.append(
            (
                f"SciFact ({scifact}, first {args.limit} docs)",
                read_corpus(scifact, limit=args.limit),
                SCIFACT_QUERIES,
            )
        )
    if not corpora:
        raise InvalidInputError("no demo corpus found (pass --docs or --scifact)")
    for title, docs, queries in corpora:
        print(f"\n=== {title}: {len(docs)} documents")
        for name in args.retriever.split(","):
            retriever = create_retriever(name, show_progress=False)
            t0 = time.perf_counter()
            retriever.add(docs)
            print(
                f"\n--- {name}: {len(retriever)} chunks indexed in {time.perf_counter() - t0:.1f}s"
            )
            for q, hits in zip(queries, retriever.search_batch(queries, k=args.k), strict=True):
                _print_hits(q, hits, width=90)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="intrinsic-retrieval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("index", help="index a corpus into a store (resumable)")
    s.add_argument("input", help="BEIR dir, .jsonl file, or directory of .md/.txt/.rst files")
    s.add_argument("--store", required=True, help="store directory (created or resumed)")
    s.add_argument("--retriever", default="bm25")
    s.add_argument("--limit", type=int, default=None, help="index only the first N documents")
    s.add_argument("--option", action="append", help="retriever kwarg key=value (repeatable)")
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="search a store")
    s.add_argument("query", nargs="+")
    s.add_argument("--store", required=True)
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"year": {"$gte": 2000}}\'')
    s.add_argument("--json", action="store_true", help="print hits as JSON")
    s.add_argument("--option", action="append", help="load override key=value (e.g. device=cpu)")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("eval", help="evaluate retrievers on a BEIR dataset")
    s.add_argument("--dataset", required=True, help="BEIR directory, e.g. ../shared/data/scifact")
    s.add_argument("--retriever", default="bm25,dense", help="comma-separated registry names")
    s.add_argument("--split", default="test")
    s.add_argument("--subset", type=int, default=None, help="positives + random docs up to N")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-k", type=int, default=100, help="documents retrieved per query")
    s.add_argument("--measures", default="nDCG@10,R@10,R@100,RR@10")
    s.add_argument("--option", action="append", help='per-retriever kwargs as name={"key": value}')
    s.add_argument("--out", help="write results JSON here")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("info", help="describe a store")
    s.add_argument("--store", required=True)
    s.add_argument("--verify", action="store_true", help="check every file's checksum")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("demo", help="index the project docs (and SciFact if present) and search")
    s.add_argument("--docs", default="docs")
    s.add_argument("--scifact", default="../shared/data/scifact")
    s.add_argument("--limit", type=int, default=300)
    s.add_argument("--retriever", default="bm25,dense")
    s.add_argument("-k", type=int, default=3)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RetrievalError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
