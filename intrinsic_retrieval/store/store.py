"""The encoded-chunk store: one on-disk format for every retriever.

Layout of a store directory::

    manifest.json            commit point: format version, model fingerprint, tensor specs,
                             retriever config, shard list with sizes and sha256
    chunks-<gen>.sqlite      chunk ids, document ids, texts, JSON metadata, tombstones
    shards/*.safetensors     per-row tensors, one file per append (fixed-size rows, or
                             variable-length rows flattened with a `<name>.offsets` table)
    aux/<name>.safetensors   tensors that are not per row (trained heads, statistics)

Writes go to new files first and the manifest is replaced last, so a crash leaves the previous
state readable; rows or files the manifest does not know are discarded when the store reopens.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import (
    DimensionMismatchError,
    DuplicateIdError,
    InvalidInputError,
    ModelMismatchError,
    StoreCorruptedError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    UnknownIdError,
)
from ..filters import compile_filter
from ..types import Chunk
from .shards import (
    TORCH_DTYPES,
    atomic_write_json,
    file_sha256,
    mmap_safetensors,
    write_safetensors,
)

FORMAT_NAME = "intrinsic-retrieval/encoded-chunk-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    row INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL UNIQUE,
    document_id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    start INTEGER NOT NULL DEFAULT 0,
    "end" INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id);
"""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What one named per-row tensor looks like.

    kind="fixed": every row has `shape` (e.g. pooled vectors ``(p, d)``).
    kind="varlen": every row has ``(len_i, *shape)`` (e.g. token states ``(d,)`` per token).
    """

    kind: Literal["fixed", "varlen"]
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "varlen"):
            raise InvalidInputError(f"tensor kind must be 'fixed' or 'varlen', got {self.kind!r}")
        if self.dtype not in TORCH_DTYPES:
            raise InvalidInputError(f"unsupported store dtype {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        return cls(kind=obj["kind"], dtype=obj["dtype"], shape=tuple(obj["shape"]))


def _json_metadata(meta: Mapping[str, Any], chunk_id: str) -> str:
    try:
        return json.dumps(dict(meta), sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata of chunk {chunk_id!r} is not JSON-serialisable: {exc}") from exc


class EncodedChunkStore:
    """Chunks, their metadata and their tensors on disk; see the module docstring for layout."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, read_only: bool = False) -> None:
        self.path = path
        self._manifest = manifest
        self.read_only = read_only
        self.specs = {k: TensorSpec.from_json(v) for k, v in manifest["tensors"].items()}
        self._db = self._connect()
        self._shard_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._fixed_cache: dict[str, torch.Tensor] = {}
        self._live_cache: torch.Tensor | None = None

    # ------------------------------------------------------------------ creation and opening
    @classmethod
    def create(
        cls,
        path: str | PathLike[str],
        *,
        fingerprint: str,
        specs: Mapping[str, TensorSpec],
        config: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> EncodedChunkStore:
        """Create an empty store. `config` is whatever the retriever needs to rebuild itself."""
        root = Path(path)
        if (root / MANIFEST).exists():
            if not exist_ok:
                raise StoreError(f"a store already exists at {root}; open it or choose another path")
            return cls.open(root, fingerprint=fingerprint)
        root.mkdir(parents=True, exist_ok=True)
        (root / "shards").mkdir(exist_ok=True)
        now = time.time()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "config": dict(config or {}),
            "tensors": {k: v.to_json() for k, v in specs.items()},
            "sqlite": "chunks-0.sqlite",
            "shards": [],
            "aux": {},
            "num_rows": 0,
            "generation": 0,
            "created_at": now,
            "updated_at": now,
        }
        db = sqlite3.connect(root / manifest["sqlite"])
        db.executescript(_SCHEMA)
        db.commit()
        db.close()
        atomic_write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def read_manifest(cls, path: str | PathLike[str]) -> dict[str, Any]:
        """Parse and validate a manifest without opening shards (used by `load` to pick a class)."""
        mpath = Path(path) / MANIFEST
        if not mpath.exists():
            raise StoreNotFoundError(f"no encoded-chunk store at {Path(path)} (missing {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreCorruptedError(mpath, f"not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise StoreCorruptedError(mpath, f"not an {FORMAT_NAME} manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreVersionError(
                f"{mpath} has format version {version}; this library reads up to {FORMAT_VERSION}. "
                "Upgrade intrinsic-retrieval to open it."
            )
        for key in ("fingerprint", "tensors", "shards", "num_rows", "sqlite"):
            if key not in manifest:
                raise StoreCorruptedError(mpath, f"missing key {key!r}")
        return manifest

    @classmethod
    def open(
        cls,
        path: str | PathLike[str],
        *,
        fingerprint: str | None = None,
        read_only: bool = False,
    ) -> EncodedChunkStore:
        """Open memory-mapped. With `fingerprint`, refuse a store made by another model."""
        root = Path(path)
        manifest = cls.read_manifest(root)
        if fingerprint is not None and manifest["fingerprint"] != fingerprint:
            raise ModelMismatchError(root / MANIFEST, expected=fingerprint, found=manifest["fingerprint"])
        store = cls(root, manifest, read_only=read_only)
        for shard in manifest["shards"]:  # cheap size check: catches truncation at open
            spath = root / shard["file"]
            if not spath.exists():
                raise StoreCorruptedError(spath, "shard listed in the manifest is missing")
            if spath.stat().st_size != shard["bytes"]:
                raise StoreCorruptedError(
                    spath,
                    f"size is {spath.stat().st_size} bytes, manifest says {shard['bytes']} "
                    "(truncated or overwritten)",
                )
        if not read_only:
            store._recover()
        return store

    def _connect(self) -> sqlite3.Connection:
        dbpath = self.path / self._manifest["sqlite"]
        if not dbpath.exists():
            raise StoreCorruptedError(dbpath, "SQLite file listed in the manifest is missing")
        try:
            if self.read_only:
                db = sqlite3.connect(f"file:{dbpath}?mode=ro", uri=True, check_same_thread=False)
            else:
                db = sqlite3.connect(dbpath, check_same_thread=False)
            db.execute("SELECT count(*) FROM chunks").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptedError(dbpath, f"SQLite error: {exc}") from exc
        return db

    def _recover(self) -> None:
        """Drop what an interrupted write left behind: rows and files the manifest does not list."""
        n = self._manifest["num_rows"]
        with self._db:
            self._db.execute("DELETE FROM chunks WHERE row >= ?", (n,))
        (count,) = self._db.execute("SELECT count(*) FROM chunks").fetchone()
        if count != n:
            raise StoreCorruptedError(
                self.path / self._manifest["sqlite"], f"holds {count} rows, manifest says {n}"
            )
        keep = {self.path / s["file"] for s in self._manifest["shards"]}
        keep |= {self.path / a["file"] for a in self._manifest.get("aux", {}).values()}
        for folder in ("shards", "aux"):
            for f in (self.path / folder).glob("*") if (self.path / folder).exists() else []:
                if f not in keep:
                    f.unlink(missing_ok=True)
        live_db = self._manifest["sqlite"]
        for f in self.path.glob("chunks-*.sqlite*"):
            if f.name != live_db and not f.name.startswith(live_db):
                f.unlink(missing_ok=True)

    def close(self) -> None:
        self._db.close()
        self._shard_cache.clear()
        self._fixed_cache.clear()

    def __enter__(self) -> EncodedChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties
    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._manifest["config"])

    @property
    def num_rows(self) -> int:
        """Rows including tombstoned ones; row indices run over ``range(num_rows)``."""
        return int(self._manifest["num_rows"])

    def __len__(self) -> int:
        (n,) = self._db.execute("SELECT count(*) FROM chunks WHERE deleted = 0").fetchone()
        return int(n)

    def nbytes(self) -> int:
        """Bytes on disk (manifest, SQLite, shards, aux)."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")

    def _commit_manifest(self) -> None:
        self._manifest["updated_at"] = time.time()
        self._manifest["generation"] = int(self._manifest.get("generation", 0)) + 1
        atomic_write_json(self.path / MANIFEST, self._manifest)

    def set_config(self, config: Mapping[str, Any]) -> None:
        """Replace the retriever config recorded in the manifest."""
        self._require_writable()
        self._manifest["config"] = json.loads(json.dumps(dict(config)))
        self._commit_manifest()

    def _validate_tensors(
        self, n: int, tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        missing = set(self.specs) - set(tensors)
        extra = set(tensors) - set(self.specs)
        if missing or extra:
            raise DimensionMismatchError(
                f"tensors do not match the store specs: missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        out: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            value = tensors[name]
            if spec.kind == "fixed":
                t = value if isinstance(value, torch.Tensor) else torch.stack(list(value))
                if tuple(t.shape) != (n, *spec.shape):
                    raise DimensionMismatchError(
                        f"tensor {name!r} has shape {tuple(t.shape)}, expected {(n, *spec.shape)}"
                    )
                out[name] = t.to(spec.torch_dtype)
            else:
                rows = list(value) if not isinstance(value, torch.Tensor) else list(value.unbind(0))
                if len(rows) != n:
                    raise DimensionMismatchError(
                        f"varlen tensor {name!r} has {len(rows)} rows, expected {n}"
                    )
                for i, r in enumerate(rows):
                    if tuple(r.shape[1:]) != spec.shape or r.dim() != len(spec.shape) + 1:
                        raise DimensionMismatchError(
                            f"varlen tensor {name!r} row {i} has shape {tuple(r.shape)}, "
                            f"expected (len, {', '.join(map(str, spec.shape))})"
                        )
                lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int64)
                offsets = torch.zeros(n + 1, dtype=torch.int64)
                offsets[1:] = torch.cumsum(lengths, 0)
                flat = torch.cat([r.to(spec.torch_dtype) for r in rows], 0) if rows else torch.empty(
                    (0, *spec.shape), dtype=spec.torch_dtype
                )
                out[name] = flat
                out[f"{name}.offsets"] = offsets
        return out

    def append(
        self,
        chunks: Sequence[Chunk],
        tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    ) -> range:
        """Append rows without rewriting existing shards; returns the new row indices.

        Everything is validated before the first byte is written, so bad input leaves the store
        exactly as it was.
        """
        self._require_writable()
        n = len(chunks)
        if n == 0:
            return range(self.num_rows, self.num_rows)
        ids = [c.id for c in chunks]
        seen: set[str] = set()
        dup_batch = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        if dup_batch:
            raise DuplicateIdError(dup_batch, where="batch")
        existing = self.existing_chunk_ids(ids)
        if existing:
            raise DuplicateIdError(sorted(existing))
        records = [
            (c.id, c.document_id, c.text, _json_metadata(c.metadata, c.id), c.start, c.end)
            for c in chunks
        ]
        payload = self._validate_tensors(n, tensors)

        start = self.num_rows
        name = f"shards/shard-{start:09d}-{uuid.uuid4().hex[:8]}.safetensors"
        info = write_safetensors(self.path / name, payload, {"start": start, "rows": n})
        try:
            with self._db:
                self._db.executemany(
                    'INSERT INTO chunks (row, chunk_id, document_id, text, metadata, start, "end") '
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(start + i, *rec) for i, rec in enumerate(records)],
                )
            self._manifest["shards"].append({"file": name, "start": start, "rows": n, **info})
            self._manifest["num_rows"] = start + n
            self._commit_manifest()
        except BaseException:
            # roll back to the last committed manifest
            self._manifest = self.read_manifest(self.path)
            with self._db:
                self._db.execute("DELETE FROM chunks WHERE row >= ?", (self.num_rows,))
            (self.path / name).unlink(missing_ok=True)
            raise
        self._invalidate()
        return range(start, start + n)

    def existing_chunk_ids(self, ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        ids = list(ids)
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT chunk_id FROM chunks WHERE chunk_id IN ({','.join('?' * len(part))})"
            found.update(r[0] for r in self._db.execute(q, part))
        return found

    def existing_document_ids(self, ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        ids = list(ids)
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = (
                "SELECT DISTINCT document_id FROM chunks WHERE deleted = 0 AND "
                f"document_id IN ({','.join('?' * len(part))})"
            )
            found.update(r[0] for r in self._db.execute(q, part))
        return found

    def rows_for_ids(self, ids: Iterable[str]) -> list[int]:
        """Live rows whose chunk id or document id is in `ids` (document ids take all chunks)."""
        rows: set[int] = set()
        ids = list(ids)
        for i in range(0, len(ids), 400):
            part = ids[i : i + 400]
            marks = ",".join("?" * len(part))
            q = (
                f"SELECT row FROM chunks WHERE deleted = 0 AND "
                f"(chunk_id IN ({marks}) OR document_id IN ({marks}))"
            )
            rows.update(r[0] for r in self._db.execute(q, part + part))
        return sorted(rows)

    def delete(self, ids: Iterable[str], *, missing_ok: bool = True) -> list[int]:
        """Tombstone chunks by chunk id or document id; returns the rows removed.

        Tombstoned rows stay in the shards until `compact()`; they are excluded from `live_mask`.
        """
        self._require_writable()
        ids = [str(i) for i in ids]
        rows = self.rows_for_ids(ids)
        if not missing_ok:
            hit = {c.id for c in self.get(rows)} | {c.document_id for c in self.get(rows)}
            unknown = [i for i in ids if i not in hit]
            if unknown:
                raise UnknownIdError(f"unknown id(s): {unknown[:5]}")
        with self._db:
            self._db.executemany("UPDATE chunks SET deleted = 1 WHERE row = ?", [(r,) for r in rows])
        self._live_cache = None
        return rows

    def compact(self) -> dict[int, int]:
        """Rewrite live rows into one new shard and a new SQLite file; returns old->new rows.

        The new files are complete before the manifest switches to them; old files are removed
        only afterwards.
        """
        self._require_writable()
        live = self.live_rows()
        mapping = {int(old): new for new, old in enumerate(live.tolist())}
        chunks = self.get(live.tolist())
        tensors: dict[str, Any] = {}
        for name, spec in self.specs.items():
            if spec.kind == "fixed":
                tensors[name] = self.fixed(name)[live].clone()
            else:
                tensors[name] = [t.clone() for t in self.varlen(name, live.tolist())]
        old_files = [self.path / s["file"] for s in self._manifest["shards"]]
        old_db = self.path / self._manifest["sqlite"]
        gen = int(self._manifest.get("generation", 0)) + 1
        new_db_name = f"chunks-{gen}.sqlite"
        new_db_path = self.path / new_db_name
        new_db_path.unlink(missing_ok=True)
        db = sqlite3.connect(new_db_path)
        db.executescript(_SCHEMA)
        with db:
            db.executemany(
                'INSERT INTO chunks (row, chunk_id, document_id, text, metadata, start, "end") '
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (i, c.id, c.document_id, c.text, _json_metadata(c.metadata, c.id), c.start, c.end)
                    for i, c in enumerate(chunks)
                ],
            )
        db.close()
        new_shards = []
        if chunks:
            payload = self._validate_tensors(len(chunks), tensors)
            name = f"shards/shard-{0:09d}-{uuid.uuid4().hex[:8]}.safetensors"
            info = write_safetensors(self.path / name, payload, {"start": 0, "rows": len(chunks)})
            new_shards.append({"file": name, "start": 0, "rows": len(chunks), **info})
        self._db.close()
        self._manifest["shards"] = new_shards
        self._manifest["sqlite"] = new_db_name
        self._manifest["num_rows"] = len(chunks)
        self._commit_manifest()
        self._db = self._connect()
        self._shard_cache.clear()
        for f in [*old_files, old_db]:
            f.unlink(missing_ok=True)
        self._invalidate()
        return mapping

    # ------------------------------------------------------------------ aux tensors / JSON
    def put_aux(self, name: str, tensors: Mapping[str, torch.Tensor], meta: dict | None = None) -> None:
        """Store non-row tensors (a trained head, statistics) atomically under `aux/`."""
        self._require_writable()
        if not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidInputError(f"aux name must be alphanumeric with - or _, got {name!r}")
        fname = f"aux/{name}-{uuid.uuid4().hex[:8]}.safetensors"
        info = write_safetensors(self.path / fname, dict(tensors))
        old = self._manifest.setdefault("aux", {}).get(name)
        self._manifest["aux"][name] = {"file": fname, "meta": dict(meta or {}), **info}
        self._commit_manifest()
        if old:
            (self.path / old["file"]).unlink(missing_ok=True)

    def get_aux(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        entry = self._manifest.get("aux", {}).get(name)
        if entry is None:
            return None
        tensors = mmap_safetensors(self.path / entry["file"], expected_bytes=entry["bytes"])
        return tensors, dict(entry.get("meta", {}))

    # ------------------------------------------------------------------ reading tensors
    def _invalidate(self) -> None:
        self._fixed_cache.clear()
        self._live_cache = None

    def _shard(self, shard: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        f = shard["file"]
        if f not in self._shard_cache:
            self._shard_cache[f] = mmap_safetensors(self.path / f, expected_bytes=shard["bytes"])
        return self._shard_cache[f]

    def _spec(self, name: str, kind: str) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None or spec.kind != kind:
            raise InvalidInputError(f"store has no {kind} tensor named {name!r}")
        return spec

    def fixed(self, name: str) -> torch.Tensor:
        """All rows of a fixed-size tensor, ``(num_rows, *shape)``, tombstones included.

        One shard is returned as a zero-copy memory map; several are concatenated once and cached.
        """
        spec = self._spec(name, "fixed")
        if name not in self._fixed_cache:
            parts = [self._shard(s)[name] for s in self._manifest["shards"]]
            if not parts:
                t = torch.empty((0, *spec.shape), dtype=spec.torch_dtype)
            elif len(parts) == 1:
                t = parts[0]
            else:
                t = torch.cat(parts, 0)
            self._fixed_cache[name] = t
        return self._fixed_cache[name]

    def _locate(self, row: int) -> tuple[Mapping[str, Any], int]:
        shards = self._manifest["shards"]
        starts = [s["start"] for s in shards]
        idx = int(np.searchsorted(starts, row, side="right")) - 1
        if idx < 0 or row >= self.num_rows:
            raise UnknownIdError(f"row {row} is out of range (store has {self.num_rows} rows)")
        return shards[idx], row - shards[idx]["start"]

    def varlen(self, name: str, rows: Iterable[int]) -> list[torch.Tensor]:
        """Per-row views ``(len_i, *shape)`` of a variable-length tensor."""
        self._spec(name, "varlen")
        out = []
        for row in rows:
            shard, local = self._locate(int(row))
            data = self._shard(shard)
            offsets = data[f"{name}.offsets"]
            out.append(data[name][int(offsets[local]) : int(offsets[local + 1])])
        return out

    def varlen_lengths(self, name: str) -> torch.Tensor:
        self._spec(name, "varlen")
        parts = [torch.diff(self._shard(s)[f"{name}.offsets"]) for s in self._manifest["shards"]]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------ reading rows
    def live_mask(self) -> torch.Tensor:
        """Boolean ``(num_rows,)``: True for rows that are not tombstoned."""
        if self._live_cache is None:
            mask = torch.zeros(self.num_rows, dtype=torch.bool)
            rows = [r for (r,) in self._db.execute("SELECT row FROM chunks WHERE deleted = 0")]
            if rows:
                mask[torch.tensor(rows, dtype=torch.long)] = True
            self._live_cache = mask
        return self._live_cache

    def live_rows(self) -> torch.Tensor:
        return torch.nonzero(self.live_mask(), as_tuple=False).flatten()

    def candidate_mask(self, flt: Mapping[str, Any] | None) -> torch.Tensor:
        """Live rows that pass a metadata filter (see `intrinsic_retrieval.filters`)."""
        if not flt:
            return self.live_mask()
        where, params = compile_filter(dict(flt))
        mask = torch.zeros(self.num_rows, dtype=torch.bool)
        try:
            rows = [
                r
                for (r,) in self._db.execute(
                    f"SELECT row FROM chunks WHERE deleted = 0 AND {where}", params
                )
            ]
        except sqlite3.Error as exc:
            from ..errors import InvalidFilterError

            raise InvalidFilterError(f"filter {dict(flt)!r} could not be evaluated: {exc}") from exc
        if rows:
            mask[torch.tensor(rows, dtype=torch.long)] = True
        return mask

    def get(self, rows: Iterable[int]) -> list[Chunk]:
        """Chunks for rows, in the order given."""
        rows = [int(r) for r in rows]
        found: dict[int, Chunk] = {}
        for i in range(0, len(rows), 500):
            part = rows[i : i + 500]
            q = (
                'SELECT row, chunk_id, document_id, text, metadata, start, "end" FROM chunks '
                f"WHERE row IN ({','.join('?' * len(part))})"
            )
            for row, cid, did, text, meta, s, e in self._db.execute(q, part):
                found[row] = Chunk(cid, did, text, json.loads(meta), s, e)
        missing = [r for r in rows if r not in found]
        if missing:
            raise UnknownIdError(f"rows not in store: {missing[:5]}")
        return [found[r] for r in rows]

    def row_of(self, chunk_id: str) -> int:
        r = self._db.execute("SELECT row FROM chunks WHERE chunk_id = ?", (chunk_id,)).fetchone()
        if r is None:
            raise UnknownIdError(f"unknown chunk id {chunk_id!r}")
        return int(r[0])

    def iter_chunks(self, *, live_only: bool = True) -> Iterable[tuple[int, Chunk]]:
        q = 'SELECT row, chunk_id, document_id, text, metadata, start, "end" FROM chunks'
        if live_only:
            q += " WHERE deleted = 0"
        for row, cid, did, text, meta, s, e in self._db.execute(q + " ORDER BY row"):
            yield int(row), Chunk(cid, did, text, json.loads(meta), s, e)

    # ------------------------------------------------------------------ integrity and copying
    def verify(self) -> None:
        """Check every file against its manifest checksum and SQLite integrity; raise on the
        first problem, naming the file."""
        for entry in [*self._manifest["shards"], *self._manifest.get("aux", {}).values()]:
            f = self.path / entry["file"]
            if not f.exists():
                raise StoreCorruptedError(f, "file is missing")
            if f.stat().st_size != entry["bytes"]:
                raise StoreCorruptedError(f, f"size {f.stat().st_size} != manifest {entry['bytes']}")
            if file_sha256(f) != entry["sha256"]:
                raise StoreCorruptedError(f, "sha256 checksum does not match the manifest")
            mmap_safetensors(f, expected_bytes=entry["bytes"])
        (res,) = self._db.execute("PRAGMA integrity_check").fetchone()
        if res != "ok":
            raise StoreCorruptedError(self.path / self._manifest["sqlite"], f"SQLite: {res}")

    def copy_to(self, dest: str | PathLike[str], *, overwrite: bool = True) -> Path:
        """Copy the committed store to `dest` atomically (a complete directory appears at once)."""
        dest = Path(dest)
        if dest.resolve() == self.path.resolve():
            return dest
        if dest.exists() and not overwrite:
            raise StoreError(f"{dest} exists")
        if dest.exists() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
            raise StoreError(f"refusing to overwrite {dest}: it exists and is not a store")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            files = [self._manifest["sqlite"], *(s["file"] for s in self._manifest["shards"])]
            files += [a["file"] for a in self._manifest.get("aux", {}).values()]
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                if rel == self._manifest["sqlite"]:
                    with sqlite3.connect(tmp / rel) as out:
                        self._db.backup(out)
                    out.close()
                else:
                    shutil.copyfile(self.path / rel, tmp / rel)
            (tmp / "shards").mkdir(exist_ok=True)
            atomic_write_json(tmp / MANIFEST, self._manifest)
            if dest.exists():
                backup = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:6]}")
                dest.rename(backup)
                tmp.rename(dest)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest
