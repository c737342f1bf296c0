"""BlockSearch in-context retrieval: a decoder-only LM reads the corpus as independent document
blocks and the query attends to all of them (see docs/incontext.md)."""

from .retriever import InContextRetriever

__all__ = ["InContextRetriever"]
