"""Document identifiers for generative retrieval: atomic, naive and semantic (Tay et al. 2022;
Pradeep et al. 2023, "How Does Generative Retrieval Scale to Millions of Passages?").

Every stored row gets an integer *code* (its position in the docid map, never reused). What the
model emits for a code depends on the scheme:

* ``atomic``   — one new output unit per document (a row of a docid head); no token sequence.
* ``naive``    — the document's own id written out and tokenized, followed by EOS.
* ``semantic`` — hierarchical k-means over document embeddings: cluster digits from the root
  (each in ``0..k-1``) and a position ``0..c-1`` in a leaf of at most `c` documents, written as
  ``"3 7 42"``, tokenized, followed by EOS.

The map is plain JSON (plus the semantic centroids as a tensor) so it can be inspected and is
persisted in the store next to the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import DocidVocabularyError, IdSpaceExhaustedError, InvalidInputError

SCHEMES = ("atomic", "naive", "semantic")
FORMAT_VERSION = 1

#: text -> token ids without special tokens
TokenizeFn = Callable[[str], list[int]]


def tokenize_fn(tokenizer: Any) -> TokenizeFn:
    def tok(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return tok


def naive_string(chunk_id: str, document_id: str) -> str:
    """The document id for a document's first chunk, the chunk id for the others."""
    return document_id if chunk_id == f"{document_id}#0" else chunk_id


# ---------------------------------------------------------------------- hierarchical k-means
def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    km = KMeans(n_clusters=k, random_state=seed, n_init=1, max_iter=100)
    with warnings.catch_warnings():  # duplicate points: handled by the caller
        warnings.simplefilter("ignore", ConvergenceWarning)
        return km.fit_predict(x)


def hierarchical_kmeans(
    embeddings: np.ndarray, *, k: int = 10, c: int = 100, seed: int = 0, max_depth: int = 8
) -> tuple[list[list[int]], dict[str, np.ndarray]]:
    """Recursively split into `k` clusters until every cluster holds at most `c` documents.

    Returns, per document, its path ``[d_1, ..., d_m, position]`` and the centroid of every
    internal node's children keyed ``"d_1 ... d_j"`` (root: ``""``), which incremental `add`
    uses to place new documents. Deterministic for a given `seed`. A cluster that k-means cannot
    split (identical embeddings) is cut into `k` equal parts in input order.
    """
    n = len(embeddings)
    if k < 2 or c < 1:
        raise InvalidInputError(f"semantic ids need k >= 2 and c >= 1, got k={k}, c={c}")
    if n > c * k**max_depth:
        raise IdSpaceExhaustedError(
            f"{n} documents exceed the semantic id space k^max_depth*c = {c * k**max_depth} "
            f"(k={k}, c={c}, max_depth={max_depth}); raise c or max_depth"
        )
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    paths: list[list[int]] = [[] for _ in range(n)]
    centroids: dict[str, np.ndarray] = {}

    def split(idx: np.ndarray, prefix: list[int], depth: int) -> None:
        if len(idx) <= c:
            for pos, i in enumerate(idx.tolist()):
                paths[i] = [*prefix, pos]
            return
        if depth >= max_depth:
            raise IdSpaceExhaustedError(
                f"cluster {' '.join(map(str, prefix))!r} still holds {len(idx)} > c={c} "
                f"documents at max_depth={max_depth}"
            )
        labels = _kmeans(x[idx], min(k, len(idx)), seed)
        if len(np.unique(labels)) < 2:  # degenerate: cut in order
            labels = (np.arange(len(idx)) * k) // len(idx)
        key = " ".join(map(str, prefix))
        cents = np.zeros((k, x.shape[1]), dtype=np.float32)
        for j in range(k):
            members = idx[labels == j]
            cents[j] = x[members].mean(0) if len(members) else np.inf
        centroids[key] = cents
        for j in range(k):
            members = idx[labels == j]
            if len(members):
                split(members, [*prefix, j], depth + 1)

    split(np.arange(n), [], 0)
    return paths, centroids


