"""The manifest: the store's commit point, parsed and validated before anything else is opened.

Validation is strict because every path a reader touches comes from the manifest: a file name
that escapes the store directory, a shard list with gaps, or a spec that does not parse is
reported as `StoreCorruptedError` naming ``manifest.json`` instead of failing somewhere later.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InvalidInputError, StoreCorruptedError, StoreNotFoundError, StoreVersionError
from .shards import TORCH_DTYPES

FORMAT_NAME = "intrinsic-retrieval/encoded-chunk-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

#: tensor and aux names: no dots (``<name>.offsets`` is reserved for varlen offsets), no slashes
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$")
_SQLITE_RE = re.compile(r"^chunks-[A-Za-z0-9_\-]+\.sqlite$")
_SHARD_RE = re.compile(r"^shards/[A-Za-z0-9_\-]+\.safetensors$")
_AUX_RE = re.compile(r"^aux/[A-Za-z0-9_\-]+\.safetensors$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What one named per-row tensor looks like.

    kind="fixed": every row has `shape` (e.g. pooled vectors ``(p, d)``; ``()`` for a scalar).
    kind="varlen": every row has ``(len_i, *shape)`` (e.g. token states, ``shape=(d,)``).
    """

    kind: Literal["fixed", "varlen"]
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "varlen"):
            raise InvalidInputError(f"tensor kind must be 'fixed' or 'varlen', got {self.kind!r}")
        if self.dtype not in TORCH_DTYPES:
            raise InvalidInputError(
                f"unsupported store dtype {self.dtype!r}; use one of {sorted(TORCH_DTYPES)}"
            )
        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"tensor shape must be a tuple of ints, got {self.shape!r}"
            ) from exc
        if any(s < 0 for s in shape):
            raise InvalidInputError(f"tensor shape must be non-negative, got {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        return cls(kind=obj["kind"], dtype=obj["dtype"], shape=tuple(obj["shape"]))


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInputError(
            f"{what} name must be 1-128 characters of letters, digits, '_' or '-' (no dots), "
            f"got {name!r}"
        )
    return name


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _file_entry(entry: object, pattern: re.Pattern[str], where: str, bad: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise bad(f"{where} is not an object")
    f = entry.get("file")
    if not isinstance(f, str) or not pattern.match(f):
        raise bad(f"{where} has an invalid file name {f!r}")
    if not _is_int(entry.get("bytes")) or entry["bytes"] < 8:
        raise bad(f"{where} has an invalid byte count {entry.get('bytes')!r}")
    if not isinstance(entry.get("sha256"), str) or not _SHA_RE.match(entry["sha256"]):
        raise bad(f"{where} has an invalid sha256")
    return entry


def validate_manifest(manifest: object, mpath: Path) -> dict[str, Any]:
    """Raise `StoreVersionError` / `StoreCorruptedError` (naming `mpath`) unless well formed."""

    def bad(reason: str) -> StoreCorruptedError:
        return StoreCorruptedError(mpath, reason)

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise bad(f"not an {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise bad(f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreVersionError(
            f"{mpath} has format version {version}; this library reads up to {FORMAT_VERSION}. "
            "Upgrade intrinsic-retrieval to open it."
        )
    for key in ("fingerprint", "tensors", "shards", "num_rows", "sqlite"):
        if key not in manifest:
            raise bad(f"missing key {key!r}")
    if not isinstance(manifest["fingerprint"], str):
        raise bad("fingerprint is not a string")
    if not isinstance(manifest.get("config", {}), dict):
        raise bad("config is not an object")
    if not isinstance(manifest["sqlite"], str) or not _SQLITE_RE.match(manifest["sqlite"]):
        raise bad(f"invalid SQLite file name {manifest['sqlite']!r}")
    tensors = manifest["tensors"]
    if not isinstance(tensors, dict):
        raise bad("tensors is not an object")
    for name, spec in tensors.items():
        try:
            check_name(name, "tensor")
            TensorSpec.from_json(spec)
        except (InvalidInputError, KeyError, TypeError) as exc:
            raise bad(f"invalid tensor spec {name!r}: {exc}") from exc
    n = manifest["num_rows"]
    if not _is_int(n) or n < 0:
        raise bad(f"invalid num_rows {n!r}")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("shards is not a list")
    expected_start = 0
    seen: set[str] = set()
    for i, entry in enumerate(shards):
        _file_entry(entry, _SHARD_RE, f"shard entry {i}", bad)
        if entry["file"] in seen:
            raise bad(f"shard {entry['file']} is listed twice")
        seen.add(entry["file"])
        if (
            entry.get("start") != expected_start
            or not _is_int(entry.get("rows"))
            or entry["rows"] < 0
        ):
            raise bad(f"shard entry {i} ({entry['file']}) does not continue the row range")
        expected_start += entry["rows"]
    if expected_start != n:
        raise bad(f"shards hold {expected_start} rows but num_rows is {n}")
    aux = manifest.get("aux", {})
    if not isinstance(aux, dict):
        raise bad("aux is not an object")
    for name, entry in aux.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad(f"invalid aux name {name!r}")
        _file_entry(entry, _AUX_RE, f"aux entry {name!r}", bad)
        if not isinstance(entry.get("meta", {}), dict):
            raise bad(f"aux entry {name!r} meta is not an object")
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """Load and validate ``root/manifest.json``."""
    mpath = root / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError as exc:
        raise StoreNotFoundError(f"no encoded-chunk store at {root} (missing {MANIFEST})") from exc
    except NotADirectoryError as exc:
        raise StoreNotFoundError(f"no encoded-chunk store at {root} (not a directory)") from exc
    except PermissionError:
        from ..errors import StorePermissionError

        raise StorePermissionError(mpath, "read") from None
    except OSError as exc:
        raise StoreCorruptedError(mpath, f"cannot be read ({exc})") from exc
    if not raw.strip():
        raise StoreCorruptedError(mpath, "file is empty")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StoreCorruptedError(mpath, f"not valid JSON ({exc})") from exc
    return validate_manifest(manifest, mpath)


def json_copy(obj: Any, what: str) -> Any:
    """A deep copy through JSON; refuses what the manifest could not hold (NaN, objects)."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{what} must be JSON-serialisable: {exc}") from exc
