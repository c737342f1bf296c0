"""Store parts: a corpus split into ranges, each indexed into its own store, then combined.

Layout beside the store being built (``<store>.parts/``)::

    plan.json              what the parts are for: retriever, options, corpus and part digests
    part-00000/            an ordinary store, written by one worker (resumable: crash-safe
    part-00000.done.json   writes, ``add(on_duplicate="skip")``); the marker says it is complete
    .lock                  the combiner's lock (one combiner at a time)

The corpus is split into contiguous ranges, so the parts combined in order hold the rows a single
process would have written, in the same order. Nothing here needs Ray: the workers that fill the
parts are Ray tasks (`indexing.py`), but planning, checking and combining are plain store work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelMismatchError, StoreError
from ..store import EncodedChunkStore
from ..store import lock as store_lock
from ..store.shards import atomic_write_json, fsync_dir
from ..types import Document

PLAN_FORMAT = "intrinsic-retrieval/store-parts/v1"
PLAN = "plan.json"
#: rows copied per append while combining (one shard each in the combined store)
COMBINE_ROWS = 1024


class PartsError(StoreError):
    """Store parts that cannot be combined or resumed as asked (incomplete, or planned for
    another corpus)."""


def parts_dir(store: str | os.PathLike[str]) -> Path:
    """Where the parts of `store` live while it is built: ``<store>.parts`` beside it."""
    p = Path(store)
    return p.with_name(p.name + ".parts")


def part_name(i: int) -> str:
    return f"part-{i:05d}"


def split_ranges(n: int, parts: int) -> list[range]:
    """`n` items in `parts` contiguous ranges whose sizes differ by at most one."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def documents_digest(docs: Sequence[Document]) -> str:
    """What a part holds, independent of how it was read: ids, texts and metadata in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d.id, d.text, dict(d.metadata)], sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class PartSpec:
    """One part: its directory, its documents' digest and count, and the rows before it (the
    global offset of its first row, which in-context codes depend on)."""

    index: int
    path: Path
    documents: int
    digest: str
    row_offset: int

    @property
    def done_marker(self) -> Path:
        return self.path.with_name(self.path.name + ".done.json")

    def is_done(self) -> bool:
        try:
            done = json.loads(self.done_marker.read_text())
        except (OSError, ValueError):
            return False
        return done.get("digest") == self.digest


def write_plan(
    root: Path,
    retriever: str,
    options: Mapping[str, Any],
    specs: Sequence[PartSpec],
) -> None:
    """Record the plan, or check that an existing one is the same (a re-run resumes it; another
    corpus, partition or configuration is refused rather than mixed in)."""
    plan = {
        "format": PLAN_FORMAT,
        "retriever": retriever,
        "options": json.loads(json.dumps(dict(options), sort_keys=True, default=str)),
        "parts": [
            {"name": s.path.name, "documents": s.documents, "digest": s.digest,
             "row_offset": s.row_offset}
            for s in specs
        ],
    }  # fmt: skip
    path = root / PLAN
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as exc:
            raise PartsError(
                f"{path} is not valid JSON ({exc}); delete {root} to start over"
            ) from None
        if old != plan:
            raise PartsError(
                f"the parts under {root} were planned for another corpus, partition or "
                f"configuration; pass the same documents and options to resume, or delete {root}"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, plan)


def read_plan(root: Path) -> dict[str, Any]:
    try:
        plan = json.loads((root / PLAN).read_text())
    except FileNotFoundError:
        raise PartsError(f"no store parts at {root} ({PLAN} is missing)") from None
    except ValueError as exc:
        raise PartsError(f"{root / PLAN} is not valid JSON ({exc})") from None
    if plan.get("format") != PLAN_FORMAT:
        raise PartsError(f"{root / PLAN} is not a store-parts plan ({plan.get('format')!r})")
    return plan


def mark_done(spec: PartSpec, store: EncodedChunkStore) -> None:
    atomic_write_json(
        spec.done_marker,
        {"digest": spec.digest, "rows": store.num_rows, "fingerprint": store.fingerprint},
    )


def part_paths(root: Path) -> list[Path]:
    """The part stores of a plan, in order (each must be complete)."""
    plan = read_plan(root)
    out = []
    for entry in plan["parts"]:
        spec = PartSpec(0, root / entry["name"], entry["documents"], entry["digest"], 0)
        if not spec.is_done():
            raise PartsError(
                f"part {spec.path} is not complete (no done marker for its documents); re-run "
                "the indexing to finish it"
            )
        out.append(spec.path)
    return out


def check_parts_agree(stores: Sequence[EncodedChunkStore]) -> None:
    """Every part was made by the same model, format and retriever configuration."""
    first = stores[0]
    for s in stores[1:]:
        if s.fingerprint != first.fingerprint:
            raise ModelMismatchError(s.path, expected=first.fingerprint, found=s.fingerprint)
        if s.specs != first.specs or s.config != first.config:
            raise PartsError(
                f"part {s.path} was built with another retriever configuration than "
                f"{first.path}; parts must share every index option"
            )


def _live_batches(store: EncodedChunkStore, size: int) -> Iterator[list[int]]:
    rows = store.live_rows().tolist()
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _copy_rows(src: EncodedChunkStore, dst: EncodedChunkStore) -> None:
    for rows in _live_batches(src, COMBINE_ROWS):
        tensors: dict[str, Any] = {}
        for name, spec in src.specs.items():
            if spec.kind == "fixed":
                tensors[name] = src.fixed(name)[rows]
            else:
                tensors[name] = src.varlen(name, rows)
        dst.append(src.get(rows), tensors)


def _copy_aux(stores: Sequence[EncodedChunkStore], dst: EncodedChunkStore) -> None:
    """Aux entries (trained heads, statistics) that every part holds identically are kept; one
    that differs between parts cannot be combined."""
    names = set(stores[0].aux_names())
    for s in stores[1:]:
        names |= set(s.aux_names())
    for name in sorted(names):
        entries = [s.manifest.get("aux", {}).get(name) for s in stores]
        ref = entries[0]
        same = ref is not None and all(
            e is not None and e["sha256"] == ref["sha256"] and e.get("meta") == ref.get("meta")
            for e in entries
        )
        if not same:
            raise PartsError(
                f"aux entry {name!r} differs between parts (or is missing from some); train "
                "after combining, or give every worker the same trained state"
            )
        stores[0].copy_aux_to(dst, name)


def _combine_into(paths: Sequence[Path], dest: Path) -> None:
    stores = [EncodedChunkStore.open(p, read_only=True) for p in paths]
    try:
        check_parts_agree(stores)
        first = stores[0]
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{dest.name}.combining-{uuid.uuid4().hex[:8]}-",
                             dir=dest.parent)
        )  # fmt: skip
        try:
            target = tmp / "store"
            out = EncodedChunkStore.create(
                target, fingerprint=first.fingerprint, specs=first.specs, config=first.config
            )
            try:
                for s in stores:
                    _copy_rows(s, out)
                _copy_aux(stores, out)
                _check_rows(out)
            finally:
                out.close()
            os.rename(target, dest)
            fsync_dir(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for s in stores:
            s.close()


def _check_rows(store: EncodedChunkStore) -> None:
    """The retriever's own check of the combined rows (in-context: codes unique, which parts
    built without their row offsets would break)."""
    from ..retrievers import retriever_class

    name = store.config.get("retriever")
    if isinstance(name, str):
        retriever_class(name).check_combined(store)


def combine(
    parts: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    lock_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Combine part stores, in order, into one new store at `dest`; returns `dest`.

    `parts` is a parts directory (its plan says which parts, each must be complete) or a list of
    store paths. The combined store is built in a temporary sibling and renamed into place, so
    `dest` appears complete or not at all: a failed or killed combiner leaves no half-combined
    store, and the parts are untouched. Two combiners of the same parts, or into the same `dest`,
    at once: the second gets `ConcurrentWriteError` (locks: the parts directory, and
    ``.<dest>.combine`` beside `dest`). An I/O failure (disk full) is a `PartsError`. Parts
    made by another model raise `ModelMismatchError`; another configuration, a differing aux
    entry, rows that do not fit together (`check_combined`) or an existing `dest` raise
    `PartsError` (or the retriever's `StoreError`).
    """
    if isinstance(parts, str | os.PathLike):
        root = Path(parts)
        paths = part_paths(root)
        lock_root = Path(lock_dir) if lock_dir is not None else root
    else:
        paths = [Path(p) for p in parts]
        if not paths:
            raise PartsError("no parts to combine")
        lock_root = Path(lock_dir) if lock_dir is not None else paths[0].parent
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest_lock = dest.parent / f".{dest.name}.combine"  # combiners of the same destination
    dest_lock.mkdir(exist_ok=True)  # kept: removing a lock file others may open races them
    keys = [store_lock.acquire(lock_root)]
    try:
        keys.append(store_lock.acquire(dest_lock))
        if dest.exists():
            raise PartsError(f"{dest} exists; combine into a new path (or delete it first)")
        for stale in dest.parent.glob(f".{dest.name}.combining-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed combiner's (we hold the lock)
        try:
            _combine_into(paths, dest)
        except OSError as exc:
            raise PartsError(f"combining into {dest} failed, nothing written: {exc}") from exc
    finally:
        for key in keys:
            store_lock.release(key)
    return dest
