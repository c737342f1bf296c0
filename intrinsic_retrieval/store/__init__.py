"""The encoded-chunk store shared by every retriever (see `store.py` for the layout)."""

from .store import FORMAT_VERSION, EncodedChunkStore, TensorSpec

__all__ = ["FORMAT_VERSION", "EncodedChunkStore", "TensorSpec"]
