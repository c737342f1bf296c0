"""Turning what callers append into what the store writes, refusing anything that would not
round-trip: chunk records for SQLite and per-row tensors for a shard (with varlen offsets)."""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import DimensionMismatchError, InvalidInputError
from .manifest import TensorSpec


def json_metadata(meta: object, chunk_id: str) -> str:
    if not isinstance(meta, Mapping):
        raise InvalidInputError(f"metadata of chunk {chunk_id!r} must be a mapping")
    try:
        return json.dumps(dict(meta), sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(
            f"metadata of chunk {chunk_id!r} is not JSON-serialisable (NaN/inf included): {exc}"
        ) from exc


def chunk_record(c: object) -> tuple[str, str, str, str, int, int]:
    """SQLite values for one chunk; duck-typed so any `Chunk`-shaped record works."""
    try:
        cid, did, text = c.id, c.document_id, c.text  # type: ignore[attr-defined]
        meta = getattr(c, "metadata", None) or {}
        start, end = getattr(c, "start", 0), getattr(c, "end", 0)
    except AttributeError as exc:
        raise InvalidInputError(
            f"chunks must have id, document_id, text and metadata; got {type(c).__name__}"
        ) from exc
    if not isinstance(cid, str) or not cid:
        raise InvalidInputError(f"chunk id must be a non-empty str, got {cid!r}")
    if not isinstance(did, str) or not did:
        raise InvalidInputError(
            f"document id of chunk {cid!r} must be a non-empty str, got {did!r}"
        )
    if not isinstance(text, str):
        raise InvalidInputError(f"text of chunk {cid!r} must be str, got {type(text).__name__}")
    for v in (start, end):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
            raise InvalidInputError(f"start/end of chunk {cid!r} must be ints >= 0, got {v!r}")
    return cid, did, text, json_metadata(meta, cid), int(start), int(end)


def _as_tensor(value: object, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        items = list(value)  # type: ignore[call-overload]
        if items and all(isinstance(x, torch.Tensor) for x in items):
            return torch.stack(items)
        return torch.as_tensor(np.asarray(items))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DimensionMismatchError(f"{what} is not a tensor of uniform shape: {exc}") from exc


def _rows_of(value: object, what: str) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise DimensionMismatchError(f"{what} must hold one tensor per row")
        return list(value.unbind(0))
    try:
        return [r if isinstance(r, torch.Tensor) else _as_tensor(r, what) for r in value]  # type: ignore[attr-defined]
    except TypeError as exc:
        raise DimensionMismatchError(f"{what} must be a sequence of tensors") from exc


def _cast(t: torch.Tensor, spec: TensorSpec, what: str) -> torch.Tensor:
    """Cast to the spec's dtype, refusing casts that silently change values."""
    target = spec.torch_dtype
    if t.dtype == target:
        return t
    src_float = t.dtype.is_floating_point or t.dtype.is_complex
    if not target.is_floating_point and src_float:
        raise DimensionMismatchError(
            f"{what} has dtype {t.dtype}; the store holds {spec.dtype} and will not round floats"
        )
    if t.numel() and not src_float:
        if target == torch.bool:
            if not bool(((t == 0) | (t == 1)).all()):
                raise DimensionMismatchError(f"{what} must hold only 0/1 to be stored as bool")
        elif not target.is_floating_point and t.dtype != torch.bool:
            info = torch.iinfo(target)
            if int(t.min()) < info.min or int(t.max()) > info.max:
                raise DimensionMismatchError(f"{what} has values outside the range of {spec.dtype}")
    if target == torch.float16 and src_float and t.numel():
        finite = t[torch.isfinite(t)]
        if finite.numel() and float(finite.abs().max()) > torch.finfo(torch.float16).max:
            raise DimensionMismatchError(f"{what} has values that overflow float16")
    return t.to(target)


def shard_payload(
    specs: Mapping[str, TensorSpec], n: int, tensors: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Validate per-row tensors against the specs; returns what goes into a shard."""
    if not isinstance(tensors, Mapping):
        raise DimensionMismatchError("tensors must be a mapping of name -> tensor")
    missing = set(specs) - set(tensors)
    extra = set(tensors) - set(specs)
    if missing or extra:
        raise DimensionMismatchError(
            f"tensors do not match the store specs: missing {sorted(missing)}, "
            f"unexpected {sorted(map(str, extra))}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        value = tensors[name]
        if spec.kind == "fixed":
            t = _as_tensor(value, f"tensor {name!r}")
            if tuple(t.shape) != (n, *spec.shape):
                raise DimensionMismatchError(
                    f"tensor {name!r} has shape {tuple(t.shape)}, expected {(n, *spec.shape)}"
                )
            out[name] = _cast(t.detach(), spec, f"tensor {name!r}")
            continue
        rows = _rows_of(value, f"varlen tensor {name!r}")
        if len(rows) != n:
            raise DimensionMismatchError(
                f"varlen tensor {name!r} has {len(rows)} rows, expected {n}"
            )
        for i, r in enumerate(rows):
            if r.dim() != len(spec.shape) + 1 or tuple(r.shape[1:]) != spec.shape:
                raise DimensionMismatchError(
                    f"varlen tensor {name!r} row {i} has shape {tuple(r.shape)}, "
                    f"expected (len, {', '.join(map(str, spec.shape))})"
                )
        lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
        offsets = torch.zeros(n + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        if rows:
            flat = torch.cat([r.detach().cpu() for r in rows], 0)
        else:
            flat = torch.empty((0, *spec.shape), dtype=spec.torch_dtype)
        out[name] = _cast(flat, spec, f"varlen tensor {name!r}")
        out[f"{name}.offsets"] = offsets
    return out
