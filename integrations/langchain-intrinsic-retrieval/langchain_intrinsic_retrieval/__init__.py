"""LangChain integration for intrinsic-retrieval: every retriever of the library as a LangChain
`BaseRetriever`, and as a document compressor that reranks any first stage."""

from importlib import metadata

from langchain_intrinsic_retrieval.compressors import IntrinsicReranker
from langchain_intrinsic_retrieval.retrievers import (
    CONFIG_FILE,
    IntrinsicRetriever,
    hit_to_document,
)

try:
    __version__ = metadata.version("langchain-intrinsic-retrieval")
except metadata.PackageNotFoundError:  # running from a source checkout
    __version__ = ""

__all__ = [
    "CONFIG_FILE",
    "IntrinsicReranker",
    "IntrinsicRetriever",
    "__version__",
    "hit_to_document",
]
