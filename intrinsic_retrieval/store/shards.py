"""Safetensors shards: written with the safetensors library, read back memory-mapped.

Why not `safetensors.safe_open`: its `get_tensor` copies into fresh memory, and a store must open
without reading its shards. Instead each file is mapped once, privately and copy-on-write
(`torch.UntypedStorage.from_file(shared=False)`), and every tensor is a view at the offsets the
safetensors header gives: nothing is read until a page is touched, in-place edits by a caller never
reach the disk, no file descriptor stays open per shard, and a mapping stays valid after a writer
deletes the file (compaction), so readers keep their snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import InvalidInputError, StoreCorruptedError, StorePermissionError

#: safetensors dtype code -> torch dtype (what the mapper can read back)
ST_DTYPES: dict[str, torch.dtype] = {
    code: dt
    for code, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "U16": getattr(torch, "uint16", None),
        "U32": getattr(torch, "uint32", None),
        "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
    }.items()
    if dt is not None
}
_WRITABLE = set(ST_DTYPES.values())

#: dtype names a `TensorSpec` may use (per-row tensors)
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

_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in TORCH_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def fsync_dir(path: Path) -> None:
    """Make a rename durable (no-op where directories cannot be fsynced)."""
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


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def user_mode(path: Path | str, *, directory: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (0600/0700) the mode any file the user creates gets,
    so other users can read a store exactly as the umask allows."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(
        path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    )


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(f"{name!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _WRITABLE:
            raise InvalidInputError(f"tensor {name!r} has unsupported dtype {value.dtype}")
        t = value.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Atomically write a safetensors file; returns ``{"bytes", "sha256"}`` for the manifest."""
    payload = _unshared(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # no metadata rather than an empty mapping: safetensors writes invalid JSON for no
        # tensors with an empty metadata mapping ('{},"__metadata__":{}}')
        metadata = {str(k): str(v) for k, v in (meta or {}).items()} or None
        save_file(payload, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        info = {"bytes": os.path.getsize(tmp), "sha256": file_sha256(Path(tmp))}
        user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return info


def read_safetensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A standalone safetensors file's tensors and metadata, in one open (small files such as
    heads, adapters and LoRAs; store shards are memory-mapped by `mmap_safetensors`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        names = f.keys()
        return {name: f.get_tensor(name) for name in names}, meta


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MappedFile:
    """One safetensors file mapped copy-on-write: `tensors` are zero-copy views of `raw`."""

    __slots__ = ("metadata", "path", "raw", "tensors")

    def __init__(self, path: Path, expected_bytes: int | None = None) -> None:
        self.path = path
        size = _checked_size(path, expected_bytes)
        if not os.access(path, os.R_OK):
            raise StorePermissionError(path, "read")
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8 or header_len > _MAX_HEADER:
                raise StoreCorruptedError(path, "safetensors header length is out of range")
            header_bytes = fh.read(header_len)
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise StoreCorruptedError(
                path, f"safetensors header is not valid JSON ({exc})"
            ) from exc
        if not isinstance(header, dict):
            raise StoreCorruptedError(path, "safetensors header is not an object")
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = dict(meta) if isinstance(meta, dict) else {}
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        self.raw = torch.empty(0, dtype=torch.uint8).set_(storage)
        base = 8 + header_len
        self.tensors: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            self.tensors[name] = self._view(name, info, base, size)

    def _view(self, name: str, info: Any, base: int, size: int) -> torch.Tensor:
        try:
            dtype = ST_DTYPES[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptedError(self.path, f"bad header entry for tensor {name!r}") from exc
        count = 1
        for s in shape:
            if s < 0:
                raise StoreCorruptedError(self.path, f"tensor {name!r} has a negative dimension")
            count *= s
        if begin < 0 or base + end > size or end - begin != count * dtype.itemsize:
            raise StoreCorruptedError(
                self.path, f"tensor {name!r} extends past the end of the file"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = self.raw[base + begin : base + end]
        if (base + begin) % dtype.itemsize:  # never for files safetensors wrote (it aligns)
            flat = flat.clone()
        return flat.view(dtype).view(shape)

    def read_bytes_into(self, fh: Any, hasher: Any) -> None:
        """Write the mapped file to `fh` (feeding `hasher`): copies a snapshot even after the
        file itself was replaced or removed by a writer."""
        data = self.raw.numpy()
        step = 1 << 24
        for i in range(0, len(data), step):
            block = memoryview(data[i : i + step])
            hasher.update(block)
            fh.write(block)


def _checked_size(path: Path, expected_bytes: int | None) -> int:
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
    return size


def mmap_safetensors(path: Path, expected_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Map every tensor of a safetensors file without reading its data.

    Raises `StoreCorruptedError` naming the file when it is missing, truncated or its header is bad.
    """
    return MappedFile(path, expected_bytes).tensors
