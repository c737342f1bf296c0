"""A small FAISS wrapper keyed by store row numbers, with exact metadata-filter support.

The FAISS index is never persisted: it is derived data, rebuilt from the store's vectors when a
retriever opens a store (`VectorIndex.build`). That keeps one on-disk format (the store) and
avoids FAISS's own serialisation, whose files are not portable across FAISS builds/GPU types.

Filtering uses FAISS ID selectors inside the search (not post-filtering), so rows outside the
`allowed` mask are never returned and a selective filter still yields up to `k` results. With
IVF, a filtered search that comes back short (allowed rows sit in lists that were not probed) is
repeated with every list probed, which makes filtered IVF search exhaustive over allowed rows.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import faiss
import numpy as np
import torch

from ..errors import DimensionMismatchError, InvalidInputError

log = logging.getLogger(__name__)

Metric = Literal["ip", "l2"]
IndexKind = Literal["auto", "flat", "ivf"]

FLAT_THRESHOLD = 50_000  # "auto": exact search below this many vectors, IVF from here on
MIN_POINTS_PER_CENTROID = 39  # FAISS warns (and clusters badly) below this
_GPU_MAX_K = 2048  # FAISS GPU k-selection limit


def _np_vectors(x: Any, dim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1 and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise DimensionMismatchError(f"{what} must be (n, {dim}), got shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _np_ids(ids: Any, what: str = "ids") -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidInputError(f"{what} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise InvalidInputError(f"{what} must be non-negative (they are store row numbers)")
    return arr


def _np_mask(allowed: Any) -> np.ndarray:
    if isinstance(allowed, torch.Tensor):
        allowed = allowed.detach().cpu().numpy()
    mask = np.asarray(allowed)
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise InvalidInputError(f"allowed must be a 1-D bool mask, got {mask.dtype} {mask.shape}")
    return mask


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) inverted lists (the usual FAISS guideline)."""
    return max(1, int(4 * math.sqrt(max(n, 1))))


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """Vectors keyed by int64 ids (store rows); inner-product or L2 search.

    kind="flat": exact search (IndexIDMap2 over IndexFlat). kind="ivf": IndexIVFFlat with `nlist`
    lists (default ~4·sqrt(n)), trained on the first vectors added; falls back to flat while
    there are fewer than 39·nlist vectors to train on, and converts once there are enough.
    kind="auto": flat below `flat_threshold` vectors, IVF at or above it (converting as the index
    grows). Scores are higher-is-better: inner products, or *negative* squared L2 distances.
    With `use_gpu` ("auto": when FAISS has GPU support and a GPU is visible) unfiltered searches
    run on a GPU copy; filtered searches use the CPU index, where ID selectors are supported.
    """

    def __init__(
        self,
        dim: int,
        metric: Metric = "ip",
        kind: IndexKind = "auto",
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        use_gpu: bool | Literal["auto"] = "auto",
        flat_threshold: int = FLAT_THRESHOLD,
    ) -> None:
        if int(dim) < 1:
            raise InvalidInputError(f"dim must be positive, got {dim}")
        if metric not in ("ip", "l2"):
            raise InvalidInputError(f"metric must be 'ip' or 'l2', got {metric!r}")
        if kind not in ("auto", "flat", "ivf"):
            raise InvalidInputError(f"kind must be 'auto', 'flat' or 'ivf', got {kind!r}")
        if nlist is not None and nlist < 1:
            raise InvalidInputError(f"nlist must be positive, got {nlist}")
        if nprobe is not None and nprobe < 1:
            raise InvalidInputError(f"nprobe must be positive, got {nprobe}")
        self.dim = int(dim)
        self.metric: Metric = metric
        self.kind: IndexKind = kind
        self.requested_nlist = nlist
        self.requested_nprobe = nprobe
        self.flat_threshold = int(flat_threshold)
        if use_gpu is True and not faiss_gpu_available():
            raise InvalidInputError(
                "use_gpu=True but this FAISS build has no GPU support or sees no GPU; install "
                "faiss-gpu (extra 'gpu') or pass use_gpu='auto'"
            )
        self.use_gpu = bool(use_gpu) and faiss_gpu_available()
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        self._index: Any = self._new_flat()
        self._nlist: int | None = None  # set when the index is IVF
        self._gpu_res: Any = None
        self._gpu_index: Any = None
        self._max_seen = -1  # largest id ever added: a mask longer than this covers every id

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, vectors: Any, ids: Any, *, dim: int | None = None, **kwargs: Any) -> VectorIndex:
        """A fresh index holding `vectors` under `ids` (how retrievers rebuild at load)."""
        if dim is None:
            shape = tuple(vectors.shape)
            if len(shape) != 2:
                raise DimensionMismatchError(f"vectors must be (n, d), got shape {shape}")
            dim = int(shape[1])
        index = cls(dim, **kwargs)
        index.add(vectors, ids)
        return index

    def _new_flat(self) -> Any:
        flat = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        return faiss.IndexIDMap2(flat)

    def _wants_ivf(self, n: int) -> int | None:
        """nlist to train with for `n` vectors, or None to stay (or fall back to) flat."""
        if self.kind == "flat" or (self.kind == "auto" and n < self.flat_threshold):
            return None
        nlist = self.requested_nlist or default_nlist(n)
        if n < MIN_POINTS_PER_CENTROID * nlist:
            return None
        return nlist

    def _train_ivf(self, vectors: np.ndarray, ids: np.ndarray, nlist: int) -> None:
        quantizer = (
            faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        )
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric)
        ivf.train(vectors)
        ivf.add_with_ids(vectors, ids)
        ivf.nprobe = self.nprobe_for(nlist)
        self._index, self._nlist = ivf, nlist
        log.info("built IVF index: %d vectors, nlist=%d, nprobe=%d", len(ids), nlist, ivf.nprobe)

    def nprobe_for(self, nlist: int) -> int:
        return min(nlist, self.requested_nprobe or max(8, nlist // 16))

    def _flat_contents(self) -> tuple[np.ndarray, np.ndarray]:
        n = self._index.ntotal
        vectors = self._index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), "f4")
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return np.ascontiguousarray(vectors, dtype=np.float32), ids

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_ivf(self) -> bool:
        return self._nlist is not None

    @property
    def nlist(self) -> int | None:
        return self._nlist

    def __repr__(self) -> str:
        kind = f"ivf(nlist={self._nlist})" if self.is_ivf else "flat"
        where = "gpu" if self.use_gpu else "cpu"
        return (
            f"VectorIndex(dim={self.dim}, metric={self.metric!r}, {kind}, n={self.ntotal}, {where})"
        )

    # ------------------------------------------------------------------ mutation
    def add(self, vectors: Any, ids: Any) -> None:
        """Add float vectors ``(n, dim)`` under int64 `ids` (store row numbers, unique)."""
        x = _np_vectors(vectors, self.dim, "vectors")
        i = _np_ids(ids)
        if len(i) != len(x):
            raise InvalidInputError(f"{len(x)} vectors but {len(i)} ids")
        if not len(x):
            return
        self._gpu_index = None
        self._max_seen = max(self._max_seen, int(i.max()))
        if not self.is_ivf:
            nlist = self._wants_ivf(self.ntotal + len(x))
            if nlist is not None:  # (re)build as IVF over everything held so far
                old_x, old_i = self._flat_contents()
                self._train_ivf(np.concatenate([old_x, x]), np.concatenate([old_i, i]), nlist)
                return
        self._index.add_with_ids(x, i)

    def remove(self, ids: Any) -> int:
        """Remove `ids` (unknown ids are ignored); returns how many vectors were removed."""
        i = _np_ids(ids)
        if not len(i):
            return 0
        self._gpu_index = None
        return int(self._index.remove_ids(faiss.IDSelectorBatch(len(i), faiss.swig_ptr(i))))

    def reset(self) -> None:
        self._index, self._nlist, self._gpu_index = self._new_flat(), None, None
        self._max_seen = -1

    # ------------------------------------------------------------------ search
    def _gpu(self) -> Any:
        if self._gpu_index is None:
            try:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
            except Exception as exc:  # a FAISS build without this index type on GPU
                log.warning("FAISS GPU copy failed (%s); searching on CPU", exc)
                self.use_gpu = False
                return None
        return self._gpu_index

    def _params(self, sel: Any, nprobe: int | None) -> Any:
        if self.is_ivf:
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe or self._index.nprobe)
        return faiss.SearchParameters(sel=sel)

    def search(
        self, queries: Any, k: int, allowed: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-`k` per query: ``(scores float32 (q, k), ids int64 (q, k))``, best first.

        `allowed` is a bool mask over ids (store rows); ids outside it, or beyond its length,
        are never returned. Missing results are padded with id -1 and score -inf (strip them
        with ``ids >= 0``, or use `search_ranked`).
        """
        q = _np_vectors(queries, self.dim, "queries")
        if k < 0:
            raise InvalidInputError(f"k must be non-negative, got {k}")
        nq = len(q)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        n = self.ntotal
        if k == 0 or nq == 0 or n == 0:
            return torch.from_numpy(scores), torch.from_numpy(ids)
        kk = min(k, n)
        mask = None if allowed is None else _np_mask(allowed)
        if mask is not None and len(mask) > self._max_seen and mask.all():
            mask = None  # everything is allowed: skip the selector
        if mask is None:
            gpu = self._gpu() if self.use_gpu and kk <= _GPU_MAX_K else None
            d, i = (self._index if gpu is None else gpu).search(q, kk)
        else:
            n_allowed = int(mask.sum())
            if n_allowed == 0:
                return torch.from_numpy(scores), torch.from_numpy(ids)
            kk = min(kk, n_allowed)
            bitmap = np.packbits(mask, bitorder="little")  # kept alive through the search
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            d, i = self._index.search(q, kk, params=self._params(sel, None))
            if self.is_ivf:
                short = (i < 0).any(axis=1)
                if short.any():  # allowed rows in unprobed lists: probe them all
                    d2, i2 = self._index.search(
                        np.ascontiguousarray(q[short]), kk, params=self._params(sel, self._nlist)
                    )
                    d[short], i[short] = d2, i2
            del bitmap
        d = np.where(i >= 0, d, np.inf if self.metric == "l2" else -np.inf)
        scores[:, :kk] = -d if self.metric == "l2" else d
        ids[:, :kk] = i
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def search_ranked(
        self, queries: Any, k: int, allowed: Any = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`search` with padding stripped: one ``(ids, scores)`` pair per query."""
        scores, ids = self.search(queries, k, allowed)
        out = []
        for s, i in zip(scores, ids, strict=True):
            keep = i >= 0
            out.append((i[keep], s[keep]))
        return out

    def vectors_and_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Everything held, as (vectors, ids); flat indexes only (IVF keeps no id lookup)."""
        if self.is_ivf:
            raise InvalidInputError("an IVF index cannot list its vectors; rebuild from the store")
        return self._flat_contents()
