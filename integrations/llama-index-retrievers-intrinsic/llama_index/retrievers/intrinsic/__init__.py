"""LlamaIndex integration for intrinsic-retrieval: every retriever of the library as a LlamaIndex
`BaseRetriever` (``from llama_index.retrievers.intrinsic import IntrinsicRetriever``), and as a
node postprocessor that reranks any first stage (`IntrinsicRerank`)."""

from llama_index.retrievers.intrinsic.base import CONFIG_FILE, IntrinsicRetriever, hit_to_node
from llama_index.retrievers.intrinsic.filters import to_library_filter
from llama_index.retrievers.intrinsic.postprocessor import IntrinsicRerank

__all__ = [
    "CONFIG_FILE",
    "IntrinsicRerank",
    "IntrinsicRetriever",
    "hit_to_node",
    "to_library_filter",
]
