"""What the command line reads: corpora, labeled queries, ``key=value`` options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..types import Document, as_document

TEXT_SUFFIXES = {".md", ".txt", ".rst"}


def read_corpus(path: str | Path, *, limit: int | None = None) -> list[Document]:
    """A BEIR directory, a JSONL file of {"_id"|"id", "title"?, "text", "metadata"?}, or a
    directory of .md/.txt/.rst files (one document per file, id = relative path)."""
    root = Path(path)
    docs: list[Document] = []
    if (root / "corpus.jsonl").exists():
        from ..eval import load_beir

        docs = load_beir(root).documents()
    elif root.is_file() and root.suffix == ".jsonl":
        from ..eval.beir import _jsonl

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


def read_labels(
    *, dataset: str | None, split: str, queries: str | None, qrels: str | None
) -> tuple[dict[str, str], dict[str, dict[str, int]]] | None:
    """Labeled queries for `fit`: a BEIR dataset's `split`, or a queries JSONL
    (``{"_id", "text"}``) + a qrels TSV (query-id, corpus-id, score); None for neither."""
    from ..eval.beir import _jsonl, load_beir, load_qrels

    if dataset is not None:
        data = load_beir(dataset, split=split)
        if not data.qrels:
            raise InvalidInputError(f"{dataset} has no qrels/{split}.tsv to train on")
        return data.queries, data.qrels
    if (queries is None) != (qrels is None):
        raise InvalidInputError("--queries and --qrels go together")
    if queries is None or qrels is None:
        return None
    for p in (queries, qrels):
        if not Path(p).is_file():
            raise InvalidInputError(f"{p}: no such file")
    texts = {}
    for rec in _jsonl(Path(queries)):
        if "_id" not in rec or not isinstance(rec.get("text"), str):
            raise InvalidInputError(f'{queries}: every line needs an "_id" and a "text"')
        texts[str(rec["_id"])] = rec["text"]
    return texts, load_qrels(qrels)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
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
