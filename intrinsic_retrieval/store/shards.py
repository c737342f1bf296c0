"""Safetensors shards, written with the safetensors library and opened memory-mapped.

Reading goes through `numpy.memmap` at the offsets the safetensors header gives, so opening a store
maps files instead of reading them; pages are faulted in only when a scan touches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import StoreCorruptedError

#: safetensors dtype code -> (numpy storage dtype, torch dtype)
_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),  # numpy has no bf16: map raw bits, view in torch
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in TORCH_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: dict | None = None) -> dict:
    """Atomically write a safetensors file; returns ``{"bytes", "sha256"}`` for the manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in (meta or {}).items()})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        info = {"bytes": os.path.getsize(tmp), "sha256": file_sha256(Path(tmp))}
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return info


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mmap_safetensors(path: Path, expected_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Map every tensor of a safetensors file without reading its data.

    Raises `StoreCorruptedError` naming the file when it is truncated or its header is bad.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise StoreCorruptedError(path, "file is missing") from exc
    if expected_bytes is not None and size != expected_bytes:
        raise StoreCorruptedError(
            path, f"size is {size} bytes, manifest says {expected_bytes} (truncated or overwritten)"
        )
    if size < 8:
        raise StoreCorruptedError(path, "file is shorter than a safetensors header")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise StoreCorruptedError(path, "safetensors header length is out of range")
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreCorruptedError(path, f"safetensors header is not valid JSON ({exc})") from exc
    base = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            np_dtype, t_dtype = _DTYPES[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptedError(path, f"bad header entry for tensor {name!r}") from exc
        count = int(np.prod(shape)) if shape else 1
        if base + end > size or end - begin != count * np_dtype.itemsize:
            raise StoreCorruptedError(path, f"tensor {name!r} extends past the end of the file")
        if count == 0:
            out[name] = torch.empty(shape, dtype=t_dtype)
            continue
        # mode "c" (copy-on-write) maps lazily and gives torch a writable view without
        # touching the file; nothing is read until a page is used.
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=base + begin, shape=(count,))
        tensor = torch.from_numpy(arr)
        if t_dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        out[name] = tensor.reshape(shape)
    return out
