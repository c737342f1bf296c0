"""Typed errors. Every failure a user can cause maps to one class here, so callers can catch
precisely and messages can name the offending file, id or dimension."""

from __future__ import annotations

import functools


class RetrievalError(Exception):
    """Base class of every error this library raises on purpose.

    Errors cross process boundaries intact (a Ray worker's `ModelMismatchError` reaches the
    driver as itself): the arguments of the outermost constructor call are kept and rebuild the
    error when it is unpickled, which `Exception`'s default (message only) cannot do for the
    subclasses that take other arguments."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self: RetrievalError, *args: object, **kw: object) -> None:
            if "_init_args" not in self.__dict__:  # the outermost call: the one to replay
                self._init_args = (args, kw)
            init(self, *args, **kw)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def __reduce__(self) -> tuple[object, ...]:
        args, kwargs = self.__dict__.get("_init_args", (self.args, {}))
        return (_rebuild_error, (type(self), args, kwargs))


def _rebuild_error(
    cls: type[RetrievalError], args: tuple[object, ...], kwargs: dict[str, object]
) -> RetrievalError:
    return cls(*args, **kwargs)


class InvalidInputError(RetrievalError, ValueError):
    """Input that cannot be processed as given (bad type, wrong shape, malformed record)."""


class EmptyQueryError(InvalidInputError):
    """A query that is empty or only whitespace."""


class EmptyCorpusError(InvalidInputError):
    """Indexing nothing, or searching a retriever that holds no chunks."""


class DuplicateIdError(InvalidInputError):
    """A document or chunk id that already exists (in the batch or in the store)."""

    def __init__(self, ids: list[str], where: str = "store") -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:5])
        more = f" (+{len(self.ids) - 5} more)" if len(self.ids) > 5 else ""
        super().__init__(
            f"duplicate id(s) already in the {where}: {shown}{more}; "
            "pass on_duplicate='skip' to ignore them or delete them first"
        )


class IdCollisionError(InvalidInputError):
    """An id that would be both a chunk id and another document's id (``"a#0"`` as a document
    id beside document ``"a"``): `delete` could then remove chunks that were not named."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.ids = [i for i, _ in pairs]
        shown = "; ".join(f"{i!r} ({what})" for i, what in pairs[:5])
        super().__init__(
            f"id(s) would name both a chunk and another document: {shown}; "
            "choose document ids that cannot be mistaken for chunk ids (document id + '#n')"
        )


class DimensionMismatchError(InvalidInputError):
    """A tensor whose shape or dtype does not match the store's tensor spec."""


class InvalidFilterError(InvalidInputError):
    """A metadata filter that cannot be compiled."""


class UnknownIdError(InvalidInputError, KeyError):
    """An id that is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown id"


class StoreError(RetrievalError):
    """Base class of on-disk store problems."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """The path holds no store (no manifest.json)."""


class StorePermissionError(StoreError, PermissionError):
    """The store (or a file in it) exists but this user may not read or write it."""

    def __init__(self, path: object, action: str = "read") -> None:
        self.path = path
        super().__init__(
            f"{path}: permission denied ({action}); the store is not damaged: open it as a user "
            "who may, or change the files' permissions"
        )


class StoreRecoveryNeededError(StoreError):
    """A write was interrupted and only a writable open may finish recovering the store; the
    store is not corrupted."""

    def __init__(self, path: object) -> None:
        self.path = path
        super().__init__(
            f"{path}: interrupted write; open the store once writable (e.g. `intrinsic-retrieval "
            "index` or any writable load) to recover it, then read-only opens work again"
        )


class StoreCorruptedError(StoreError):
    """A store file is truncated, fails its checksum, or cannot be parsed. Names the file."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"store file {self.path} is corrupted: {reason}")


class StoreVersionError(StoreError):
    """The store was written by a newer format version than this library reads."""


class ModelMismatchError(StoreError):
    """The store (or a trained head) was made by a different model, or with other index
    options (its recipe), than the ones given."""

    def __init__(
        self,
        path: object,
        expected: str,
        found: str,
        *,
        what: str = "model",
        hint: str = "load the model that built it or rebuild the index",
    ) -> None:
        self.path = str(path)
        self.expected = expected
        self.found = found
        super().__init__(
            f"{self.path} was made by {what} fingerprint {found[:16]}…, but the {what} in use "
            f"has fingerprint {expected[:16]}…; {hint}"
        )


class ModelLoadError(RetrievalError, OSError):
    """A model could not be loaded (offline hub, missing files, unsupported architecture)."""


class UnsupportedArchitectureError(ModelLoadError, ValueError):
    """The model's architecture has no adapter for this retriever."""


class NotTrainedError(RetrievalError, RuntimeError):
    """A retriever that needs training was queried before `fit`."""


class IdSpaceExhaustedError(InvalidInputError):
    """More documents than the document-identifier scheme can name (generative retrieval)."""


class DocidVocabularyError(StoreError):
    """A stored docid map does not fit the model: token ids outside its vocabulary, a tokenizer
    that no longer produces the stored sequences, or an atomic head of the wrong size."""


class CheckpointMismatchError(RetrievalError):
    """A training checkpoint that belongs to another corpus, docid map or model."""


class StageMismatchError(StoreError):
    """The stages of a composed retriever (`Rerank`, `Fusion`) do not hold the same documents:
    a second stage that lacks a first-stage candidate, or stores built from different corpora."""

    def __init__(self, message: str, ids: list[str] | None = None) -> None:
        self.ids = list(ids or [])
        super().__init__(message)


class ConcurrentWriteError(StoreError):
    """Another process holds the store's single-writer lock, or the store was changed on disk by
    another handle since this one opened it (reopen it to see the new state)."""
