"""BEIR-format datasets: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from ..errors import InvalidInputError
from ..types import Document


@dataclass
class BeirDataset:
    """A loaded BEIR dataset. Document text is ``title + "\\n" + text``, as BEIR evaluates it."""

    name: str
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    def documents(self) -> list[Document]:
        return list(self.corpus.values())

    def judged_queries(self) -> dict[str, str]:
        """Queries that have at least one judgement in the loaded split."""
        return {qid: q for qid, q in self.queries.items() if qid in self.qrels}

    def sample_queries(self, n_queries: int, *, seed: int = 0) -> BeirDataset:
        """Keep `n_queries` random judged queries (and their qrels); the corpus is unchanged.
        Combine with `subset` for small, fast evaluation sets."""
        qids = sorted(self.judged_queries())
        random.Random(seed).shuffle(qids)
        keep = set(qids[:n_queries])
        return BeirDataset(
            name=f"{self.name}[q{len(keep)}]",
            corpus=self.corpus,
            queries={q: t for q, t in self.queries.items() if q in keep},
            qrels={q: r for q, r in self.qrels.items() if q in keep},
        )

    def subset(self, n_docs: int, *, seed: int = 0) -> BeirDataset:
        """All documents judged relevant for the loaded split plus random others, up to
        `n_docs` (the positives are always kept, so the subset may be larger)."""
        positives = {d for rel in self.qrels.values() for d, r in rel.items() if r > 0}
        positives &= set(self.corpus)
        others = sorted(set(self.corpus) - positives)
        random.Random(seed).shuffle(others)
        keep = sorted(positives) + others[: max(0, n_docs - len(positives))]
        keep_set = set(keep)
        return BeirDataset(
            name=f"{self.name}[{len(keep)}]",
            corpus={d: self.corpus[d] for d in self.corpus if d in keep_set},
            queries=self.queries,
            qrels=self.qrels,
        )


def _jsonl(path: Path) -> Iterator[dict]:
    """JSON objects, one per non-blank line; bad bytes, bad JSON or a non-object line is an
    `InvalidInputError` naming the file and line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1]
                raise InvalidInputError(
                    f"{path}:{lineno}: not UTF-8 text (byte {exc.start}: {bad!r})"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{lineno}: invalid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise InvalidInputError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            yield rec


def load_qrels(path: str | PathLike[str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for row in reader:
            if not row or row[0] in ("query-id", "query_id"):
                continue
            if len(row) < 3:
                raise InvalidInputError(
                    f"{path}: qrels rows need query-id, corpus-id, score: {row}"
                )
            qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def load_beir(path: str | PathLike[str], split: str = "test") -> BeirDataset:
    """Load a BEIR dataset directory; `split` picks ``qrels/<split>.tsv`` (missing -> no qrels)."""
    root = Path(path)
    if not (root / "corpus.jsonl").exists():
        raise InvalidInputError(f"{root} is not a BEIR dataset (no corpus.jsonl)")
    corpus: dict[str, Document] = {}
    for rec in _jsonl(root / "corpus.jsonl"):
        did = str(rec["_id"])
        title = (rec.get("title") or "").strip()
        text = (rec.get("text") or "").strip()
        body = f"{title}\n{text}" if title else text
        meta = {"title": title, **(rec.get("metadata") or {})}
        corpus[did] = Document(text=body, id=did, metadata=meta)
    queries = {str(r["_id"]): str(r["text"]) for r in _jsonl(root / "queries.jsonl")}
    qpath = root / "qrels" / f"{split}.tsv"
    qrels = load_qrels(qpath) if qpath.exists() else {}
    return BeirDataset(name=root.name, corpus=corpus, queries=queries, qrels=qrels)
