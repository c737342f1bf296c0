"""Generative retrieval (DSI): the index is a model trained to emit document identifiers.

Import path: ``intrinsic_retrieval.retrievers.generative.GenerativeDocidRetriever``.
"""

from ...training.queries import (
    Doc2QueryGenerator,
    ExtractiveQueryGenerator,
    LMQueryGenerator,
    QueryGenerator,
)
from .backbone import Backbone
from .docids import DocidMap, hierarchical_kmeans
from .examples import Example
from .retriever import GenerativeDocidRetriever
from .train import GenerativeFitConfig
from .trie import DocidTrie, TrieLogitsProcessor

__all__ = [
    "Backbone",
    "Doc2QueryGenerator",
    "DocidMap",
    "DocidTrie",
    "Example",
    "ExtractiveQueryGenerator",
    "GenerativeDocidRetriever",
    "GenerativeFitConfig",
    "LMQueryGenerator",
    "QueryGenerator",
    "TrieLogitsProcessor",
    "hierarchical_kmeans",
]
