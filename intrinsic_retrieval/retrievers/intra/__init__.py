"""INTRA: retrieval from within an encoder-decoder (Reverse-QWK, retrieval tokens, generation
from stored encoder states)."""

from .head import RetrievalHead
from .retriever import BERT2BERT_MODEL, DEFAULT_MODEL, IntraRetriever, default_model

__all__ = [
    "BERT2BERT_MODEL",
    "DEFAULT_MODEL",
    "IntraRetriever",
    "RetrievalHead",
    "default_model",
]
