"""Scale-out on Ray (the ``ray`` extra): distributed indexing into store parts, combining them
into one store, and search over parts served by Ray actors (docs/scale-out.md).

Planning and combining parts need no Ray; indexing and search import it when called.
"""

from .indexing import IndexReport, MissingDependencyError, PartFailedError, index_distributed
from .parts import PartsError, combine, parts_dir, split_ranges
from .search import DistributedRetriever, merge_top_k

__all__ = [
    "DistributedRetriever",
    "IndexReport",
    "MissingDependencyError",
    "PartFailedError",
    "PartsError",
    "combine",
    "index_distributed",
    "merge_top_k",
    "parts_dir",
    "split_ranges",
]
