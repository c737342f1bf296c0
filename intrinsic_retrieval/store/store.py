"""The encoded-chunk store: one on-disk format for every retriever (docs/store-format.md).

Layout of a store directory::

    manifest.json            commit point: format version, model fingerprint, tensor specs,
                             retriever config, shard list with sizes and sha256, aux entries
    chunks-<gen>.sqlite      chunk ids, document ids, texts, JSON metadata, tombstones
    shards/*.safetensors     per-row tensors, one file per append (fixed-size rows, or
                             variable-length rows flattened with a `<name>.offsets` table)
    aux/<name>-*.safetensors tensors that are not per row (trained heads, statistics)
    .lock                    the single-writer lock (empty)

Write protocol: new files first (temp + rename), the manifest last; existing shards are never
modified. A crash therefore leaves the previous commit readable, and what it did not commit (shard
files the manifest does not list, SQLite rows at or beyond ``num_rows``) is ignored by readers and
deleted by the next writable open.

Concurrency: one writer, many readers. A handle takes the per-store writer lock (`lock.py`) at its
first write and keeps it until `close()`; a second process that tries to write gets
`ConcurrentWriteError`. Every write also checks that the manifest on disk is still the one this
handle committed or opened, so a stale handle (another handle of the same process wrote, or the
store was replaced by `copy_to`) refuses to write instead of losing data. Readers see the manifest
that was current when they opened it: rows appended later stay invisible until they reopen, shards
stay mapped even after a compaction deletes their files. Tombstones are the exception: they live
in SQLite, so deletions committed by the writer show up in readers at once (until the writer
compacts; a reader then keeps the pre-compaction tombstones until it reopens).

``open(read_only=True)`` guarantees that nothing in the directory is created, changed or deleted
(no lock file, no crash recovery, SQLite opened ``mode=ro``), and that every mutating method raises
`StoreError`. Returned tensors are private copy-on-write mappings: writing into them changes this
process's view only, never the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, suppress
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import (
    ConcurrentWriteError,
    DuplicateIdError,
    IdCollisionError,
    InvalidFilterError,
    InvalidInputError,
    ModelMismatchError,
    StoreCorruptedError,
    StoreError,
    StorePermissionError,
    StoreRecoveryNeededError,
    UnknownIdError,
)
from ..filters import compile_filter
from ..types import Chunk
from . import lock
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    TensorSpec,
    check_name,
    json_copy,
    read_manifest,
    validate_manifest,
)
from .rows import chunk_record, json_metadata, shard_payload
from .shards import (
    MappedFile,
    atomic_write_json,
    file_sha256,
    fsync_dir,
    user_mode,
    write_safetensors,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "EncodedChunkStore", "TensorSpec"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    row INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    start INTEGER NOT NULL DEFAULT 0,
    "end" INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS chunks_live_id ON chunks(chunk_id) WHERE deleted = 0;
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id);
"""
_COLUMNS = 'row, chunk_id, document_id, text, metadata, start, "end"'
_INSERT = f"INSERT INTO chunks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_BATCH = 500  # ids per IN (...) query, well under SQLite's variable limit
#: default size of the shards `compact()` writes (it holds about this much in memory at once)
COMPACT_SHARD_BYTES = 256 << 20


def _uid() -> str:
    return uuid.uuid4().hex[:16]


def _remove_orphans(root: Path, manifest: Mapping[str, Any]) -> None:
    """Delete what no commit refers to: unlisted shards/aux files, other SQLite files, temps."""
    keep = {root / s["file"] for s in manifest["shards"]}
    keep |= {root / a["file"] for a in manifest.get("aux", {}).values()}
    for folder in ("shards", "aux"):
        d = root / folder
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and f not in keep:
                    f.unlink(missing_ok=True)
    live = manifest["sqlite"]
    live_files = {live, f"{live}-journal", f"{live}-wal", f"{live}-shm"}
    for f in root.glob("chunks-*.sqlite*"):
        if f.name not in live_files:
            f.unlink(missing_ok=True)
    for pattern in (f".{MANIFEST}.*.tmp", ".chunks-*.tmp"):
        for f in root.glob(pattern):
            f.unlink(missing_ok=True)


