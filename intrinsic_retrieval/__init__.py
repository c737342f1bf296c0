"""intrinsic-retrieval: retrievers that live inside the model, behind one protocol and one store.

Heavy retriever classes are imported lazily: ``from intrinsic_retrieval import DenseRetriever``
loads the model stack only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointMismatchError,
    ConcurrentWriteError,
    DimensionMismatchError,
    DocidVocabularyError,
    DuplicateIdError,
    EmptyCorpusError,
    EmptyQueryError,
    IdCollisionError,
    IdSpaceExhaustedError,
    InvalidFilterError,
    InvalidInputError,
    ModelLoadError,
    ModelMismatchError,
    NotTrainedError,
    RetrievalError,
    StageMismatchError,
    StoreCorruptedError,
    StoreError,
    StoreNotFoundError,
    StorePermissionError,
    StoreRecoveryNeededError,
    StoreVersionError,
    UnknownIdError,
    UnsupportedArchitectureError,
)
from .protocol import Filter, Retriever
from .retrievers import available, create_retriever, load_retriever
from .types import Chunk, Document, Hit

if TYPE_CHECKING:
    from .chunking import Chunker
    from .retrievers.base import StoreRetriever
    from .retrievers.bm25 import BM25Retriever
    from .retrievers.dense import DenseRetriever
    from .retrievers.fusion import Fusion
    from .retrievers.generative import GenerativeDocidRetriever
    from .retrievers.incontext import InContextRetriever
    from .retrievers.intra import IntraRetriever
    from .retrievers.pipeline import Pipeline
    from .retrievers.rerank import Rerank
    from .store import EncodedChunkStore, TensorSpec
    from .training import FitConfig, FitReport

__version__ = "0.1.0"

_LAZY = {
    "BM25Retriever": ".retrievers.bm25",
    "DenseRetriever": ".retrievers.dense",
    "IntraRetriever": ".retrievers.intra",
    "InContextRetriever": ".retrievers.incontext",
    "GenerativeDocidRetriever": ".retrievers.generative",
    "StoreRetriever": ".retrievers.base",
    "Rerank": ".retrievers.rerank",
    "Fusion": ".retrievers.fusion",
    "Pipeline": ".retrievers.pipeline",
    "FitConfig": ".training",
    "FitReport": ".training",
    "EncodedChunkStore": ".store",
    "TensorSpec": ".store",
    "Chunker": ".chunking",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'intrinsic_retrieval' has no attribute {name!r}")


__all__ = [
    "BM25Retriever",
    "CheckpointMismatchError",
    "Chunk",
    "Chunker",
    "ConcurrentWriteError",
    "DenseRetriever",
    "DimensionMismatchError",
    "DocidVocabularyError",
    "Document",
    "DuplicateIdError",
    "EmptyCorpusError",
    "EmptyQueryError",
    "EncodedChunkStore",
    "Filter",
    "FitConfig",
    "FitReport",
    "Fusion",
    "GenerativeDocidRetriever",
    "Hit",
    "IdCollisionError",
    "IdSpaceExhaustedError",
    "InContextRetriever",
    "IntraRetriever",
    "InvalidFilterError",
    "InvalidInputError",
    "ModelLoadError",
    "ModelMismatchError",
    "NotTrainedError",
    "Pipeline",
    "Rerank",
    "RetrievalError",
    "Retriever",
    "StageMismatchError",
    "StoreCorruptedError",
    "StoreError",
    "StoreNotFoundError",
    "StorePermissionError",
    "StoreRecoveryNeededError",
    "StoreRetriever",
    "StoreVersionError",
    "TensorSpec",
    "UnknownIdError",
    "UnsupportedArchitectureError",
    "__version__",
    "available",
    "create_retriever",
    "load_retriever",
]
