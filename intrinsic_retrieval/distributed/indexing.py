"""Distributed indexing on Ray: each worker encodes one contiguous part of the corpus into its own
store part, then the parts are combined into one store (`parts.combine`).

Why Ray tasks and not Ray Data: a part is one ordinary store written by one process with the
store's own crash-safe, resumable `add`, so the unit of work is "a range of documents into a
directory", which a task expresses directly; Ray supplies scheduling, CPU/GPU placement and
retries of workers that die. The store directory must be on a filesystem every worker sees (a
local cluster, NFS or another shared mount): the workers write their parts there.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, RetrievalError
from ..types import Document, DocumentLike, as_documents
from .parts import (
    PartsError,
    PartSpec,
    combine,
    documents_digest,
    mark_done,
    part_name,
    parts_dir,
    read_plan,
    split_ranges,
    write_plan,
)


class MissingDependencyError(RetrievalError, ImportError):
    """An optional dependency (an extra) that a feature needs is not installed."""


class PartFailedError(PartsError):
    """Workers failed on some parts (after Ray's retries); the finished parts are kept and a
    re-run resumes them."""

    def __init__(self, failed: Mapping[str, str]) -> None:
        self.failed = dict(failed)
        shown = "; ".join(f"{k}: {v}" for k, v in list(self.failed.items())[:3])
        super().__init__(
            f"{len(self.failed)} part(s) failed ({shown}); finished parts are kept, run the same "
            "indexing again to resume"
        )


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "distributed indexing and search need Ray: pip install 'intrinsic-retrieval[ray]'"
        ) from None
    return ray


class ClusterError(RetrievalError, ConnectionError):
    """The Ray cluster could not be reached or started."""


def connect(address: str | None = None, **init: Any) -> Any:
    """Ray, connected: to `address` (``"auto"``, ``"ray://host:10001"``) or, when None and no
    cluster is up in this process, to a local one started here."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=address, **{"include_dashboard": False, "log_to_driver": False, **init}
            )
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
            where = f"at {address!r}" if address else "locally"
            raise ClusterError(f"cannot connect to a Ray cluster {where}: {exc}") from exc
    return ray


@dataclass
class IndexReport:
    """What a distributed indexing run did."""

    store: Path
    parts: int
    documents: int
    chunks: int = 0
    parts_done_before: int = 0  # complete from an earlier (interrupted) run: not redone
    seconds: float = 0.0
    part_seconds: dict[str, float] = field(default_factory=dict)


def encode_part(
    retriever: str,
    options: Mapping[str, Any],
    spec: PartSpec,
    docs: list[Document],
    threads: int | None = None,
) -> float:
    """One worker's job: `docs` into the store part at `spec.path` (resuming what an earlier
    attempt stored), then the done marker. Returns the seconds it took."""
    import torch

    from ..retrievers import create_retriever

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    r = create_retriever(retriever, path=str(spec.path), **{"show_progress": False, **options})
    try:
        r.set_row_offset(spec.row_offset)
        if docs:
            r.add(docs, on_duplicate="skip")
        mark_done(spec, r.store)
    finally:
        r.close()
    return time.perf_counter() - t0


def _row_offsets(
    retriever: str, options: Mapping[str, Any], ranges: list[list[Document]]
) -> list[int]:
    """Rows before each part: chunk counts of the parts before it (chunking needs the
    retriever's tokenizer, so a throwaway retriever with no path is made here)."""
    from ..retrievers import create_retriever, retriever_class

    offsets = [0] * len(ranges)
    cls = retriever_class(retriever)
    if not cls.row_offset_matters:
        return offsets
    default = inspect.signature(cls).parameters.get("chunk_size")
    chunk_size = options.get("chunk_size", default.default if default is not None else None)
    if chunk_size is None:  # whole documents: one row each, no tokenizer needed
        counts = [len(part) for part in ranges]
    else:
        r = create_retriever(retriever, **{"show_progress": False, **options})
        try:
            counts = [sum(len(r.chunker.split(d)) for d in part) for part in ranges]
        finally:
            r.close()
    for i in range(1, len(ranges)):
        offsets[i] = offsets[i - 1] + counts[i - 1]
    return offsets


