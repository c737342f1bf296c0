"""LlamaIndex integration for intrinsic-retrieval: every retriever of the library as a LlamaIndex
`BaseRetriever` (``from llama_index.retrievers.intrinsic import IntrinsicRetriever``)."""

from llama_index.retrievers.intrinsic.base import CONFIG_FILE, IntrinsicRetriever, hit_to_node
from llama_index.retrievers.intrinsic.filters import to_library_filter

__all__ = ["CONFIG_FILE", "IntrinsicRetriever", "hit_to_node", "to_library_filter"]
