"""BM25 baseline (bm25s) behind the common protocol and store.

The store keeps each chunk's analysed terms as 64-bit hashes (a varlen int64 tensor), so it is
append-only with no vocabulary to rewrite; the bm25s index is rebuilt from them at open and after
changes, which takes well under a second for corpora of SciFact's size.

Store parts searched as one corpus (`intrinsic_retrieval.distributed`) share their statistics:
each part reports its row count, total length and the document frequencies of the query terms
(`corpus_statistics`), the sums go back to every part, and each scores its rows with them
(`search_batch(statistics=...)`) through bm25s's own IDF and term-frequency formulas, from a
term-frequency matrix of its rows. The merged top-k is then the single store's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import bm25s
import numpy as np
import scipy.sparse as sp
import torch
from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

from ..errors import InvalidInputError
from ..store import TensorSpec
from ..types import Chunk
from .base import Ranked, StoreRetriever

_ANALYSER_VERSION = 1


class BM25Retriever(StoreRetriever):
    """Lexical BM25 (Lucene variant) with English stemming and stop words by default.

    Scores are BM25 sums; chunks containing no query term are not returned when other chunks
    match, but may fill the tail when fewer than k chunks match (score 0).
    """

    name = "bm25"
    shares_statistics = True
    #: variants scored from shared statistics (BM25L and BM25+ add a per-term non-occurrence
    #: score that bm25s folds into its index; not supported there)
    STATISTICS_METHODS = ("lucene", "robertson", "atire")

    def __init__(
        self,
        *,
        k1: float = 0.9,
        b: float = 0.4,
        method: str = "lucene",
        stemmer: str | None = "english",
        stopwords: str | None = "en",
        path: str | None = None,
        chunk_size: int | None = 512,
        chunk_overlap: int = 64,
        index_batch_size: int = 4096,
        show_progress: bool = True,
    ) -> None:
        self.k1, self.b, self.method = float(k1), float(b), method
        self.stemmer_name, self.stopwords = stemmer, stopwords
        self._stemmer = None
        if stemmer:
            import Stemmer  # PyStemmer

            self._stemmer = Stemmer.Stemmer(stemmer)
        self._hash_cache: dict[str, int] = {}
        self._bm25: bm25s.BM25 | None = None
        self._tf: tuple[sp.csc_matrix, np.ndarray, np.ndarray] | None = None
        self._dirty = True
        super().__init__(
            path=path,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            index_batch_size=index_batch_size,
            show_progress=show_progress,
        )

    # ------------------------------------------------------------------ hooks
    def _specs(self) -> dict[str, TensorSpec]:
        return {"terms": TensorSpec("varlen", "int64", ())}

    def _fingerprint(self) -> str:
        analyser = (
            f"bm25s-analyser-v{_ANALYSER_VERSION}|stem={self.stemmer_name}|stop={self.stopwords}"
        )
        return hashlib.sha256(analyser.encode()).hexdigest()

    def _init_args(self) -> dict[str, Any]:
        return {
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "stemmer": self.stemmer_name,
            "stopwords": self.stopwords,
        }

    def _analyse(self, texts: Sequence[str]) -> list[list[str]]:
        return bm25s.tokenize(
            list(texts),
            stopwords=self.stopwords,
            stemmer=self._stemmer,
            return_ids=False,
            show_progress=False,
        )

    def _hash(self, term: str) -> int:
        h = self._hash_cache.get(term)
        if h is None:
            h = int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "little")
            h = h - (1 << 64) if h >= (1 << 63) else h  # fit int64
            self._hash_cache[term] = h
        return h

    def _encode_chunks(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        terms = self._analyse([c.text for c in chunks])
        return {
            "terms": [
                torch.tensor([self._hash(t) for t in doc], dtype=torch.int64) for doc in terms
            ]
        }

    def _on_open(self) -> None:
        self._dirty = True
        self._tf = None

    def _on_rows_added(self, rows: range, tensors: Mapping[str, Any]) -> None:
        self._dirty = True
        self._tf = None

    def _rebuild(self) -> None:
        """Index every stored row (tombstones are masked at query time, not removed, so IDF
        reflects them until `compact()`)."""
        store = self.store
        n = store.num_rows
        corpus: list[list[str]] = []
        if n:
            flat, offsets = store.varlen_all("terms")
            tokens = np.char.mod("%x", flat.numpy().view(np.uint64)) if len(flat) else np.array([])
            bounds = offsets.tolist()
            corpus = [tokens[bounds[i] : bounds[i + 1]].tolist() for i in range(n)]
        bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        bm25.index(corpus, show_progress=False)
        self._bm25 = bm25
        self._dirty = False

    def _term_matrix(self) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
        """(rows x terms term frequencies, the sorted term hashes naming its columns, row
        lengths) of every stored row, tombstones included as in the bm25s index."""
        if self._tf is None:
            n = self.store.num_rows
            flat, offsets = self.store.varlen_all("terms") if n else (torch.zeros(0), None)
            hashes = flat.numpy().astype(np.int64)
            lengths = np.diff(offsets.numpy()) if offsets is not None else np.zeros(0, np.int64)
            vocab, cols = np.unique(hashes, return_inverse=True)
            rows = np.repeat(np.arange(n), lengths)
            tf = sp.csc_matrix(
                (np.ones(len(hashes), np.float32), (rows, cols)), shape=(n, len(vocab))
            )
            tf.sum_duplicates()
            self._tf = (tf, vocab, lengths.astype(np.float64))
        return self._tf

    def _hashes(self, query: str) -> list[int]:
        return [self._hash(t) for t in self._analyse([query])[0]]

    def distributed_scoring(self) -> str:
        return "statistics" if self.method in self.STATISTICS_METHODS else "none"

    def corpus_statistics(self, queries: Sequence[str]) -> dict[str, Any]:
        """Rows, total length and each query term's document frequency in this store."""
        tf, vocab, lengths = self._term_matrix()
        terms = sorted({h for q in queries for h in self._hashes(q)})
        pos = np.searchsorted(vocab, terms)
        df = {}
        for h, i in zip(terms, pos.tolist(), strict=True):
            found = i < len(vocab) and vocab[i] == h
            df[str(h)] = int(tf.indptr[i + 1] - tf.indptr[i]) if found else 0
        return {"rows": int(tf.shape[0]), "tokens": float(lengths.sum()), "df": df}

    @classmethod
    def merge_statistics(cls, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        df: dict[str, int] = {}
        for p in parts:
            for h, n in p["df"].items():
                df[h] = df.get(h, 0) + int(n)
        rows = sum(int(p["rows"]) for p in parts)
        return {"rows": rows, "tokens": sum(float(p["tokens"]) for p in parts), "df": df}

    def _score_with(
        self,
        queries: Sequence[str],
        candidates: torch.Tensor,
        k: int,
        statistics: Mapping[str, Any],
    ) -> list[Ranked]:
        if self.method not in self.STATISTICS_METHODS:
            raise InvalidInputError(
                f"BM25 method {self.method!r} cannot be scored from shared statistics; use one "
                f"of {self.STATISTICS_METHODS}"
            )
        tf, vocab, lengths = self._term_matrix()
        n_all = int(statistics["rows"])
        l_avg = np.float64(statistics["tokens"]) / max(1, n_all)  # float64, as bm25s
        idf_fn, tfc_fn = _select_idf_scorer(self.method), _select_tfc_scorer(self.method)
        mask = torch.from_numpy(candidates.numpy())
        out: list[Ranked] = []
        for q in queries:
            scores = np.zeros(tf.shape[0], dtype=np.float32)
            for h in self._hashes(q):
                i = int(np.searchsorted(vocab, h))
                if i >= len(vocab) or vocab[i] != h:
                    continue
                df = int(statistics["df"].get(str(h), 0))
                if df == 0:
                    raise InvalidInputError(
                        "the statistics give no document frequency for a term this store "
                        "holds: they were not computed for these queries or this corpus"
                    )
                rows = tf.indices[tf.indptr[i] : tf.indptr[i + 1]]
                freqs = tf.data[tf.indptr[i] : tf.indptr[i + 1]]
                idf = np.float32(idf_fn(df, n_all))  # bm25s keeps a float32 IDF array
                tfc = tfc_fn(freqs, lengths[rows], l_avg, self.k1, self.b)  # float64
                scores[rows] += (idf * tfc).astype(np.float32)  # and float32 scores
            t = torch.from_numpy(scores).masked_fill(~mask, float("-inf"))
            top = torch.topk(t, k)
            out.append((top.indices, top.values))
        return out

    def _query_terms(self, query: str) -> list[str]:
        assert self._bm25 is not None
        vocab = self._bm25.vocab_dict
        terms = [format(h & ((1 << 64) - 1), "x") for h in self._hashes(query)]
        return [t for t in terms if t in vocab]

    def _score(self, queries: Sequence[str], candidates: torch.Tensor, k: int) -> list[Ranked]:
        if self._dirty or self._bm25 is None:
            self._rebuild()
        assert self._bm25 is not None
        mask = candidates.numpy()
        out: list[Ranked] = []
        for q in queries:
            terms = self._query_terms(q)
            if terms:
                scores = torch.from_numpy(
                    np.asarray(self._bm25.get_scores(terms), dtype=np.float32)
                )
            else:
                scores = torch.zeros(len(mask), dtype=torch.float32)
            scores = scores.masked_fill(~torch.from_numpy(mask), float("-inf"))
            top = torch.topk(scores, k)
            out.append((top.indices, top.values))
        return out
