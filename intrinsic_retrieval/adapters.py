"""Framework-neutral plumbing shared by the LangChain and LlamaIndex adapters.

Both adapters must (1) accept any `Retriever` or a registry name, (2) serialise use of one model
across threads while never blocking an event loop, and (3) save their own settings next to the
index so a reload restores every constructor argument. Keeping that here means the adapters stay
thin and no adapter code is needed per retriever.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import import_module
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

from .errors import InvalidInputError, StoreCorruptedError, StoreNotFoundError
from .protocol import Retriever, check_k, check_query
from .store.shards import atomic_write_json
from .types import Hit

T = TypeVar("T")

#: Worker threads for async calls. Calls on one retriever queue on its lock inside these threads,
#: so the pool is larger than the loop's default executor and separate from it: waiting searches
#: never starve unrelated `asyncio.to_thread` work.
MAX_ASYNC_WORKERS = 32

#: Keys every adapter adds to a result's metadata (they override same-named document metadata).
RESULT_KEYS = ("document_id", "chunk_id", "score", "rank")

_CONFIG_FORMAT = "intrinsic-retrieval-adapter"
_CONFIG_VERSION = 1

_pool: ThreadPoolExecutor | None = None
_pool_guard = threading.Lock()
_fallback_locks: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_unhashable_lock = threading.RLock()
_MISSING = object()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_guard:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=MAX_ASYNC_WORKERS, thread_name_prefix="intrinsic-retrieval"
            )
        return _pool


def _forget_pool() -> None:  # a forked child inherits the pool object but not its threads
    global _pool, _pool_guard
    _pool, _pool_guard = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def model_lock(retriever: Any) -> contextlib.AbstractContextManager[Any]:
    """The lock that serialises use of `retriever`'s model.

    `StoreRetriever` exposes one as ``.lock``; a retriever that sets ``lock = None`` declares
    itself thread-safe. Other protocol implementations get one lock per object.
    """
    lock = getattr(retriever, "lock", _MISSING)
    if lock is None:
        return contextlib.nullcontext()
    if lock is not _MISSING:
        return lock
    with _pool_guard:
        try:
            return _fallback_locks.setdefault(retriever, threading.RLock())
        except TypeError:  # not weak-referenceable or not hashable
            return _unhashable_lock


def run_locked(retriever: Any, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Call `fn` while holding `retriever`'s model lock."""
    with model_lock(retriever):
        return fn(*args, **kwargs)