def index_distributed(
    retriever: str,
    documents: Iterable[DocumentLike],
    store: str | os.PathLike[str],
    *,
    options: Mapping[str, Any] | None = None,
    parts: int | None = None,
    address: str | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    max_retries: int = 2,
    combine_parts: bool = True,
    keep_parts: bool = False,
) -> IndexReport:
    """Index `documents` with `retriever` (registry name and constructor `options`) on a Ray
    cluster into one store at `store`.

    The corpus is split into `parts` contiguous ranges (default: the cluster's CPUs divided by
    `cpus_per_worker`); each is encoded by one Ray task into ``<store>.parts/part-NNNNN`` and,
    with `combine_parts`, the parts are combined into `store` (atomically: it appears complete or
    not at all), equal row for row to a store built in one process. Re-running the same call
    resumes: complete parts are skipped and interrupted ones continue where their last commit
    left them. Without `combine_parts` the parts stay for a `DistributedRetriever`.
    """
    options = dict(options or {})
    if "path" in options:
        raise InvalidInputError("pass the store as `store`, not as the option `path`")
    docs = as_documents(documents)
    if not docs:
        from ..errors import EmptyCorpusError

        raise EmptyCorpusError("no documents to index")
    from ..chunking import check_unique_ids
    from ..retrievers import retriever_class

    cls = retriever_class(retriever)  # an unknown name fails before Ray starts
    if not getattr(cls, "partitionable", False):
        raise InvalidInputError(
            f"{retriever} indexes cannot be built in parts (pipelines compose indexes; a "
            "generative index is its model): index it in one process"
        )
    check_unique_ids(d.id for d in docs)
    dest = Path(store)
    if combine_parts and (dest / "manifest.json").exists():
        raise PartsError(
            f"{dest} is already an index; open it with load_retriever or pick a new path"
        )
    if combine_parts and dest.exists():
        raise PartsError(f"{dest} exists and is not an index; pick a new path")
    root = parts_dir(dest)
    if parts is None and (root / "plan.json").exists():  # resume with the planned partition
        parts = len(read_plan(root)["parts"])
    ray = connect(address)
    t0 = time.perf_counter()
    if parts is None:
        parts = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_worker, 1e-9)))
    if parts < 1:
        raise InvalidInputError(f"parts must be >= 1, got {parts}")
    ranges = [[docs[i] for i in rng] for rng in split_ranges(len(docs), parts)]
    offsets = _row_offsets(retriever, options, ranges)
    specs = [
        PartSpec(i, root / part_name(i), len(part), documents_digest(part), offsets[i])
        for i, part in enumerate(ranges)
    ]
    write_plan(root, retriever, options, specs)
    report = IndexReport(store=dest, parts=len(specs), documents=len(docs))
    task = ray.remote(encode_part).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_retries=max_retries
    )
    threads = max(1, int(cpus_per_worker))
    pending = {}
    for spec, part in zip(specs, ranges, strict=True):
        if spec.is_done():
            report.parts_done_before += 1
            continue
        pending[task.remote(retriever, options, spec, part, threads)] = spec
    failed: dict[str, str] = {}
    user_error: RetrievalError | None = None
    for ref, spec in pending.items():
        try:
            report.part_seconds[spec.path.name] = ray.get(ref)
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            failed[spec.path.name] = f"{type(cause).__name__}: {cause}"
            if isinstance(cause, RetrievalError) and user_error is None:
                user_error = cause  # e.g. a part made by another model: raised as itself
    if user_error is not None:
        raise user_error
    if failed:
        raise PartFailedError(failed)
    if combine_parts:
        combine(root, dest)
        from ..store import EncodedChunkStore

        with EncodedChunkStore.open(dest, read_only=True) as s:
            report.chunks = len(s)
        if not keep_parts:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report
