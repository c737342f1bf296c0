"""`StoreRetriever`: the protocol's plumbing, shared by every retriever in the library.

A subclass supplies a model-specific core — what to store per chunk (`_specs`, `_encode_chunks`),
how to score (`_score`), and how to rebuild in-memory indexes from the store (`_on_open`). The base
class owns everything users touch: document normalisation, chunking, duplicate handling, batched and
resumable indexing, filters as candidate masks, hits, persistence and reloading.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import inspect
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from tqdm.auto import tqdm

from ..chunking import Chunker, Spanner, check_unique_ids
from ..errors import (
    DuplicateIdError,
    EmptyCorpusError,
    IdCollisionError,
    InvalidInputError,
    RetrievalError,
    StageMismatchError,
    StoreCorruptedError,
    StoreError,
)
from ..protocol import Filter, check_k, check_queries, check_query
from ..store import EncodedChunkStore, TensorSpec
from ..training import FitConfig, FitReport, LabeledQueries
from ..types import Chunk, Document, DocumentLike, Hit, as_documents
from .options import SearchOptions

#: ``chunk_size=MODEL_LIMIT``: chunks as long as the model reads in one pass (``None``: whole
#: documents, an int: that many tokens); the same meaning in every retriever
MODEL_LIMIT = "model"

#: Rows and scores for one query, best first.
Ranked = tuple[torch.Tensor, torch.Tensor]


def _tempdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="intrinsic-retrieval-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class StoreRetriever(abc.ABC):
    """Base class of every retriever: implements `intrinsic_retrieval.Retriever` on an
    `EncodedChunkStore`.

    Subclasses set their model up, then call ``super().__init__(...)``. Constructor arguments
    that rebuild the retriever must be returned by `_init_args` (JSON-serialisable); they are
    recorded in the store manifest so `load(path)` can reconstruct the retriever.
    """

    #: registry name, also recorded in the manifest
    name: ClassVar[str] = ""
    #: settings class of a retriever that trains (`fit`); None for one that does not
    fit_config: ClassVar[type[FitConfig] | None] = None
    #: `fit` keywords that are not settings (objects such as a query generator)
    fit_extras: ClassVar[tuple[str, ...]] = ()
    #: `fit()` without labeled queries trains on generated ones (False: the retriever has its
    #: own label-free recipe, as generative retrieval's indexing examples)
    learns_from_queries: ClassVar[bool] = True
    #: constructor options recorded under an older name in existing stores: {old: new}
    renamed_options: ClassVar[dict[str, str]] = {}
    #: this retriever's query-time options
    search_options_class: ClassVar[type[SearchOptions]] = SearchOptions
    #: the index can be built in parts and combined (`intrinsic_retrieval.distributed`): every
    #: row is encoded on its own, and nothing but rows (and identical aux entries) is stored
    partitionable: ClassVar[bool] = True
    #: what a row stores depends on its position in the whole index (in-context codes): a store
    #: part must be told the rows before it (`set_row_offset`)
    row_offset_matters: ClassVar[bool] = False
    #: a chunk's score depends only on the query and that chunk (no corpus statistics, no
    #: attention across chunks), so per-part top-k lists merge into the single store's exactly
    local_scores: ClassVar[bool] = False
    #: the retriever scores with corpus statistics that store parts can share
    #: (`corpus_statistics`, `merge_statistics`, ``search_batch(statistics=...)``)
    shares_statistics: ClassVar[bool] = False
    search_options: SearchOptions

    def __init__(
        self,
        *,
        path: str | PathLike[str] | None = None,
        chunk_size: int | str | None = 256,
        chunk_overlap: int = 32,
        index_batch_size: int = 512,
        show_progress: bool = True,
    ) -> None:
        if chunk_size == MODEL_LIMIT:
            chunk_size = self._model_chunk_size()
        elif chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise InvalidInputError(
                f"chunk_size must be an int >= 1, {MODEL_LIMIT!r} (what the model reads in one "
                f"pass) or None (whole documents), got {chunk_size!r}"
            )
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.index_batch_size = int(index_batch_size)
        self.show_progress = show_progress
        if not hasattr(self, "search_options"):  # retrievers with no query-time options
            self._set_search_options(self.search_options_class())
        #: Serialises model use; integrations take it around calls from worker threads.
        self.lock = threading.RLock()
        self.chunker = Chunker(self._spanner(), chunk_size, chunk_overlap)
        root = Path(path) if path is not None else _tempdir() / "store"
        self._store = self._open_or_create(root)
        self._on_open()

    # ------------------------------------------------------------------ subclass hooks
    @abc.abstractmethod
    def _specs(self) -> dict[str, TensorSpec]:
        """Per-row tensors this retriever stores."""

    @abc.abstractmethod
    def _fingerprint(self) -> str:
        """Fingerprint of everything that determines the stored tensors (model, tokenizer, ...)."""

    @abc.abstractmethod
    def _init_args(self) -> dict[str, Any]:
        """JSON-serialisable constructor kwargs that rebuild this retriever (path excluded)."""

    @abc.abstractmethod
    def _encode_chunks(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        """Tensors for new chunks, keyed like `_specs`."""

    @abc.abstractmethod
    def _score(self, queries: Sequence[str], candidates: torch.Tensor, k: int) -> list[Ranked]:
        """Top-`k` rows among `candidates` (bool mask over store rows) for each query, best
        first. Rows outside `candidates` must never be returned."""

    def _model_chunk_size(self) -> int | None:
        """Tokens of document text the model reads in one pass (``chunk_size="model"``); None
        for a retriever with no such limit (whole documents)."""
        return None

    def _spanner(self) -> Spanner:
        """Token boundaries for chunking; neural retrievers return their tokenizer's spans."""
        from ..chunking import word_spans

        return word_spans

    def _on_open(self) -> None:
        """Rebuild in-memory indexes from the store (called at open and after compaction)."""
        return None

    def _on_rows_added(self, rows: range, tensors: Mapping[str, Any]) -> None:
        """Update in-memory indexes after an append."""
        return None

    def _on_rows_deleted(self, rows: Sequence[int]) -> None:
        """Update in-memory indexes after tombstoning."""
        return None

    def _before_save(self) -> None:
        """Persist in-memory state (e.g. trained heads) into the store before it is copied."""
        return None

    def _fit_defaults(self) -> FitConfig:
        """This retriever's default fit settings (a retriever that trains may take them from
        its constructor)."""
        assert self.fit_config is not None
        return self.fit_config()

    def _fit(self, queries: Any, qrels: Any, config: Any, **extras: Any) -> FitReport:
        """Train on the stored chunks (retrievers that train implement it)."""
        raise InvalidInputError(f"the {self.name} retriever has nothing to train")

    # ------------------------------------------------------------------ training
    def fit_settings(self, config: FitConfig | None = None, **options: Any) -> FitConfig:
        """`config` (default: this retriever's defaults) with `options` replaced, validated."""
        if self.fit_config is None:
            raise InvalidInputError(f"the {self.name} retriever has nothing to train")
        return self.fit_config.from_options(
            config if config is not None else self._fit_defaults(), **options
        )

    def fit(
        self,
        queries: LabeledQueries | None = None,
        qrels: Any = None,
        *,
        config: FitConfig | None = None,
        **options: Any,
    ) -> FitReport:
        """Train this retriever on its stored chunks; the same call for every retriever that
        trains.

        `queries`/`qrels`: labeled queries in any `training.LabeledQueries` shape (BEIR
        ``{qid: text}`` + ``{qid: {doc_id: relevance}}``, parallel lists, ``{query: doc ids}``
        or ``(query, doc id)`` pairs); positives are document or chunk ids. Without them, a
        retriever that learns from queries trains on `queries_per_doc` pseudo-queries per
        document written by `query_generator` (default: `LMQueryGenerator("smollm2")`), cached
        in the store. `config`: the retriever's `fit_config` settings; `options` replace single
        fields (``epochs=2``, ``max_steps=100``, ``checkpoint_dir=...``, ``time_limit_s=...``).
        Runs with the same data and settings resume from `checkpoint_dir`. Returns a
        `FitReport`.
        """
        extras = {k: options.pop(k) for k in list(options) if k in self.fit_extras}
        generator = options.pop("query_generator", None)
        per_doc = options.pop("queries_per_doc", 3)
        cfg = self.fit_settings(config, **options)
        if len(self) == 0:
            raise EmptyCorpusError("index documents before calling fit()")
        with self.lock:
            if queries is None and self.learns_from_queries:
                queries, qrels = self.generated_labels(generator, per_doc)
            return self._fit(queries, qrels, cfg, **extras)

    def generated_labels(
        self, generator: Any = None, per_doc: int = 3
    ) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """Label-free training data: `per_doc` queries per live document written by `generator`
        (default `LMQueryGenerator("smollm2")`), read from the store's cache where written
        before; each query's positive is its document."""
        from ..training.queries import LMQueryGenerator, cached_queries

        if not isinstance(per_doc, int) or isinstance(per_doc, bool) or per_doc < 1:
            raise InvalidInputError(f"queries_per_doc must be an int >= 1, got {per_doc!r}")
        gen = (
            generator
            if generator is not None
            else LMQueryGenerator("smollm2", show_progress=self.show_progress)
        )
        docs = [(str(d.id), d.text) for d in self.documents()]
        written = cached_queries(self._store, docs, gen, per_doc)
        queries: dict[str, str] = {}
        qrels: dict[str, dict[str, int]] = {}
        for doc_id, qs in written.items():
            for i, q in enumerate(qs):
                qid = f"generated:{doc_id}:{i}"
                queries[qid], qrels[qid] = q, {doc_id: 1}
        if not queries:
            raise InvalidInputError("the query generator wrote no usable query for any document")
        return queries, qrels

    def document_ids(self) -> set[str]:
        """Ids of the live documents."""
        return self._store.document_ids()

    def existing_document_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of `ids` are live documents here."""
        return self._store.existing_document_ids(ids)

    def documents(self) -> list[Document]:
        """Live documents reassembled from their chunks (chunk offsets put overlaps back)."""
        parts: dict[str, list[Chunk]] = {}
        for _, c in self._store.iter_chunks():
            parts.setdefault(c.document_id, []).append(c)
        docs = []
        for doc_id, chunks in parts.items():
            chunks.sort(key=lambda c: c.start)
            text, end = "", None
            for c in chunks:
                if end is None or c.start >= end:
                    text += ("" if end is None else " ") + c.text
                else:
                    text += c.text[end - c.start :]
                end = max(end or 0, c.end)
            docs.append(Document(text, doc_id, dict(chunks[0].metadata)))
        return docs

    def reindex(self, documents: Sequence[Document] | None = None) -> None:
        """Rebuild the store for the current model (after training changed what it writes) and
        index `documents` (default: the live ones) again.

        The new store is built beside the old one and swapped in by renaming, so an interrupted
        rebuild leaves the old store as it was (a crash between the two renames leaves both,
        as ``.<name>.old`` and ``.<name>.reindex`` beside the path)."""
        docs = self.documents() if documents is None else list(documents)
        with self.lock:
            old = self._store
            root = Path(old.path)
            fresh = root.with_name(f".{root.name}.reindex")
            shutil.rmtree(fresh, ignore_errors=True)
            self._store = EncodedChunkStore.create(
                fresh, fingerprint=self._fingerprint(), specs=self._specs(),
                config=self._manifest_config(),
            )  # fmt: skip
            try:
                self._on_open()
                if docs:
                    self._ingest(docs)
            except BaseException:
                self._store.close()
                shutil.rmtree(fresh, ignore_errors=True)
                self._store = old
                self._on_open()
                raise
            self._store.close()
            old.close()
            retired = root.with_name(f".{root.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(root, retired)
            os.replace(fresh, root)
            shutil.rmtree(retired, ignore_errors=True)
            self._store = EncodedChunkStore.open(root, fingerprint=self._fingerprint())
            self._on_open()

    # ------------------------------------------------------------------ measurements
    def _byte_parts(self) -> dict[str, float]:
        """Retriever-specific split of the stored bytes, summed over all rows (subclasses)."""
        return {}

    def bytes_per_chunk(self) -> dict[str, float]:
        """Measured bytes per stored row (deleted rows count until `compact`): `stored` = all
        shard bytes (tensors, offsets and safetensors headers), plus the retriever's own split
        (INTRA: `states`, `pooled`; in-context: `kv`) and `tokens` where it stores tokens."""
        n = self._store.num_rows
        parts = self._byte_parts() if n else {}
        out = {"stored": self._store.shard_nbytes() / n if n else 0.0}
        out.update({k: (v / n if k != "tokens" else v) for k, v in parts.items()})
        return out

    def bytes_per_document(self) -> float:
        """Everything the index keeps on disk (shards, SQLite, trained state such as a DSI
        model or an INTRA head) per stored document; deleted ones count until `compact`."""
        docs = {c.document_id for _, c in self._store.iter_chunks(live_only=False)}
        return self._store.nbytes() / len(docs) if docs else 0.0

    @property
    def fingerprint(self) -> str:
        """The model fingerprint the store holds this retriever to."""
        return self._fingerprint()

    # ------------------------------------------------------------------ query-time options
    def _check_search_options(self, options: Any) -> None:
        """Checks of query-time options that need the model or the store (subclasses)."""
        return None

    def _apply_search_options(self, options: Any) -> None:
        """Make `options` current: each field becomes an attribute of the same name (what the
        scoring code reads); subclasses derive further state (resolved lists, caches)."""
        for name, value in options.to_json().items():
            setattr(self, name, value)

    def _set_search_options(self, options: SearchOptions) -> None:
        self._check_search_options(options)
        self.search_options = options
        self._apply_search_options(options)

    def configure(self, **options: Any) -> None:
        """Change query-time options (see `search_options_class`) without touching the index;
        unknown or index-time options raise `InvalidInputError` and change nothing."""
        new = self.search_options.replace(**options)
        with self.lock:
            self._set_search_options(new)

    @contextlib.contextmanager
    def using(self, **options: Any) -> Iterator[Self]:
        """``with r.using(mode="encoder"): ...``: query-time options for a block only."""
        old = self.search_options
        self.configure(**options)
        try:
            yield self
        finally:
            with self.lock:
                self._set_search_options(old)

    # ------------------------------------------------------------------ store handling
    def _manifest_config(self) -> dict[str, Any]:
        return {"retriever": self.name, "init": self.init_args()}

    def init_args(self) -> dict[str, Any]:
        """Constructor kwargs recorded in the manifest (query-time options and the common
        chunking ones included)."""
        return {
            **self._init_args(),
            **self.search_options.to_json(),
            "chunk_size": self.chunk_size,
            "chunk_overlap": self.chunk_overlap,
            "index_batch_size": self.index_batch_size,
        }

    @classmethod
    def check_combined(cls, store: EncodedChunkStore) -> None:
        """Refuse a store combined from parts whose rows do not fit together (raise a
        `StoreError`); called before the combined store is put in place."""
        del store  # rows encoded on their own always fit

    def set_row_offset(self, offset: int) -> None:
        """This store is a part of a larger index, after `offset` rows of other parts
        (`intrinsic_retrieval.distributed`); retrievers whose rows depend on their position
        start there. A no-op for the rest."""
        del offset  # nothing these rows store depends on where they stand

    def _open_or_create(self, root: Path) -> EncodedChunkStore:
        fp = self._fingerprint()
        if (root / "manifest.json").exists():
            store = EncodedChunkStore.open(root, fingerprint=fp)
            got = store.config.get("retriever")
            if got != self.name:
                store.close()
                raise StoreError(f"store {root} was built by retriever {got!r}, not {self.name!r}")
            want = self._specs()
            if store.specs != want:  # same model, yet not the tensors it writes: damage
                store.close()
                raise StoreCorruptedError(
                    root / "manifest.json",
                    f"tensor table {sorted(store.specs)} is not what {type(self).__name__} "
                    f"stores ({sorted(want)})",
                )
            return store
        return EncodedChunkStore.create(
            root, fingerprint=fp, specs=self._specs(), config=self._manifest_config()
        )

    @property
    def store(self) -> EncodedChunkStore:
        return self._store

    @property
    def path(self) -> Path:
        return self._store.path

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(chunks={len(self)}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ indexing
    def add(
        self,
        documents: Iterable[DocumentLike],
        *,
        on_duplicate: str = "error",
    ) -> list[str]:
        """Chunk, encode and store documents; returns the ids of the documents added.

        Work is committed in batches of whole documents, so an interrupted `add` keeps what it
        finished: calling it again with ``on_duplicate="skip"`` resumes where it stopped.
        """
        if on_duplicate not in ("error", "skip"):
            raise InvalidInputError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        docs = as_documents(documents)
        if not docs:
            raise EmptyCorpusError("no documents to add")
        check_unique_ids(d.id for d in docs)
        for d in docs:
            if not d.text.strip():
                raise InvalidInputError(f"document {d.id!r} has empty text")
        existing = self._store.existing_document_ids(d.id for d in docs if d.id is not None)
        if existing and on_duplicate == "error":
            raise DuplicateIdError(sorted(existing))
        docs = [d for d in docs if d.id not in existing]
        if not docs:
            return []
        # a document id that is already another document's chunk id: refuse before writing
        # anything (the store refuses every such collision batch by batch as well)
        taken = self._store.rows_for_ids([str(d.id) for d in docs])
        clash = [(c.id, "a document id here, a chunk id in the store")
                 for c in self._store.get(taken)
                 if c.id in {d.id for d in docs} and c.document_id != c.id]  # fmt: skip
        if clash:
            raise IdCollisionError(clash)
        with self.lock:
            self._ingest(docs)
        return [str(d.id) for d in docs]

    def _batches(self, docs: Sequence[Document]) -> Iterator[list[Chunk]]:
        batch: list[Chunk] = []
        for doc in docs:
            batch.extend(self.chunker.split(doc))
            if len(batch) >= self.index_batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _ingest(self, docs: Sequence[Document]) -> None:
        bar = tqdm(
            total=len(docs),
            desc=f"indexing ({self.name})",
            unit="doc",
            disable=not self.show_progress,
        )
        with bar:
            for chunks in self._batches(docs):
                tensors = self._encode_chunks(chunks)
                rows = self._store.append(chunks, tensors)
                self._on_rows_added(rows, tensors)
                bar.update(len({c.document_id for c in chunks}))

    def delete(self, ids: Iterable[str]) -> int:
        """Tombstone documents (document id) or single chunks (chunk id); returns chunks removed."""
        if isinstance(ids, str):
            ids = [ids]
        if ids is None or not isinstance(ids, Iterable):
            raise InvalidInputError(f"ids must be an iterable of ids, got {type(ids).__name__}")
        with self.lock:
            rows = self._store.delete(ids)
            if rows:
                self._on_rows_deleted(rows)
        return len(rows)

    def compact(self) -> None:
        """Drop tombstoned rows from disk and rebuild in-memory indexes."""
        with self.lock:
            self._store.compact()
            self._on_open()

    # ------------------------------------------------------------------ search
    def check_query(self, query: Any) -> str:
        return check_query(query)

    def _warn_truncated(self, what: str, n_tokens: int, limit: int) -> None:
        warnings.warn(
            f"{what} has {n_tokens} tokens; truncated to the model limit of {limit}",
            stacklevel=3,
        )

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        return self.search_batch([query], k=k, filter=filter)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 10,
        filter: Filter | None = None,
        *,
        statistics: Mapping[str, Any] | None = None,
    ) -> list[list[Hit]]:
        """Top-`k` hits per query. `statistics` (retrievers whose scores use corpus statistics,
        as BM25's IDF): score as if the corpus were the one these statistics describe, the sum of
        every store part's `corpus_statistics` (distributed search over parts)."""
        queries, k = check_queries(queries, k, self.check_query)
        if not queries:
            return []
        candidates = self._store.candidate_mask(filter)
        n = int(candidates.sum())
        if n == 0:
            return [[] for _ in queries]
        with self.lock:
            if statistics is None:
                ranked = self._score(queries, candidates, min(k, n))
            else:
                ranked = self._score_with(queries, candidates, min(k, n), statistics)
        return [self._hits(rows, scores, candidates) for rows, scores in ranked]

    def distributed_scoring(self) -> str:
        """How searches of store parts combine into this store's ranking
        (`intrinsic_retrieval.distributed.DistributedRetriever`): "local" (merge the parts'
        top-k), "statistics" (sum the parts' corpus statistics first), "context" (INTRA: a
        context gathered from every part conditions one query pass) or "none" (not mergeable)."""
        if self.local_scores:
            return "local"
        return "statistics" if self.shares_statistics else "none"

    def corpus_statistics(self, queries: Sequence[str]) -> dict[str, Any]:
        """This store's share of the corpus statistics `queries` are scored with (JSON-able;
        summed over store parts by `merge_statistics`)."""
        raise InvalidInputError(f"{self.name} scores use no corpus statistics")

    @classmethod
    def merge_statistics(cls, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The statistics of a corpus made of the parts whose `corpus_statistics` are given."""
        raise InvalidInputError(f"{cls.name} scores use no corpus statistics")

    def _score_with(
        self,
        queries: Sequence[str],
        candidates: torch.Tensor,
        k: int,
        statistics: Mapping[str, Any],
    ) -> list[Ranked]:
        raise InvalidInputError(f"{self.name} scores use no corpus statistics")

    def rerank(
        self,
        query: str,
        candidates: Sequence[str | Hit],
        k: int | None = 10,
        filter: Filter | None = None,
    ) -> list[Hit]:
        """Second stage: score only `candidates` (a first stage's ranking, best first) and
        return the best `k` of them (None: all); the rest of the store is never read.

        A candidate is a chunk or document id, or a `Hit` from another retriever: it stands
        for that chunk when this store holds a chunk with its id and text (the stages chunk
        alike), else for all chunks of its document. A candidate this store lacks raises
        `StageMismatchError` naming it; `filter` masks candidates as in `search`."""
        query = self.check_query(query)
        if k is not None:
            check_k(k)
        if isinstance(candidates, str | Hit) or not isinstance(candidates, Iterable):
            raise InvalidInputError("candidates must be a list of ids or hits")
        items = list(candidates)
        if not all(isinstance(c, str | Hit) for c in items):
            raise InvalidInputError("candidates must be ids (str) or Hit objects")
        groups = self._candidate_rows(items)
        mask = self._store.candidate_mask(filter)
        groups = [[r for r in g if bool(mask[r])] for g in groups]
        rows = list(dict.fromkeys(r for g in groups for r in g))
        if not rows:
            return []
        candidates_mask = torch.zeros_like(mask)
        candidates_mask[rows] = True
        heads = torch.tensor(list(dict.fromkeys(g[0] for g in groups if g)), dtype=torch.long)
        with self.lock:
            n = len(rows)
            ranked = self._rerank(query, heads, candidates_mask, n if k is None else min(k, n))
        return self._hits(*ranked, candidates_mask)

    def _candidate_rows(self, items: Sequence[str | Hit]) -> list[list[int]]:
        """The store rows each candidate stands for (see `rerank`), in order."""
        keys = [c if isinstance(c, str) else c.chunk_id for c in items]
        found = self._store.rows_by_id(keys + [c.document_id for c in items if isinstance(c, Hit)])
        chunk_rows = {key: rows for key, rows in found.items() if len(rows) == 1}
        texts = {}
        same_id = [
            chunk_rows[c.chunk_id][0]
            for c in items
            if isinstance(c, Hit) and c.chunk_id in chunk_rows
        ]
        if same_id:
            texts = {r: ch for r, ch in zip(same_id, self._store.get(same_id), strict=True)}
        groups: list[list[int]] = []
        missing: list[str] = []
        for key, c in zip(keys, items, strict=True):
            rows = found.get(key)
            if isinstance(c, Hit):
                row = chunk_rows.get(c.chunk_id, [None])[0]
                chunk = texts.get(row) if row is not None else None
                same = (
                    chunk is not None
                    and chunk.id == c.chunk_id
                    and chunk.document_id == c.document_id
                    and chunk.text == c.text
                )
                rows = [row] if same else found.get(c.document_id)
            if rows is None:
                missing.append(key)
            else:
                groups.append(rows)
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise StageMismatchError(
                f"{len(missing)} candidate(s) are not in this {self.name} index at "
                f"{self.path}: {shown}{' ...' if len(missing) > 5 else ''}; index the same "
                "documents in every stage",
                missing,
            )
        return groups

    def _rerank(self, query: str, heads: torch.Tensor, candidates: torch.Tensor, k: int) -> Ranked:
        """Top-`k` of `candidates` (mask) for one query as a second stage; `heads` holds one row
        per candidate in the first stage's order (a document: its first chunk), from which
        INTRA takes its initial context."""
        return self._score([query], candidates, k)[0]

    def _hits(
        self, rows: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor
    ) -> list[Hit]:
        rows_l = [int(r) for r in rows.tolist()]
        if any(not bool(candidates[r]) for r in rows_l):  # a scorer bug must never leak rows
            raise RuntimeError(f"{type(self).__name__}._score returned a non-candidate row")
        chunks = self._store.get(rows_l)
        return [
            Hit(
                chunk_id=c.id,
                document_id=c.document_id,
                text=c.text,
                score=float(s),
                rank=i + 1,
                metadata=dict(c.metadata),
            )
            for i, (c, s) in enumerate(zip(chunks, scores.tolist(), strict=True))
        ]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | PathLike[str]) -> None:
        """Write a complete copy of the index to `path` (atomically replaced if it exists)."""
        with self.lock:
            self._before_save()
            self._store.copy_to(path)

    @classmethod
    def load(cls, path: str | PathLike[str], **overrides: Any) -> Self:
        """Reopen a saved index in place. `overrides` replace recorded constructor args
        (e.g. ``device="cuda"`` or a local model path); the model fingerprint must still match."""
        manifest = EncodedChunkStore.read_manifest(path)
        config = manifest.get("config", {})
        name = config.get("retriever")
        target: type[StoreRetriever] = cls
        if cls is StoreRetriever or name != cls.name:
            from . import retriever_class

            target = retriever_class(name)
            if not issubclass(target, cls):
                raise StoreError(f"store at {path} holds a {name!r} index, not {cls.name!r}")
        init = config.get("init", {})
        if not isinstance(init, Mapping):
            raise StoreCorruptedError(
                Path(path) / "manifest.json", "the recorded constructor options are not an object"
            )
        init = {target.renamed_options.get(k, k): v for k, v in init.items()}
        kwargs = {**init, **overrides, "path": path}
        try:
            return target(**kwargs)  # type: ignore[return-value]
        except RetrievalError:
            raise
        except (TypeError, ValueError) as exc:  # an unknown option, or a value of the wrong type
            bad = sorted(set(init) - set(inspect.signature(target).parameters))
            raise StoreCorruptedError(
                Path(path) / "manifest.json",
                f"recorded constructor options {bad or ''} do not fit {target.__name__} "
                f"({exc}); pass the right ones as overrides to load()",
            ) from None

    def close(self) -> None:
        self._store.close()
