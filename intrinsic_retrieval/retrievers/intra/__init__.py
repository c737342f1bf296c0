"""INTRA: retrieval from within an encoder-decoder (Reverse-QWK, retrieval tokens, generation
from stored encoder states)."""

from .adapters import adapter_for, supported_architectures
from .head import RetrievalHead
from .retriever import DEFAULT_MODEL, IntraRetriever

__all__ = [
    "DEFAULT_MODEL",
    "IntraRetriever",
    "RetrievalHead",
    "adapter_for",
    "supported_architectures",
]