def rows_digest(conn: sqlite3.Connection, start: int, n: int) -> str:
    """sha256 of rows ``[start, start + n)`` as SQLite holds them (ids, text, metadata, span;
    not the tombstone flag, which `delete` changes): what `verify` compares with the digest the
    manifest recorded when the rows were written."""
    h = hashlib.sha256()
    q = f"SELECT {_COLUMNS} FROM chunks WHERE row >= ? AND row < ? ORDER BY row"
    for rec in conn.execute(q, (start, start + n)):
        h.update(json.dumps(rec, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def _roll_back_hot_journal(dbpath: Path) -> None:
    """A write killed mid-transaction leaves a "hot" rollback journal that only a writable
    connection may roll back; a read-only open would call a healthy store corrupted. When the
    files are writable, a short writable connection rolls it back (SQLite does so only if no
    live writer holds the journal), so readers are not refused."""
    journal = Path(f"{dbpath}-journal")
    try:
        if not journal.is_file() or journal.stat().st_size == 0:
            return
        if not (os.access(dbpath, os.W_OK) and os.access(dbpath.parent, os.W_OK)):
            raise StoreRecoveryNeededError(dbpath)
        with closing(sqlite3.connect(dbpath, timeout=5.0)) as conn:
            conn.execute("SELECT count(*) FROM chunks").fetchone()
    except (OSError, sqlite3.Error):
        return  # the normal open reports what is really wrong


class EncodedChunkStore:
    """Chunks, their metadata and their tensors on disk; see the module docstring for the
    layout, the write protocol and the concurrency rules."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._mutex = threading.RLock()
        self._lock_key: str | None = None
        self._release: weakref.finalize | None = None
        self._conn: sqlite3.Connection | None = None
        manifest = validate_manifest(manifest, self.path / MANIFEST)
        specs = {k: TensorSpec.from_json(v) for k, v in manifest["tensors"].items()}
        conn = self._connect(manifest["sqlite"])
        try:
            self._check_rows(conn, manifest)
            maps = {s["file"]: self._map_shard(s, specs) for s in manifest["shards"]}
        except BaseException:
            conn.close()
            raise
        self._install(manifest, specs, conn, maps)

    def _install(
        self,
        manifest: dict[str, Any],
        specs: dict[str, TensorSpec],
        conn: sqlite3.Connection,
        maps: dict[str, MappedFile],
    ) -> None:
        self._manifest = manifest
        self.specs = specs
        self._conn = conn
        self._maps = maps
        self._starts = np.array([s["start"] for s in manifest["shards"]], dtype=np.int64)
        self._fixed_cache: dict[str, torch.Tensor] = {}
        self._live_cache: torch.Tensor | None = None
        self._data_version: int | None = None

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
        """Create an empty store. `config` is whatever the retriever needs to rebuild itself.

        With ``exist_ok=True`` an existing store is opened instead, provided it was made by the
        same `fingerprint` (else `ModelMismatchError`) with the same `specs` (else `StoreError`).
        """
        root = Path(path)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise InvalidInputError("fingerprint must be a non-empty str")
        if not isinstance(specs, Mapping):
            raise InvalidInputError("specs must map tensor names to TensorSpec")
        for name, spec in specs.items():
            check_name(name, "tensor")
            if not isinstance(spec, TensorSpec):
                raise InvalidInputError(f"spec {name!r} must be a TensorSpec, got {spec!r}")
        if config is not None and not isinstance(config, Mapping):
            raise InvalidInputError(f"config must be a mapping, got {type(config).__name__}")
        config = json_copy(dict(config or {}), "store config")
        if (root / MANIFEST).exists():
            if not exist_ok:
                raise StoreError(
                    f"a store already exists at {root}; open it or choose another path"
                )
            store = cls.open(root, fingerprint=fingerprint)
            if store.specs != dict(specs):
                store.close()
                raise StoreError(
                    f"{root / MANIFEST} holds tensors {store.manifest['tensors']}, not the "
                    "requested specs; use another path"
                )
            return store
        if root.exists() and not root.is_dir():
            raise StoreError(f"cannot create a store at {root}: it is a file")
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / "shards").mkdir(exist_ok=True)
        except PermissionError:
            raise StorePermissionError(root, "create") from None
        except (NotADirectoryError, FileExistsError):
            raise StoreError(f"cannot create a store at {root}: a parent is a file") from None
        except OSError as exc:
            raise StoreError(f"cannot create a store at {root}: {exc.strerror or exc}") from None
        key = lock.acquire(root)
        try:
            now = time.time()
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "config": config,
                "tensors": {k: v.to_json() for k, v in specs.items()},
                "sqlite": "chunks-0.sqlite",
                "shards": [],
                "aux": {},
                "num_rows": 0,
                "generation": 0,
                "commit_id": _uid(),
                "created_at": now,
                "updated_at": now,
            }
            for suffix in ("", "-journal", "-wal", "-shm"):  # leftovers of a crashed create
                (root / f"chunks-0.sqlite{suffix}").unlink(missing_ok=True)
            with closing(sqlite3.connect(root / manifest["sqlite"])) as db:
                db.executescript(_SCHEMA)
                db.commit()
            atomic_write_json(root / MANIFEST, manifest)
        finally:
            lock.release(key)
        return cls(root, manifest)

    @classmethod
    def read_manifest(cls, path: str | PathLike[str]) -> dict[str, Any]:
        """Parse and validate a manifest without opening anything else (used by `load` to pick
        a retriever class). Raises `StoreNotFoundError`, `StoreVersionError` or
        `StoreCorruptedError`."""
        return read_manifest(Path(path))

    @classmethod
    def open(
        cls,
        path: str | PathLike[str],
        *,
        fingerprint: str | None = None,
        read_only: bool = False,
    ) -> EncodedChunkStore:
        """Open memory-mapped (shard headers are read, shard data is not).

        With `fingerprint`, refuse a store made by another model (`ModelMismatchError`). A
        writable open also finishes crash recovery when no writer is active.
        """
        root = Path(path)
        for attempt in range(5):
            manifest = read_manifest(root)
            if fingerprint is not None and manifest["fingerprint"] != fingerprint:
                raise ModelMismatchError(
                    root / MANIFEST,
                    expected=fingerprint,
                    found=manifest["fingerprint"],
                    what="model and recipe",
                    hint="open it with the model and index options it was built with (its "
                    "manifest's config) or rebuild the index",
                )
            try:
                store = cls(root, manifest, read_only=read_only)
            except StoreCorruptedError:
                # a writer may have compacted between our reading the manifest and its files
                try:
                    again = read_manifest(root)
                except Exception:
                    again = manifest
                if again == manifest or attempt == 4:
                    raise
                continue
            break
        if not read_only:
            store._recover()
        return store

    def _connect(self, name: str) -> sqlite3.Connection:
        dbpath = self.path / name
        if not dbpath.is_file():
            raise StoreCorruptedError(dbpath, "SQLite file listed in the manifest is missing")
        if not os.access(dbpath, os.R_OK if self.read_only else os.R_OK | os.W_OK):
            raise StorePermissionError(dbpath, "read" if self.read_only else "read and write")
        conn: sqlite3.Connection | None = None
        if self.read_only:
            _roll_back_hot_journal(dbpath)
        try:
            if self.read_only:
                uri = dbpath.resolve().as_uri() + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                conn = sqlite3.connect(dbpath, check_same_thread=False)
            conn.execute(f"SELECT {_COLUMNS}, deleted FROM chunks LIMIT 0").fetchall()
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreCorruptedError(dbpath, f"SQLite error: {exc}") from exc
        return conn

    def _check_rows(self, conn: sqlite3.Connection, manifest: Mapping[str, Any]) -> None:
        n = manifest["num_rows"]
        dbpath = self.path / manifest["sqlite"]
        try:
            (count,) = conn.execute(
                "SELECT count(*) FROM chunks WHERE row >= 0 AND row < ?", (n,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StoreCorruptedError(dbpath, f"SQLite error: {exc}") from exc
        if count != n:
            raise StoreCorruptedError(dbpath, f"holds {count} committed rows, manifest says {n}")

    def _map_shard(self, entry: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> MappedFile:
        """Map one shard and check its header against the specs (reads no tensor data beyond
        the two ends of each offsets table)."""
        path = self.path / entry["file"]
        mapped = MappedFile(path, expected_bytes=entry["bytes"])
        rows = entry["rows"]
        for name, spec in specs.items():
            t = mapped.tensors.get(name)
            if t is None:
                raise StoreCorruptedError(path, f"tensor {name!r} is missing")
            if t.dtype != spec.torch_dtype:
                raise StoreCorruptedError(
                    path, f"tensor {name!r} is {t.dtype}, spec says {spec.dtype}"
                )
            if spec.kind == "fixed":
                want = (rows, *spec.shape)
                if tuple(t.shape) != want:
                    raise StoreCorruptedError(
                        path, f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}"
                    )
                continue
            off = mapped.tensors.get(f"{name}.offsets")
            if off is None or off.dtype != torch.int64 or tuple(off.shape) != (rows + 1,):
                raise StoreCorruptedError(
                    path, f"offsets table of {name!r} is missing or misshapen"
                )
            if t.dim() != len(spec.shape) + 1 or tuple(t.shape[1:]) != spec.shape:
                raise StoreCorruptedError(path, f"tensor {name!r} has shape {tuple(t.shape)}")
            if int(off[0]) != 0 or int(off[-1]) != t.shape[0]:
                raise StoreCorruptedError(path, f"offsets table of {name!r} does not span its data")
        return mapped

    def _recover(self) -> None:
        """Drop what an interrupted write left behind (rows and files the manifest does not
        list); only when no writer is active, since those could be its uncommitted work."""
        key = lock.try_exclusive(self.path)
        if key is None:
            return
        try:
            if read_manifest(self.path) != self._manifest:
                return  # committed by someone in between: this handle is stale, leave it be
            with self._mutex, self._db:
                self._db.execute("DELETE FROM chunks WHERE row >= ?", (self.num_rows,))
            _remove_orphans(self.path, self._manifest)
        except (OSError, sqlite3.Error, StoreError):
            pass  # recovery is an optimisation: readers already ignore uncommitted leftovers
        finally:
            lock.release(key)

    def close(self) -> None:
        """Close SQLite, drop the mappings and release the writer lock. Idempotent."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._maps = {}
            self._fixed_cache = {}
            self._live_cache = None
            if self._release is not None:
                self._release()
                self._release = None
                self._lock_key = None

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"rows={self.num_rows}"
        mode = ", read_only=True" if self.read_only else ""
        return f"EncodedChunkStore({str(self.path)!r}, {state}{mode})"

    def __enter__(self) -> EncodedChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._conn is None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._mutex:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ properties
    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the committed manifest this handle sees."""
        return json.loads(json.dumps(self._manifest))

    @property
    def fingerprint(self) -> str:
        return self._manifest["fingerprint"]

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest["config"]))

    @property
    def num_rows(self) -> int:
        """Rows including tombstoned ones; row indices run over ``range(num_rows)``."""
        return int(self._manifest["num_rows"])

    def __len__(self) -> int:
        """Live (not tombstoned) chunks."""
        ((n,),) = self._query(
            "SELECT count(*) FROM chunks WHERE deleted = 0 AND row < ?", (self.num_rows,)
        )
        return int(n)

    def nbytes(self) -> int:
        """Bytes on disk of the committed files (manifest, SQLite, shards, aux)."""
        files = [MANIFEST, self._manifest["sqlite"], *(s["file"] for s in self._manifest["shards"])]
        files += [a["file"] for a in self._manifest.get("aux", {}).values()]
        total = 0
        for f in files:
            with suppress(FileNotFoundError):
                total += (self.path / f).stat().st_size
        return total

    def shard_nbytes(self) -> int:
        """Bytes of the committed tensor shards (offsets and safetensors headers included)."""
        return sum(int(s["bytes"]) for s in self._manifest["shards"])

    def tensor_nbytes(self, name: str) -> int:
        """Bytes of tensor `name`'s elements over all rows (tombstoned ones until `compact`)."""
        spec = self.specs.get(name)
        if spec is None:
            raise InvalidInputError(f"store has no tensor named {name!r}")
        rows = int(self.varlen_lengths(name).sum()) if spec.kind == "varlen" else self.num_rows
        return rows * math.prod(spec.shape) * spec.torch_dtype.itemsize

    # ------------------------------------------------------------------ write plumbing
    def _begin_write(self) -> None:
        """Take the writer lock and make sure this handle is not stale."""
        self._db  # noqa: B018 - raises if closed
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")
        if self._lock_key is None:
            key = lock.acquire(self.path)
            self._lock_key = key
            self._release = weakref.finalize(self, lock.release, key)
        on_disk = read_manifest(self.path)
        if on_disk != self._manifest:
            raise ConcurrentWriteError(
                f"{self.path / MANIFEST} was committed by another handle since this one opened it; "
                "reopen the store"
            )

    def _commit(self, manifest: dict[str, Any]) -> None:
        """Write `manifest` as the new commit point; in-memory state changes only once the
        rename happened (also when an interrupt arrives just after it: callers then see
        ``self._manifest`` changed and must not roll back)."""
        manifest = dict(manifest)
        manifest["updated_at"] = time.time()
        manifest["generation"] = int(self._manifest.get("generation", 0)) + 1
        manifest["commit_id"] = _uid()
        try:
            atomic_write_json(self.path / MANIFEST, manifest)
        except BaseException:
            with suppress(Exception):
                if read_manifest(self.path).get("commit_id") == manifest["commit_id"]:
                    self._manifest = manifest
            raise
        self._manifest = manifest

    def _next_manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    def set_config(self, config: Mapping[str, Any]) -> None:
        """Replace the retriever config recorded in the manifest."""
        with self._mutex:
            self._begin_write()
            if not isinstance(config, Mapping):
                raise InvalidInputError(f"config must be a mapping, got {type(config).__name__}")
            new = self._next_manifest()
            new["config"] = json_copy(dict(config), "store config")
            self._commit(new)

    # ------------------------------------------------------------------ appending and deleting
    def append(
        self,
        chunks: Sequence[Chunk],
        tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    ) -> range:
        """Append rows as one new shard (old shards are never rewritten); returns their indices.

        Everything is validated before the first byte is written, and a failure while writing
        rolls back to the last commit, so bad input or an interrupted append leaves the store
        exactly as it was.
        """
        with self._mutex:
            self._begin_write()
            chunks = list(chunks)
            n = len(chunks)
            start = self.num_rows
            if n == 0:
                return range(start, start)
            records = [chunk_record(c) for c in chunks]
            ids = [r[0] for r in records]
            seen: set[str] = set()
            dup_batch = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
            if dup_batch:
                raise DuplicateIdError(dup_batch, where="batch")
            existing = self.existing_chunk_ids(ids)
            if existing:
                raise DuplicateIdError(sorted(existing))
            self._check_id_collisions(records)
            payload = shard_payload(self.specs, n, tensors)

            name = f"shards/shard-{start:09d}-{_uid()}.safetensors"
            info = write_safetensors(
                self.path / name, payload, {"format": FORMAT_NAME, "start": start, "rows": n}
            )
            entry = {"file": name, "start": start, "rows": n, **info}
            new = self._next_manifest()
            new["shards"].append(entry)
            new["num_rows"] = start + n
            before = self._manifest
            mapped: MappedFile | None = None
            try:
                mapped = self._map_shard(entry, self.specs)
                with self._db:
                    self._db.execute("DELETE FROM chunks WHERE row >= ?", (start,))
                    self._db.executemany(_INSERT, [(start + i, *r) for i, r in enumerate(records)])
                entry["rows_sha256"] = rows_digest(self._db, start, n)
                self._commit(new)
            except BaseException as exc:
                if self._manifest is not before and mapped is not None:
                    # the commit landed just before the interruption: keep it
                    self._added_shard(name, mapped, start)
                    raise
                # if this fails too, the next writable open drops these rows
                with suppress(sqlite3.Error), self._db:
                    self._db.execute("DELETE FROM chunks WHERE row >= ?", (start,))
                (self.path / name).unlink(missing_ok=True)
                if isinstance(exc, sqlite3.IntegrityError):
                    raise DuplicateIdError(ids, where="store (SQLite)") from exc
                raise
            self._added_shard(name, mapped, start)
            return range(start, start + n)

    def _check_id_collisions(self, records: Sequence[tuple]) -> None:
        """Refuse chunk ids equal to another document's id and document ids equal to another
        document's chunk id, in the batch or against live rows: otherwise `delete(id)` would
        remove both (a chunk id equal to its own document's id is unambiguous and allowed)."""
        doc_of = {r[0]: r[1] for r in records}  # chunk id -> its document id (this batch)
        docs = {r[1] for r in records}
        clashes: list[tuple[str, str]] = []
        clashes += [(c, "a chunk id here, a document id in this batch")
                    for c, d in doc_of.items() if c in docs and c != d]  # fmt: skip
        clashes += [(d, "a document id here, a chunk id of another document in this batch")
                    for d in docs if d in doc_of and doc_of[d] != d]  # fmt: skip
        for c in sorted(self.existing_document_ids(doc_of)):
            if doc_of[c] != c:
                clashes.append((c, "a chunk id here, a document id in the store"))
        for part in range(0, len(docs), _BATCH):
            chunk = sorted(docs)[part : part + _BATCH]
            q = (
                "SELECT chunk_id, document_id FROM chunks WHERE deleted = 0 AND row < ? AND "
                f"chunk_id IN ({','.join('?' * len(chunk))})"
            )
            for cid, did in self._query(q, [self.num_rows, *chunk]):
                if cid != did:
                    clashes.append((cid, "a document id here, a chunk id in the store"))
        if clashes:
            raise IdCollisionError(sorted(set(clashes)))

    def _added_shard(self, name: str, mapped: MappedFile, start: int) -> None:
        self._maps[name] = mapped
        self._starts = np.append(self._starts, start)
        self._invalidate()

    def existing_chunk_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of `ids` are live chunk ids (tombstoned ids may be added again)."""
        return self._existing("chunk_id", ids)

    def existing_document_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of `ids` are document ids with at least one live chunk."""
        return self._existing("document_id", ids)

    def _existing(self, column: str, ids: Iterable[str]) -> set[str]:
        found: set[str] = set()
        ids = [str(i) for i in ids]
        for i in range(0, len(ids), _BATCH):
            part = ids[i : i + _BATCH]
            q = (
                f"SELECT DISTINCT {column} FROM chunks WHERE deleted = 0 AND row < ? AND "
                f"{column} IN ({','.join('?' * len(part))})"
            )
            found.update(r[0] for r in self._query(q, [self.num_rows, *part]))
        return found

    def rows_for_ids(self, ids: Iterable[str]) -> list[int]:
        """Live rows whose chunk id or document id is in `ids` (a document id takes all its
        chunks), sorted."""
        if isinstance(ids, str):
            ids = [ids]
        rows: set[int] = set()
        ids = [str(i) for i in ids]
        for i in range(0, len(ids), _BATCH):
            part = ids[i : i + _BATCH]
            marks = ",".join("?" * len(part))
            q = (
                "SELECT row FROM chunks WHERE deleted = 0 AND row < ? AND "
                f"(chunk_id IN ({marks}) OR document_id IN ({marks}))"
            )
            rows.update(r[0] for r in self._query(q, [self.num_rows, *part, *part]))
        return sorted(rows)

    def rows_by_id(self, ids: Iterable[str]) -> dict[str, list[int]]:
        """Live rows of each of `ids`, sorted (a chunk id: its row; a document id: all its
        chunks); ids with no live row are absent."""
        if isinstance(ids, str):
            ids = [ids]
        wanted = [str(i) for i in ids]
        out: dict[str, set[int]] = {}
        for i in range(0, len(wanted), _BATCH):
            part = wanted[i : i + _BATCH]
            keys = set(part)
            marks = ",".join("?" * len(part))
            q = (
                "SELECT row, chunk_id, document_id FROM chunks WHERE deleted = 0 AND row < ? AND "
                f"(chunk_id IN ({marks}) OR document_id IN ({marks}))"
            )
            for row, cid, did in self._query(q, [self.num_rows, *part, *part]):
                for key in {cid, did} & keys:
                    out.setdefault(key, set()).add(int(row))
        return {k: sorted(v) for k, v in out.items()}

    def document_ids(self) -> set[str]:
        """Ids of the documents with at least one live chunk."""
        q = "SELECT DISTINCT document_id FROM chunks WHERE deleted = 0 AND row < ?"
        return {r[0] for r in self._query(q, [self.num_rows])}

    def delete(self, ids: Iterable[str], *, missing_ok: bool = True) -> list[int]:
        """Tombstone chunks by chunk id or document id; returns the rows removed.

        Tombstoned rows stay in the shards until `compact()`; they leave `live_mask`, `len`,
        filters and id lookups at once. With ``missing_ok=False`` an id that matches no live
        chunk raises `UnknownIdError` and nothing is deleted.
        """
        with self._mutex:
            self._begin_write()
            if isinstance(ids, str):
                ids = [ids]
            ids = [str(i) for i in ids]
            rows = self.rows_for_ids(ids)
            if not missing_ok:
                hit: set[str] = set()
                for c in self.get(rows):
                    hit.update((c.id, c.document_id))
                unknown = [i for i in ids if i not in hit]
                if unknown:
                    raise UnknownIdError(f"unknown id(s): {unknown[:5]}")
            with self._db:
                self._db.executemany(
                    "UPDATE chunks SET deleted = 1 WHERE row = ?", [(r,) for r in rows]
                )
            self._live_cache = None
            return rows

    def compact(self, *, max_shard_bytes: int = COMPACT_SHARD_BYTES) -> dict[int, int]:
        """Rewrite the live rows into new shards and a new SQLite file; returns old -> new rows.

        New files are complete before the manifest switches to them and old ones are removed
        only afterwards, so a crash at any point leaves either the old or the new store. Memory
        use is bounded by about `max_shard_bytes`. A store without tombstones and with at most
        one shard is left as it is (identity mapping).
        """
        with self._mutex:
            self._begin_write()
            live = self.live_rows().tolist()
            mapping = {int(old): new for new, old in enumerate(live)}
            if len(live) == self.num_rows and len(self._manifest["shards"]) <= 1:
                return mapping
            gen = int(self._manifest.get("generation", 0)) + 1
            db_name = f"chunks-{gen}-{_uid()}.sqlite"
            old_files = [self.path / s["file"] for s in self._manifest["shards"]]
            old_db = self.path / self._manifest["sqlite"]
            created: list[Path] = [self.path / db_name]
            conn: sqlite3.Connection | None = None
            before = self._manifest
            try:
                self._write_compacted_db(self.path / db_name, live)
                shards = self._write_compacted_shards(live, max_shard_bytes, created)
                with closing(sqlite3.connect(self.path / db_name)) as db:
                    for entry in shards:
                        entry["rows_sha256"] = rows_digest(db, entry["start"], entry["rows"])
                new = self._next_manifest()
                new.update(shards=shards, sqlite=db_name, num_rows=len(live))
                maps = {s["file"]: self._map_shard(s, self.specs) for s in shards}
                conn = self._connect(db_name)
                self._commit(new)
            except BaseException:
                if self._manifest is not before and conn is not None:
                    self._switch_to(conn, maps, [*old_files, old_db])  # committed after all
                    raise
                if conn is not None:
                    conn.close()
                for f in created:
                    f.unlink(missing_ok=True)
                raise
            self._switch_to(conn, maps, [*old_files, old_db])
            return mapping

    def _switch_to(
        self, conn: sqlite3.Connection, maps: dict[str, MappedFile], old_files: list[Path]
    ) -> None:
        """Install a committed compaction and delete the files it replaced."""
        self._db.close()
        self._install(self._manifest, self.specs, conn, maps)
        for f in old_files:
            f.unlink(missing_ok=True)
            if f.suffix == ".sqlite":
                f.with_name(f.name + "-journal").unlink(missing_ok=True)

    def _write_compacted_db(self, dbpath: Path, live: list[int]) -> None:
        with closing(sqlite3.connect(dbpath)) as db:
            db.executescript(_SCHEMA)
            with db:
                for i in range(0, len(live), _BATCH):
                    chunks = self.get(live[i : i + _BATCH])
                    db.executemany(
                        _INSERT,
                        [
                            (
                                i + j,
                                c.id,
                                c.document_id,
                                c.text,
                                json_metadata(c.metadata, c.id),
                                c.start,
                                c.end,
                            )
                            for j, c in enumerate(chunks)
                        ],
                    )

    def _write_compacted_shards(
        self, live: list[int], max_bytes: int, created: list[Path]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        pending: dict[str, list[torch.Tensor]] = {name: [] for name in self.specs}
        state = {"rows": 0, "bytes": 0, "start": 0}

        def flush() -> None:
            k = state["rows"]
            if not k:
                return
            tensors: dict[str, Any] = {}
            for name, spec in self.specs.items():
                parts = pending[name]
                tensors[name] = torch.cat(parts, 0) if spec.kind == "fixed" else parts
            payload = shard_payload(self.specs, k, tensors)
            start = state["start"]
            name = f"shards/shard-{start:09d}-{_uid()}.safetensors"
            created.append(self.path / name)
            info = write_safetensors(
                self.path / name, payload, {"format": FORMAT_NAME, "start": start, "rows": k}
            )
            out.append({"file": name, "start": start, "rows": k, **info})
            for parts in pending.values():
                parts.clear()
            state.update(rows=0, bytes=0, start=start + k)

        live_arr = np.asarray(live, dtype=np.int64)
        for entry in self._manifest["shards"]:
            lo, hi = entry["start"], entry["start"] + entry["rows"]
            local = live_arr[(live_arr >= lo) & (live_arr < hi)] - lo
            if local.size == 0:
                continue
            data = self._maps[entry["file"]].tensors
            idx = torch.from_numpy(local)
            for name, spec in self.specs.items():
                if spec.kind == "fixed":
                    part = data[name][idx]
                    pending[name].append(part)
                    state["bytes"] += part.numel() * part.element_size()
                else:
                    off = data[f"{name}.offsets"].numpy()
                    flat = data[name]
                    for r in local.tolist():
                        piece = flat[int(off[r]) : int(off[r + 1])].clone()
                        pending[name].append(piece)
                        state["bytes"] += piece.numel() * piece.element_size()
            state["rows"] += int(local.size)
            if state["bytes"] >= max_bytes:
                flush()
        flush()
        return out

    # ------------------------------------------------------------------ aux tensors
    def put_aux(
        self, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store non-row tensors (a trained head, statistics) with JSON `meta` under `aux/`,
        atomically replacing an earlier entry of the same name."""
        with self._mutex:
            self._begin_write()
            check_name(name, "aux")
            if not isinstance(tensors, Mapping):
                raise InvalidInputError("aux tensors must be a mapping of name -> tensor")
            meta_json = json_copy(dict(meta or {}), f"meta of aux {name!r}")
            fname = f"aux/{name}-{_uid()}.safetensors"
            info = write_safetensors(self.path / fname, dict(tensors))
            new = self._next_manifest()
            old = new.setdefault("aux", {}).get(name)
            new["aux"][name] = {"file": fname, "meta": meta_json, **info}
            before = self._manifest
            try:
                self._commit(new)
            except BaseException:
                if self._manifest is before:
                    (self.path / fname).unlink(missing_ok=True)
                raise
            if old:
                (self.path / old["file"]).unlink(missing_ok=True)

    def get_aux(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(tensors, meta)`` of an aux entry (tensors memory-mapped), or None if absent."""
        entry = self._manifest.get("aux", {}).get(name)
        if entry is None:
            return None
        mapped = MappedFile(self.path / entry["file"], expected_bytes=entry["bytes"])
        return mapped.tensors, json.loads(json.dumps(entry.get("meta", {})))

    def copy_aux_to(self, dst: EncodedChunkStore, name: str) -> None:
        """Copy aux entry `name` (tensors and meta) into store `dst`, replacing one there."""
        got = self.get_aux(name)
        if got is None:
            raise UnknownIdError(f"no aux entry {name!r} in {self.path}")
        dst.put_aux(name, {k: v.clone() for k, v in got[0].items()}, got[1])

    def aux_names(self) -> list[str]:
        return sorted(self._manifest.get("aux", {}))

    def delete_aux(self, name: str) -> bool:
        """Remove an aux entry; returns whether it existed."""
        with self._mutex:
            self._begin_write()
            new = self._next_manifest()
            old = new.get("aux", {}).pop(name, None)
            if old is None:
                return False
            self._commit(new)
            (self.path / old["file"]).unlink(missing_ok=True)
            return True

    # ------------------------------------------------------------------ reading tensors
    def _invalidate(self) -> None:
        self._fixed_cache = {}
        self._live_cache = None

    def _spec(self, name: str, kind: str) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None or spec.kind != kind:
            raise InvalidInputError(f"store has no {kind} tensor named {name!r}")
        return spec

    def _shard_data(self, entry: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self._db  # noqa: B018 - raises if closed
        return self._maps[entry["file"]].tensors

    def fixed(self, name: str) -> torch.Tensor:
        """All rows of a fixed-size tensor, ``(num_rows, *shape)``, tombstones included.

        One shard is returned as a zero-copy memory map; several are concatenated once and
        cached. The result is shared: clone it before modifying it in place.
        """
        spec = self._spec(name, "fixed")
        with self._mutex:
            if name not in self._fixed_cache:
                parts = [self._shard_data(s)[name] for s in self._manifest["shards"]]
                if not parts:
                    t = torch.empty((0, *spec.shape), dtype=spec.torch_dtype)
                elif len(parts) == 1:
                    t = parts[0]
                else:
                    t = torch.cat(parts, 0)
                self._fixed_cache[name] = t
            return self._fixed_cache[name]

    def _check_rows_in_range(self, rows: np.ndarray) -> None:
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            bad = rows[(rows < 0) | (rows >= self.num_rows)][:5].tolist()
            raise UnknownIdError(f"rows {bad} are out of range (store has {self.num_rows} rows)")

    def varlen(self, name: str, rows: Iterable[int]) -> list[torch.Tensor]:
        """Per-row zero-copy views ``(len_i, *shape)`` of a variable-length tensor, in the
        order of `rows` (tombstoned rows included)."""
        self._spec(name, "varlen")
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        arr = np.fromiter((int(r) for r in rows), dtype=np.int64)
        self._check_rows_in_range(arr)
        with self._mutex:
            shards = self._manifest["shards"]
            which = np.searchsorted(self._starts, arr, side="right") - 1
            cache: dict[int, tuple[torch.Tensor, np.ndarray, int]] = {}
            out = []
            for row, s in zip(arr.tolist(), which.tolist(), strict=True):
                if s not in cache:
                    data = self._shard_data(shards[s])
                    cache[s] = (data[name], data[f"{name}.offsets"].numpy(), shards[s]["start"])
                flat, off, start = cache[s]
                local = row - start
                out.append(flat[int(off[local]) : int(off[local + 1])])
            return out

    def varlen_runs(self, name: str, rows: Iterable[int]) -> list[torch.Tensor]:
        """Zero-copy views of a variable-length tensor for `rows`, one per run of consecutive
        rows in one shard (``(sum of the run's lengths, *shape)``), in the order of `rows`:
        a scan over many rows reads a few long slices instead of one view per row."""
        self._spec(name, "varlen")
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        arr = np.fromiter((int(r) for r in rows), dtype=np.int64)
        self._check_rows_in_range(arr)
        with self._mutex:
            shards = self._manifest["shards"]
            which = np.searchsorted(self._starts, arr, side="right") - 1
            out: list[torch.Tensor] = []
            i = 0
            while i < len(arr):
                j, s = i + 1, int(which[i])
                while j < len(arr) and arr[j] == arr[j - 1] + 1 and which[j] == s:
                    j += 1
                data = self._shard_data(shards[s])
                off, start = data[f"{name}.offsets"], shards[s]["start"]
                lo, hi = int(arr[i]) - start, int(arr[j - 1]) - start + 1
                out.append(data[name][int(off[lo]) : int(off[hi])])
                i = j
            return out

    def varlen_all(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of a variable-length tensor at once: ``(flat (total, *shape), offsets
        (num_rows + 1,))``, row i being ``flat[offsets[i]:offsets[i + 1]]`` (tombstones
        included). For whole-store scans without per-row work; one shard is zero-copy."""
        spec = self._spec(name, "varlen")
        with self._mutex:
            flats = []
            for s in self._manifest["shards"]:
                data = self._shard_data(s)
                flats.append(data[name][: int(data[f"{name}.offsets"][-1])])
        lengths = self.varlen_lengths(name)
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        if not flats:
            return torch.empty((0, *spec.shape), dtype=spec.torch_dtype), offsets
        return (flats[0] if len(flats) == 1 else torch.cat(flats, 0)), offsets

    def varlen_lengths(self, name: str) -> torch.Tensor:
        """``(num_rows,)`` int64 lengths of a variable-length tensor."""
        self._spec(name, "varlen")
        with self._mutex:
            parts = [
                torch.diff(self._shard_data(s)[f"{name}.offsets"]) for s in self._manifest["shards"]
            ]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------ reading rows
    def _rows_to_mask(self, rows: list[tuple]) -> torch.Tensor:
        mask = torch.zeros(self.num_rows, dtype=torch.bool)
        if rows:
            idx = np.fromiter((r for (r,) in rows), dtype=np.int64, count=len(rows))
            mask[torch.from_numpy(idx)] = True
        return mask

    def live_mask(self) -> torch.Tensor:
        """Boolean ``(num_rows,)``: True for rows that are not tombstoned (a fresh copy)."""
        with self._mutex:
            ((version,),) = self._query("PRAGMA data_version")
            if self._live_cache is None or version != self._data_version:
                rows = self._query(
                    "SELECT row FROM chunks WHERE deleted = 0 AND row < ?", (self.num_rows,)
                )
                self._live_cache = self._rows_to_mask(rows)
                self._data_version = version
            return self._live_cache.clone()

    def live_rows(self) -> torch.Tensor:
        """Indices of the live rows, ascending."""
        return torch.nonzero(self.live_mask(), as_tuple=False).flatten()

    def candidate_mask(self, flt: Mapping[str, Any] | None) -> torch.Tensor:
        """Live rows that pass a metadata filter (see `intrinsic_retrieval.filters`); raises
        `InvalidFilterError` for a filter that does not compile."""
        if flt is None or (isinstance(flt, Mapping) and not flt):
            return self.live_mask()
        where, params = compile_filter(flt)
        try:
            rows = self._query(
                f"SELECT row FROM chunks WHERE deleted = 0 AND row < ? AND ({where})",
                [self.num_rows, *params],
            )
        except (sqlite3.Error, OverflowError) as exc:
            raise InvalidFilterError(f"filter {flt!r} could not be evaluated: {exc}") from exc
        return self._rows_to_mask(rows)

    def get(self, rows: Iterable[int]) -> list[Chunk]:
        """Chunks for rows, in the order given (tombstoned rows included)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        rows = [int(r) for r in rows]
        found: dict[int, Chunk] = {}
        n = self.num_rows
        for i in range(0, len(rows), _BATCH):
            part = rows[i : i + _BATCH]
            q = (
                f"SELECT {_COLUMNS} FROM chunks WHERE row < ? AND "
                f"row IN ({','.join('?' * len(part))})"
            )
            for row, cid, did, text, meta, s, e in self._query(q, [n, *part]):
                found[row] = Chunk(cid, did, text, self._metadata(meta, row), s, e)
        missing = [r for r in rows if r not in found]
        if missing:
            raise UnknownIdError(f"rows not in store: {missing[:5]}")
        return [found[r] for r in rows]

    def _metadata(self, raw: str, row: int) -> dict[str, Any]:
        """A row's metadata; SQLite damage is a `StoreCorruptedError`, not a JSON traceback."""
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError, RecursionError) as exc:
            raise StoreCorruptedError(
                self.path / self._manifest["sqlite"], f"row {row}: metadata is not valid JSON"
            ) from exc
        if not isinstance(meta, dict):
            raise StoreCorruptedError(
                self.path / self._manifest["sqlite"], f"row {row}: metadata is not an object"
            )
        return meta

    def row_of(self, chunk_id: str) -> int:
        """Row of a chunk id: the live one, else the most recent tombstoned one."""
        r = self._query(
            "SELECT row FROM chunks WHERE chunk_id = ? AND row < ? ORDER BY deleted, row DESC "
            "LIMIT 1",
            (chunk_id, self.num_rows),
        )
        if not r:
            raise UnknownIdError(f"unknown chunk id {chunk_id!r}")
        return int(r[0][0])

    def iter_chunks(self, *, live_only: bool = True) -> Iterator[tuple[int, Chunk]]:
        """``(row, chunk)`` in row order, read in batches."""
        q = f"SELECT {_COLUMNS} FROM chunks WHERE row >= ? AND row < ?"
        if live_only:
            q += " AND deleted = 0"
        q += " ORDER BY row LIMIT ?"
        n = self.num_rows
        pos = 0
        while pos < n:
            batch = self._query(q, (pos, n, 1000))
            if not batch:
                return
            for row, cid, did, text, meta, s, e in batch:
                yield int(row), Chunk(cid, did, text, self._metadata(meta, row), s, e)
            pos = int(batch[-1][0]) + 1

    # ------------------------------------------------------------------ integrity and copying
    def verify(self) -> None:
        """Check everything the manifest promises, reading every byte; raise
        `StoreCorruptedError` naming the file at the first problem.

        Checks each shard and aux file (present, size, sha256, header, shapes and dtypes against
        the specs, offsets tables monotonic), SQLite (``PRAGMA integrity_check``, exactly
        ``num_rows`` committed rows, valid JSON metadata). SQLite rows at or beyond
        ``num_rows`` are not an error: they are an uncommitted append that readers ignore and
        the next writable open discards.
        """
        with self._mutex:
            manifest = self._manifest
            for entry in [*manifest["shards"], *manifest.get("aux", {}).values()]:
                f = self.path / entry["file"]
                if not f.is_file():
                    raise StoreCorruptedError(f, "file is missing")
                if f.stat().st_size != entry["bytes"]:
                    raise StoreCorruptedError(
                        f, f"size {f.stat().st_size} != manifest {entry['bytes']}"
                    )
                if file_sha256(f) != entry["sha256"]:
                    raise StoreCorruptedError(f, "sha256 checksum does not match the manifest")
            for entry in manifest["shards"]:
                mapped = self._map_shard(entry, self.specs)
                unlisted = sorted(
                    n for n in mapped.tensors if n.removesuffix(".offsets") not in self.specs
                )
                if unlisted:  # the manifest's tensor table no longer describes the shards
                    raise StoreCorruptedError(
                        self.path / entry["file"],
                        f"holds tensors {unlisted[:5]} that the manifest's tensor table lacks",
                    )
                for name, spec in self.specs.items():
                    if spec.kind == "varlen":
                        off = mapped.tensors[f"{name}.offsets"]
                        if off.numel() > 1 and bool((off[1:] < off[:-1]).any()):
                            raise StoreCorruptedError(
                                self.path / entry["file"], f"offsets of {name!r} decrease"
                            )
            for entry in manifest.get("aux", {}).values():
                MappedFile(self.path / entry["file"], expected_bytes=entry["bytes"])
            dbpath = self.path / manifest["sqlite"]
            try:
                checks = [r[0] for r in self._query("PRAGMA integrity_check")]
                if checks != ["ok"]:
                    raise StoreCorruptedError(dbpath, f"SQLite integrity: {'; '.join(checks[:3])}")
                self._check_rows(self._db, manifest)
                ((bad,),) = self._query(
                    "SELECT count(*) FROM chunks WHERE row < ? AND NOT json_valid(metadata)",
                    (self.num_rows,),
                )
                if bad:
                    raise StoreCorruptedError(dbpath, f"{bad} rows hold invalid JSON metadata")
                for entry in manifest["shards"]:
                    want = entry.get("rows_sha256")  # absent in stores written before it
                    if (
                        want is not None
                        and rows_digest(self._db, entry["start"], entry["rows"]) != want
                    ):
                        raise StoreCorruptedError(
                            dbpath,
                            f"rows {entry['start']}-{entry['start'] + entry['rows'] - 1}: ids, "
                            "text or metadata differ from what was written (checksum mismatch)",
                        )
            except sqlite3.Error as exc:
                raise StoreCorruptedError(dbpath, f"SQLite error: {exc}") from exc

    def copy_to(self, dest: str | PathLike[str], *, overwrite: bool = True) -> Path:
        """Copy the committed store to `dest` atomically; returns `dest`.

        A new `dest` appears complete at once (built in a temporary sibling, then renamed). An
        existing store at `dest` is replaced with the store's own commit protocol: the copied
        files land under new names, the manifest switches last, then the old files go; a crash
        or error leaves the old store intact. Copied shard bytes are checked against their
        sha256 on the way, so corruption is never propagated into a backup. Refuses a `dest`
        that exists and is not a store (unless empty) and one another process is writing.
        """
        dest = Path(dest)
        with self._mutex:
            self._db  # noqa: B018 - raises if closed
            if dest.exists() and dest.resolve() == self.path.resolve():
                return dest
            if dest.exists():
                if not dest.is_dir():
                    raise StoreError(f"refusing to overwrite {dest}: it is not a directory")
                is_store = (dest / MANIFEST).exists()
                if is_store and not overwrite:
                    raise StoreError(f"a store exists at {dest} and overwrite=False")
                if not is_store and any(dest.iterdir()):
                    raise StoreError(f"refusing to overwrite {dest}: it exists and is not a store")
                key = lock.acquire(dest)
                try:
                    self._copy_into(dest)
                finally:
                    lock.release(key)
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                self._copy_into(tmp)
                user_mode(tmp, directory=True)
                os.rename(tmp, dest)
            except BaseException:
                _rmtree(tmp)
                raise
            fsync_dir(dest.parent)
            return dest

    def _copy_into(self, root: Path) -> None:
        try:
            old = read_manifest(root)
            listed = {
                e["file"]: e["sha256"] for e in [*old["shards"], *old.get("aux", {}).values()]
            }
        except StoreError:
            listed = {}
        (root / "shards").mkdir(exist_ok=True)
        new = self._next_manifest()
        db_name = f"chunks-{int(new.get('generation', 0))}-{_uid()}.sqlite"
        tmp_db = root / f".{db_name}.tmp"
        try:
            with closing(sqlite3.connect(tmp_db)) as out:
                self._db.backup(out)
                with out:
                    out.execute("DELETE FROM chunks WHERE row >= ?", (self.num_rows,))
            os.replace(tmp_db, root / db_name)
            for entry in new["shards"]:
                entry["file"] = self._copy_file(entry, root, listed, self._maps[entry["file"]])
            for entry in new.get("aux", {}).values():
                entry["file"] = self._copy_file(entry, root, listed, None)
            fsync_dir(root / "shards")
            new["sqlite"] = db_name
            new["commit_id"] = _uid()
            atomic_write_json(root / MANIFEST, new)
        except BaseException:
            tmp_db.unlink(missing_ok=True)
            (root / db_name).unlink(missing_ok=True)
            raise
        _remove_orphans(root, new)

    def _copy_file(
        self,
        entry: Mapping[str, Any],
        root: Path,
        listed: Mapping[str, str],
        mapped: MappedFile | None,
    ) -> str:
        """Copy one shard/aux file into `root`, checking its sha256; returns its name there."""
        rel = entry["file"]
        if rel in listed and listed[rel] != entry["sha256"]:
            folder, base = rel.split("/", 1)
            rel = f"{folder}/{base.rsplit('-', 1)[0]}-{_uid()}.safetensors"
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        h = hashlib.sha256()
        src = self.path / entry["file"]
        try:
            with os.fdopen(fd, "wb") as out:
                if mapped is not None:
                    mapped.read_bytes_into(out, h)
                else:
                    with open(src, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 24), b""):
                            h.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != entry["sha256"]:
                raise StoreCorruptedError(src, "sha256 checksum does not match the manifest")
            user_mode(tmp)
            os.replace(tmp, target)
        except FileNotFoundError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StoreCorruptedError(src, "file is missing") from exc
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return rel


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