# ---------------------------------------------------------------------- the map
@dataclass
class DocidMap:
    """Code -> docid (string and token sequence), trained and deleted codes, scheme state."""

    scheme: str
    params: dict[str, Any] = field(default_factory=dict)
    strings: list[str | None] = field(default_factory=list)
    tokens: list[list[int] | None] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    trained: set[int] = field(default_factory=set)
    #: semantic only: child centroids per internal node (see `hierarchical_kmeans`)
    centroids: dict[str, np.ndarray] = field(default_factory=dict)
    #: semantic only: True once k-means has run (before that, docids are not assigned)
    assigned: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InvalidInputError(f"docid scheme must be one of {SCHEMES}, got {self.scheme!r}")

    # ------------------------------------------------------------------ basic facts
    def __len__(self) -> int:
        return len(self.strings)

    @property
    def sequential(self) -> bool:
        return self.scheme != "atomic"

    @property
    def capacity(self) -> int | None:
        cap = self.params.get("capacity")
        return None if cap is None else int(cap)

    def live_codes(self) -> list[int]:
        return [i for i in range(len(self)) if i not in self.deleted]

    def searchable_codes(self) -> list[int]:
        """Live, trained codes that have a docid (the only ones search may return)."""
        return [
            i
            for i in range(len(self))
            if i not in self.deleted
            and i in self.trained
            and (not self.sequential or self.tokens[i] is not None)
        ]

    # ------------------------------------------------------------------ assignment
    def reserve(self, n: int) -> range:
        """Codes for `n` new rows (strings/tokens are filled by `assign_*`)."""
        cap = self.capacity
        if cap is not None and len(self) + n > cap:
            raise IdSpaceExhaustedError(
                f"adding {n} documents to {len(self)} exceeds the docid capacity {cap} "
                f"of this {self.scheme} scheme; create the retriever with a larger capacity"
            )
        start = len(self)
        self.strings.extend([None] * n)
        self.tokens.extend([None] * n)
        return range(start, start + n)

    def set_docid(self, code: int, string: str, tokens: list[int] | None) -> None:
        self.strings[code] = string
        self.tokens[code] = tokens

    def assign_atomic(self, codes: Sequence[int]) -> None:
        for code in codes:
            self.set_docid(code, f"<{code}>", None)

    def assign_naive(
        self, codes: Sequence[int], ids: Sequence[str], tok: TokenizeFn, eos: int
    ) -> None:
        for code, s in zip(codes, ids, strict=True):
            self.set_docid(code, s, [*tok(s), eos])
        self.check_unique(codes)

    def build_semantic(
        self, codes: Sequence[int], embeddings: np.ndarray, tok: TokenizeFn, eos: int
    ) -> None:
        """Run hierarchical k-means over all `codes` (first training)."""
        k, c = int(self.params.get("k", 10)), int(self.params.get("c", 100))
        seed, depth = int(self.params.get("seed", 0)), int(self.params.get("max_depth", 8))
        paths, self.centroids = hierarchical_kmeans(
            embeddings, k=k, c=c, seed=seed, max_depth=depth
        )
        for code, path in zip(codes, paths, strict=True):
            s = " ".join(map(str, path))
            self.set_docid(code, s, [*tok(s), eos])
        self.assigned = True
        self.check_unique(codes)

    def extend_semantic(
        self, codes: Sequence[int], embeddings: np.ndarray, tok: TokenizeFn, eos: int
    ) -> None:
        """Place documents added after k-means: descend to the nearest leaf that has room."""
        c = int(self.params.get("c", 100))
        used: dict[str, set[int]] = {}
        for code, s in enumerate(self.strings):
            if s is not None and self.tokens[code] is not None:
                parts = s.split(" ")
                used.setdefault(" ".join(parts[:-1]), set()).add(int(parts[-1]))
        for code, e in zip(codes, np.asarray(embeddings, dtype=np.float32), strict=True):
            leaf = self._nearest_free_leaf(e, used, c)
            free = min(set(range(c)) - used.setdefault(leaf, set()))
            used[leaf].add(free)
            s = f"{leaf} {free}".strip()
            self.set_docid(code, s, [*tok(s), eos])
        self.check_unique(codes)

    def _nearest_free_leaf(self, e: np.ndarray, used: dict[str, set[int]], c: int) -> str:
        def leaves(prefix: str) -> list[tuple[float, str]]:
            cents = self.centroids.get(prefix)
            if cents is None:
                return [(0.0, prefix)]
            out: list[tuple[float, str]] = []
            dists = ((cents - e) ** 2).sum(1)
            for j in np.argsort(dists, kind="stable").tolist():
                if not np.isfinite(dists[j]):
                    continue
                child = f"{prefix} {j}".strip()
                out.extend((float(dists[j]), leaf) for _, leaf in leaves(child))
            return out

        for _, leaf in leaves(""):  # depth-first in order of closeness
            if len(used.get(leaf, ())) < c:
                return leaf
        raise IdSpaceExhaustedError(
            f"every semantic leaf already holds c={c} documents; the id space is full. "
            "Rebuild with a larger c (retrain from scratch)"
        )

    def check_unique(self, codes: Sequence[int] | None = None) -> None:
        seen: dict[tuple[int, ...], int] = {}
        for code, toks in enumerate(self.tokens):
            if toks is None:
                continue
            key = tuple(toks)
            if key in seen:
                raise DocidVocabularyError(
                    f"docids {self.strings[seen[key]]!r} and {self.strings[code]!r} tokenize to "
                    "the same token sequence; use atomic or semantic ids, or ids the tokenizer "
                    "keeps apart"
                )
            seen[key] = code

    # ------------------------------------------------------------------ validation
    def validate(
        self, *, vocab_size: int, tok: TokenizeFn | None, eos: int | None, head_rows: int | None
    ) -> None:
        """Raise `DocidVocabularyError` if this map cannot be decoded by the given model."""
        if self.scheme == "atomic":
            if head_rows is not None and head_rows < len(self):
                raise DocidVocabularyError(
                    f"the docid map has {len(self)} atomic ids but the model's docid head has "
                    f"{head_rows} rows"
                )
            return
        for code, toks in enumerate(self.tokens):
            if toks is None:
                continue
            bad = [t for t in toks if not 0 <= t < vocab_size]
            if bad:
                raise DocidVocabularyError(
                    f"docid {self.strings[code]!r} uses token ids {bad[:3]} outside the model "
                    f"vocabulary of {vocab_size}; the docid map belongs to another model"
                )
            if tok is not None and eos is not None:
                s = self.strings[code]
                if s is None or [*tok(s), eos] != toks:
                    raise DocidVocabularyError(
                        f"docid {s!r} no longer tokenizes to its stored tokens {toks}; the "
                        "tokenizer differs from the one that built this index"
                    )

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "params": self.params,
            "strings": self.strings,
            "tokens": self.tokens,
            "deleted": sorted(self.deleted),
            "trained": sorted(self.trained),
            "assigned": self.assigned,
            "centroid_keys": sorted(self.centroids),
        }

    def centroid_tensors(self) -> dict[str, torch.Tensor]:
        keys = sorted(self.centroids)
        if not keys:
            return {"centroids": torch.zeros(0, dtype=torch.float32)}
        return {"centroids": torch.from_numpy(np.stack([self.centroids[k] for k in keys]))}

    @classmethod
    def from_json(
        cls, obj: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None
    ) -> DocidMap:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise DocidVocabularyError(
                f"docid map format {obj.get('format_version')} is newer than this library reads"
            )
        m = cls(
            scheme=obj["scheme"],
            params=dict(obj.get("params", {})),
            strings=list(obj.get("strings", [])),
            tokens=[None if t is None else [int(x) for x in t] for t in obj.get("tokens", [])],
            deleted={int(x) for x in obj.get("deleted", [])},
            trained={int(x) for x in obj.get("trained", [])},
            assigned=bool(obj.get("assigned", False)),
        )
        keys = obj.get("centroid_keys", [])
        if keys and tensors is not None:
            cents = tensors["centroids"].numpy()
            m.centroids = {k: np.array(cents[i]) for i, k in enumerate(keys)}
        return m

    def fingerprint(self) -> str:
        """Hash of what the model learns to emit (scheme, strings, tokens)."""
        payload = json.dumps([self.scheme, self.strings, self.tokens], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()
