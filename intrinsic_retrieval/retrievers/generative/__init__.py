"""Generative retrieval (DSI): the index is a model trained to emit document identifiers.

Import path: ``intrinsic_retrieval.retrievers.generative.GenerativeDocidRetriever``.
"""

from .backbone import Backbone
from .docids import DocidMap, hierarchical_kmeans
from .examples import Doc2QueryGenerator, Example, ExtractiveQueryGenerator, QueryGenerator
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
    "QueryGenerator",
    "TrieLogitsProcessor",
    "hierarchical_kmeans",
]
