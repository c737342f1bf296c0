"""`Pipeline`: retrievers composed of other retrievers (`Rerank`, `Fusion`), kept as one index.

A pipeline directory holds ``pipeline.json`` (what composes the stages, and how) and one index
per stage in a sub-directory named for its role (``first/``, ``second/``; ``stage0/``, ...).
`load_retriever` opens it like any other index. Every stage holds the same documents: `add`
writes to all of them (undoing the earlier stages' part when a later one fails), `delete`
removes from all, and opening checks that the stages agree.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar, Self

from ..errors import (
    InvalidInputError,
    StageMismatchError,
    StoreCorruptedError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
)
from ..protocol import Filter, Retriever, check_queries
from ..store.shards import atomic_write_json
from ..types import DocumentLike, Hit, as_documents

PIPELINE_FILE = "pipeline.json"
#: per-query stage timings kept (the most recent ones)
TIMINGS_KEPT = 10_000
FORMAT_NAME = "intrinsic-retrieval/pipeline"
FORMAT_VERSION = 1

#: How a stage is given: a retriever object, a registry name (``"bm25"``) or a mapping with the
#: name and its options (``{"name": "incontext", "store_dtype": "int8"}``)
StageSpec = Retriever | str | Mapping[str, Any]


def is_pipeline(path: str | PathLike[str]) -> bool:
    return (Path(path) / PIPELINE_FILE).is_file()


def is_index(path: str | PathLike[str]) -> bool:
    """Whether `path` holds an index `load_retriever` can open (a store or a pipeline)."""
    return is_pipeline(path) or (Path(path) / "manifest.json").is_file()


def _stage(
    spec: StageSpec, path: Path | None, role: str, show_progress: bool | None = None
) -> Retriever:
    """The retriever for `spec`: an object as given; a name or mapping opens the index at
    `path` when there is one (its options as overrides), else creates it there."""
    from . import create_retriever, load_retriever

    if not isinstance(spec, str | Mapping):
        if not all(hasattr(spec, m) for m in ("add", "delete", "search_batch", "save")):
            raise InvalidInputError(
                f"the {role} stage must be a retriever, a registry name or a mapping with a "
                f"'name', got {type(spec).__name__}"
            )
        own = getattr(spec, "path", None)
        if path is not None and (own is None or Path(own).resolve() != path.resolve()):
            raise InvalidInputError(
                f"the {role} stage was given as a retriever object, which keeps its own index; "
                "build the pipeline without a path and save() it, or give the stage by name"
            )
        return spec
    options = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise InvalidInputError(f"the {role} stage's mapping needs a 'name' (a retriever name)")
    if show_progress is not None:
        options.setdefault("show_progress", show_progress)
    if path is not None and is_index(path):
        # a nested pipeline's stage specs were for building it: it reopens as recorded
        extra = {"show_progress": show_progress} if show_progress is not None else {}
        r = load_retriever(path, **(extra if is_pipeline(path) else options))
        if getattr(r, "name", name) != name:
            got = getattr(r, "name", "?")
            r.close()  # type: ignore[attr-defined]
            raise StoreError(f"the {role} stage at {path} is a {got!r} index, not {name!r}")
        return r
    return create_retriever(name, **options, **({} if path is None else {"path": str(path)}))


class Pipeline:
    """Shared plumbing of composed retrievers: stages by role, persistence, writes to all
    stages, the stage-agreement check, and per-stage query timings."""

    name: ClassVar[str] = ""
    fit_config: ClassVar[None] = None  # train a stage itself: ``pipeline.stages["second"].fit``

    def __init__(
        self,
        stages: Mapping[str, StageSpec],
        options: Mapping[str, Any],
        *,
        path: str | PathLike[str] | None,
        check_stages: bool,
        show_progress: bool | None = None,
    ) -> None:
        """`show_progress`, when given, is passed to the stages built here by name."""
        self.lock = threading.RLock()
        self.options = dict(options)
        root = None if path is None else Path(path)
        if root is not None and root.exists() and not is_pipeline(root) and any(root.iterdir()):
            raise StoreError(f"refusing to build a {self.name} pipeline in {root}: it is not empty")
        self.roles = list(stages)
        if root is not None and is_pipeline(root):
            found = read_pipeline(root)
            if found["kind"] != self.name or found["stages"] != self.roles:
                raise StoreError(
                    f"{root} holds a {found['kind']!r} pipeline with stages {found['stages']}, "
                    f"not a {self.name!r} pipeline with stages {self.roles}"
                )
        elif root is not None:
            # written first: a stage that fails to build leaves a pipeline that opens (and
            # builds the missing stage) next time; an existing one keeps its recorded options
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(root / PIPELINE_FILE, self._manifest())
        built: dict[str, Retriever] = {}
        #: stages this pipeline opened or created (closed if construction fails; stages given
        #: as objects belong to the caller)
        self._owned = {role for role, spec in stages.items() if isinstance(spec, str | Mapping)}
        try:
            for role, spec in stages.items():
                built[role] = _stage(
                    spec, None if root is None else root / role, role, show_progress
                )
            self.stages = built
            self._path = root
            #: recent per-query seconds of each stage since the last `reset_timings`
            self.stage_seconds: dict[str, deque[float]] = {
                role: deque(maxlen=TIMINGS_KEPT) for role in built
            }
            if check_stages:
                self.check_stages()
        except BaseException:
            self._close_owned(built)
            raise

    def _close_owned(self, stages: Mapping[str, Any] | None = None) -> None:
        for role, r in (self.stages if stages is None else stages).items():
            if role in self._owned:
                getattr(r, "close", lambda: None)()

    # ------------------------------------------------------------------ agreement
    def document_ids(self) -> set[str]:
        """Live document ids (those of the stage whose chunks this pipeline returns)."""
        return _document_ids(self.stages[self._returning_role()]) or set()

    def existing_document_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of `ids` any stage holds."""
        ids = list(ids)
        found: set[str] = set()
        for r in self.stages.values():
            fn = getattr(r, "existing_document_ids", None)
            if callable(fn):
                found |= fn(ids)
        return found

    def check_stages(self) -> None:
        """Raise `StageMismatchError` unless every stage that can list its documents (library
        retrievers and pipelines) holds the same ones. An `add` interrupted by Ctrl-C or a
        killed process leaves some stages ahead: open with ``check_stages=False`` and repeat the
        `add` with ``on_duplicate="skip"``."""
        held = {
            role: ids for role, r in self.stages.items() if (ids := _document_ids(r)) is not None
        }
        if len(held) < 2:
            return
        union = set().union(*held.values())
        for role, ids in held.items():
            lacking = sorted(union - ids)
            if lacking:
                shown = ", ".join(repr(i) for i in lacking[:5]) + (
                    " ..." if len(lacking) > 5 else ""
                )
                raise StageMismatchError(
                    f"the {role} stage of this {self.name} pipeline lacks {len(lacking)} "
                    f"document(s) the other stages hold ({shown}): the stages were built from "
                    "different documents, or an add() was interrupted (open with "
                    "check_stages=False and add the documents again with on_duplicate='skip')",
                    lacking,
                )

    # ------------------------------------------------------------------ writes
    def add(self, documents: Iterable[DocumentLike], *, on_duplicate: str = "error") -> list[str]:
        """Add to every stage in turn. If a stage raises an error, the documents this call
        added are deleted again from every stage (the failing one's committed batches too) and
        the error is raised. An interrupt (Ctrl-C) keeps what was written, so the same `add`
        with ``on_duplicate="skip"`` resumes it."""
        if on_duplicate not in ("error", "skip"):
            raise InvalidInputError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        docs = as_documents(documents)
        doc_ids = [str(d.id) for d in docs]
        with self.lock:
            before = self.existing_document_ids(doc_ids)
            if before and on_duplicate == "error":  # refuse before any stage writes
                from ..errors import DuplicateIdError

                raise DuplicateIdError(sorted(before))
            added: dict[str, None] = {}
            try:
                for r in self.stages.values():
                    added.update(dict.fromkeys(r.add(docs, on_duplicate=on_duplicate)))
            except Exception:
                fresh = [i for i in doc_ids if i not in before]
                for r in self.stages.values():
                    r.delete(fresh)
                raise
        return list(added)

    def delete(self, ids: Iterable[str]) -> int:
        """Delete from every stage; returns the chunks removed from the stage whose chunks
        this pipeline returns."""
        if isinstance(ids, str):
            ids = [ids]
        if ids is None or not isinstance(ids, Iterable):
            raise InvalidInputError(f"ids must be an iterable of ids, got {type(ids).__name__}")
        ids = list(ids)
        with self.lock:
            counts = {role: r.delete(ids) for role, r in self.stages.items()}
        return counts[self._returning_role()]

    def compact(self) -> None:
        for r in self.stages.values():
            getattr(r, "compact", lambda: None)()

    # ------------------------------------------------------------------ search
    def _returning_role(self) -> str:
        """The stage whose chunks the hits are (and `len` counts)."""
        return next(iter(self.stages))

    def search(self, query: str, k: int = 10, filter: Filter | None = None) -> list[Hit]:
        return self.search_batch([query], k=k, filter=filter)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, filter: Filter | None = None
    ) -> list[list[Hit]]:
        queries, k = check_queries(queries, k)
        if not queries:
            return []
        with self.lock:
            return self._search(queries, k, filter)

    def _search(self, queries: list[str], k: int, filter: Filter | None) -> list[list[Hit]]:
        raise NotImplementedError

    def _time(self, role: str, seconds: float, n: int) -> None:
        self.stage_seconds[role].extend([seconds / n] * n)

    def reset_timings(self) -> None:
        for v in self.stage_seconds.values():
            v.clear()

    @property
    def max_k(self) -> int | None:
        """The most hits one search can return (None: no limit of its own)."""
        return None

    def median_stage_ms(self) -> dict[str, float | None]:
        """Median milliseconds per query of each stage since `reset_timings`."""
        return {
            role: (1000 * statistics.median(v) if v else None)
            for role, v in self.stage_seconds.items()
        }

    # ------------------------------------------------------------------ persistence
    def init_args(self) -> dict[str, Any]:
        """The pipeline's options and, under each role, its stage's recorded options."""
        return {
            **self.options,
            **{
                role: r.init_args() if callable(getattr(r, "init_args", None)) else None
                for role, r in self.stages.items()
            },
        }

    def _manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": self.name,
            "options": self.options,
            "stages": self.roles,
        }

    @property
    def path(self) -> Path | None:
        return self._path

    def save(self, path: str | PathLike[str]) -> None:
        """Write the whole pipeline (every stage's index and ``pipeline.json``) to `path`. It
        is built in a temporary sibling and renamed into place, so `path` never holds a half
        copy (replacing an existing one, a crash between the two renames leaves it as
        ``.<name>.old`` beside `path`)."""
        dest = Path(path)
        if self._path is not None and dest.exists() and dest.resolve() == self._path.resolve():
            with self.lock:
                for role, r in self.stages.items():
                    r.save(dest / role)
                atomic_write_json(dest / PIPELINE_FILE, self._manifest())
            return
        if dest.exists() and not is_pipeline(dest) and (not dest.is_dir() or any(dest.iterdir())):
            raise StoreError(f"refusing to overwrite {dest}: it exists and is not a pipeline")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            with self.lock:
                for role, r in self.stages.items():
                    r.save(tmp / role)
            atomic_write_json(tmp / PIPELINE_FILE, self._manifest())
            old = dest.with_name(f".{dest.name}.old")
            if dest.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | PathLike[str], **overrides: Any) -> Self:
        """Reopen a saved pipeline. `overrides`: pipeline options (``candidates=100``) and,
        under a stage's role, that stage's load overrides (``second={"device": "cuda"}``)."""
        manifest = read_pipeline(path)
        target: type[Pipeline] = cls
        if cls is Pipeline or manifest["kind"] != cls.name:
            from . import retriever_class

            found = retriever_class(manifest["kind"])
            if not (isinstance(found, type) and issubclass(found, cls)):
                raise StoreError(f"{path} holds a {manifest['kind']!r} pipeline, not {cls.name!r}")
            target = found
        root = Path(path)
        stages: dict[str, Any] = {}
        from . import load_retriever

        try:
            for role in manifest["stages"]:
                extra = overrides.pop(role, {})
                if not isinstance(extra, Mapping):
                    raise InvalidInputError(f"overrides for the {role} stage must be a mapping")
                if not is_index(root / role):
                    raise StoreCorruptedError(
                        root / PIPELINE_FILE,
                        f"its {role} stage is missing (a build that stopped midway: build the "
                        "pipeline again with the same stages and path, which finishes it)",
                    )
                stages[role] = load_retriever(root / role, **extra)
        except BaseException:
            for r in stages.values():
                r.close()
            raise
        options = {**manifest["options"], **overrides}
        try:
            return target._from_stages(stages, options, path=root)  # type: ignore[return-value]
        except TypeError as exc:  # an option the pipeline does not take
            for r in stages.values():
                r.close()
            raise InvalidInputError(f"bad option for the {target.name} pipeline: {exc}") from None
        except BaseException:
            for r in stages.values():
                r.close()
            raise

    @classmethod
    def _from_stages(
        cls, stages: dict[str, Any], options: dict[str, Any], *, path: Path
    ) -> Pipeline:
        raise NotImplementedError

    # ------------------------------------------------------------------ measurements
    def bytes_per_document(self) -> float:
        """Stored bytes per document, all stages together."""
        return float(
            sum(
                r.bytes_per_document()  # type: ignore[attr-defined]
                for r in self.stages.values()
                if hasattr(r, "bytes_per_document")
            )
        )

    def __len__(self) -> int:
        return len(self.stages[self._returning_role()])  # type: ignore[arg-type]

    def __repr__(self) -> str:
        parts = ", ".join(f"{role}={type(r).__name__}" for role, r in self.stages.items())
        return f"{type(self).__name__}({parts}, {self.options})"

    def close(self) -> None:
        for r in self.stages.values():
            getattr(r, "close", lambda: None)()


def _document_ids(r: Any) -> set[str] | None:
    """A stage's live document ids, or None for a retriever that cannot list them."""
    fn = getattr(r, "document_ids", None)
    return fn() if callable(fn) else None


def read_pipeline(path: str | PathLike[str]) -> dict[str, Any]:
    """``pipeline.json`` of `path`, validated."""
    mpath = Path(path) / PIPELINE_FILE
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreNotFoundError(f"no pipeline at {path} (missing {PIPELINE_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreCorruptedError(mpath, f"cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StoreCorruptedError(mpath, f"not an {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise StoreCorruptedError(mpath, f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise StoreVersionError(
            f"{mpath} has format version {version}; this library reads up to {FORMAT_VERSION}"
        )
    stages = manifest.get("stages")
    if (
        not isinstance(manifest.get("kind"), str)
        or not isinstance(manifest.get("options"), dict)
        or not isinstance(stages, list)
        or not stages
        or not all(isinstance(s, str) and s.isidentifier() for s in stages)
    ):
        raise StoreCorruptedError(mpath, "kind, options or stages are missing or malformed")
    return manifest