async def arun_locked(retriever: Any, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`run_locked` in a worker thread, so the event loop keeps running while the model works.

    Context variables (LangChain callbacks, tracing) are copied into the worker thread.
    """
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, run_locked, retriever, fn, *args, **kwargs)
    return await loop.run_in_executor(_executor(), call)


def resolve_retriever(
    retriever: Any, retriever_kwargs: Mapping[str, Any] | None = None
) -> Retriever:
    """A `Retriever` from an instance or a registry name (built with `retriever_kwargs`)."""
    if isinstance(retriever, str):
        from .retrievers import create_retriever

        return create_retriever(retriever, **dict(retriever_kwargs or {}))
    if retriever_kwargs:
        raise InvalidInputError(
            "retriever_kwargs only apply when `retriever` is a registry name such as 'bm25'"
        )
    return check_retriever(retriever)


def check_retriever(retriever: Any) -> Retriever:
    if not isinstance(retriever, Retriever):
        raise InvalidInputError(
            "expected an intrinsic_retrieval Retriever (add/delete/search/search_batch/save/load), "
            f"got {type(retriever).__name__}"
        )
    return retriever


# ---------------------------------------------------------------------- reranking
def check_reranker(retriever: Any) -> Any:
    """A retriever that can rerank: it scores a subset of its own index (`rerank`)."""
    if not callable(getattr(retriever, "rerank", None)):
        raise InvalidInputError(
            "a reranker needs a library retriever that scores a subset of its own index "
            f"(with rerank()); got {type(retriever).__name__}"
        )
    return retriever


def rerank_records(
    retriever: Any,
    query: str,
    keys: Sequence[tuple[str | None, str | None, str]],
    top_n: int,
) -> list[tuple[int, Hit]]:
    """Rerank a framework's retrieved records with a library retriever as second stage.

    `keys` are each record's ``(chunk id, document id, text)`` (one id may be None, not both).
    Returns ``(record index, hit)`` for the best `top_n` records, best first. A record whose
    chunk the retriever holds (same id and text) takes that chunk's score; any other record
    takes its document's best chunk (stages may chunk differently). A record the retriever has
    not indexed raises `StageMismatchError`."""
    query = check_query(query)
    top_n = check_k(top_n, "top_n")
    check_reranker(retriever)
    candidates: list[Hit] = []
    for i, (chunk_id, doc_id, text) in enumerate(keys):
        if chunk_id is None and doc_id is None:
            raise InvalidInputError(
                f"retrieved record {i} has no id: a reranker finds records in its index by the "
                "chunk_id / document_id metadata (or the record's own id)"
            )
        cid, did = str(chunk_id or doc_id), str(doc_id or chunk_id)
        candidates.append(Hit(cid, did, text, 0.0, i + 1))
    if not candidates:
        return []
    hits = run_locked(retriever, retriever.rerank, query, candidates, k=None)
    scored = {(h.chunk_id, h.document_id) for h in hits}
    out: list[tuple[int, Hit]] = []
    used: set[int] = set()
    for h in hits:  # best first: the first hit that stands for a record ranks it
        for i, c in enumerate(candidates):
            if i in used:
                continue
            own = (c.chunk_id, c.document_id) in scored  # the record's chunk was scored
            if (own and c.chunk_id == h.chunk_id) or (not own and c.document_id == h.document_id):
                used.add(i)
                out.append((i, h))
        if len(out) >= top_n:
            break
    return out[:top_n]


# ---------------------------------------------------------------------- persistence
def save_with_config(
    retriever: Retriever, path: str | PathLike[str], filename: str, config: Mapping[str, Any]
) -> Path:
    """Save the index to `path`, then the adapter's settings to ``path/filename``.

    The directory stays a plain index (``load_retriever(path)`` and the CLI open it); the
    settings file only adds what the framework wrapper needs.
    """
    dest = Path(path)
    try:
        json.dumps(dict(config))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"adapter settings are not JSON-serialisable: {exc}") from exc
    run_locked(retriever, retriever.save, dest)
    cls = type(retriever)
    atomic_write_json(
        dest / filename,
        {
            "format": _CONFIG_FORMAT,
            "format_version": _CONFIG_VERSION,
            "retriever_class": f"{cls.__module__}:{cls.__qualname__}",
            "config": dict(config),
        },
    )
    return dest


def read_config(path: str | PathLike[str], filename: str) -> dict[str, Any]:
    """The settings saved by `save_with_config`, or ``{}`` for a bare index."""
    file = Path(path) / filename
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreCorruptedError(file, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != _CONFIG_FORMAT:
        raise StoreCorruptedError(file, f"not an {_CONFIG_FORMAT} settings file")
    if not isinstance(data.get("config", {}), dict):
        raise StoreCorruptedError(file, "'config' must be an object")
    return data


def load_with_config(
    path: str | PathLike[str], filename: str, overrides: Mapping[str, Any] | None = None
) -> tuple[Retriever, dict[str, Any]]:
    """Reopen an index saved by `save_with_config` (or a bare saved index) and its settings.

    `overrides` go to the retriever's ``load`` (e.g. ``device="cuda"``).
    """
    root = Path(path)
    if not root.exists():
        raise StoreNotFoundError(f"nothing saved at {root}")
    data = read_config(root, filename)
    overrides = dict(overrides or {})
    target = data.get("retriever_class")
    if target and not (root / "manifest.json").exists():
        module, _, qualname = str(target).partition(":")
        try:
            obj: Any = import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise StoreCorruptedError(
                root / filename, f"retriever class {target!r} cannot be imported ({exc})"
            ) from exc
        if not (isinstance(obj, type) and hasattr(obj, "load")):
            raise StoreCorruptedError(root / filename, f"{target!r} is not a retriever class")
        retriever = check_retriever(obj.load(root, **overrides))
    else:
        from .retrievers import load_retriever

        retriever = load_retriever(root, **overrides)
    return retriever, dict(data.get("config", {}))


__all__ = [
    "MAX_ASYNC_WORKERS",
    "RESULT_KEYS",
    "arun_locked",
    "check_k",
    "check_reranker",
    "check_retriever",
    "load_with_config",
    "model_lock",
    "read_config",
    "rerank_records",
    "resolve_retriever",
    "run_locked",
    "save_with_config",
]
