"""Records that cross the public API: documents in, chunks stored, hits out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class Document:
    """A source document. `id` is the caller's; it is generated from the text hash when absent."""

    text: str
    id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A span of one document, the unit that is encoded, stored and returned."""

    id: str
    document_id: str
    text: str
    metadata: Mapping[str, Any]
    start: int = 0  # character offsets in the parent document
    end: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. `rank` starts at 1; `score` is comparable only within one retriever."""

    chunk_id: str
    document_id: str
    text: str
    score: float
    rank: int
    metadata: Mapping[str, Any] = field(default_factory=dict)


DocumentLike = str | Document | Mapping[str, Any]


def _stable_id(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def as_document(obj: Any) -> Document:
    """Accept `str`, `Document`, a mapping with id/text/metadata, or any object with
    `page_content`/`text` and `metadata` attributes (LangChain and LlamaIndex records)."""
    if isinstance(obj, Document):
        doc = obj
    elif isinstance(obj, str):
        doc = Document(text=obj)
    elif isinstance(obj, Mapping):
        text = obj.get("text", obj.get("page_content"))
        if text is None:
            raise InvalidInputError(f"document mapping needs a 'text' field: {dict(obj)!r:.200}")
        if not isinstance(text, str):  # bytes would be stored as the string "b'...'"
            raise InvalidInputError(f"document text must be str, got {type(text).__name__}")
        ident = obj.get("id", obj.get("_id"))
        doc = Document(
            text=text,
            id=None if ident is None else str(ident),
            metadata=_metadata(obj.get("metadata")),
        )
    else:
        text = getattr(obj, "page_content", None)
        if text is None:
            text = getattr(obj, "text", None)
        if text is None:
            raise InvalidInputError(f"cannot read a document from {type(obj).__name__}")
        ident = getattr(obj, "id", None) or getattr(obj, "id_", None)
        doc = Document(
            text=str(text),
            id=None if ident is None else str(ident),
            metadata=_metadata(getattr(obj, "metadata", None)),
        )
    if not isinstance(doc.text, str):
        raise InvalidInputError(f"document text must be str, got {type(doc.text).__name__}")
    if not isinstance(doc.metadata, Mapping):
        doc = Document(text=doc.text, id=doc.id, metadata=_metadata(doc.metadata))
    try:
        doc.text.encode("utf-8")
        (doc.id or "").encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: SQLite cannot store them
        raise InvalidInputError(
            f"document {doc.id!r:.60} holds characters that are not valid Unicode text "
            f"(a lone surrogate at position {exc.start})"
        ) from None
    if doc.id is None:
        doc = Document(text=doc.text, id=_stable_id(doc.text), metadata=doc.metadata)
    return doc


def _metadata(meta: Any) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise InvalidInputError(f"document metadata must be a mapping, got {type(meta).__name__}")
    return dict(meta)


def as_documents(docs: Iterable[Any]) -> list[Document]:
    if isinstance(docs, str | Document | Mapping):
        docs = [docs]
    if docs is None or not isinstance(docs, Iterable):
        raise InvalidInputError(
            f"documents must be an iterable of documents, got {type(docs).__name__}"
        )
    return [as_document(d) for d in docs]
