"""Model code shared by the retrievers: loading, fingerprints, encoding/pooling, MaxSim, FAISS."""

from .encoding import (
    default_forward,
    encode_texts,
    l2_normalize,
    mean_pool,
    pool_segments,
    pool_segments_batch,
)
from .faiss_index import VectorIndex, default_nlist, faiss_gpu_available
from .fingerprint import (
    combine_fingerprints,
    config_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from .loading import (
    default_dense_model_path,
    dequantised_copy,
    gemma3_gguf_path,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    smollm2_gguf_path,
)
from .maxsim import maxsim_scores, maxsim_topk, maxsim_varlen, maxsim_varlen_topk

__all__ = [
    "VectorIndex",
    "combine_fingerprints",
    "config_fingerprint",
    "default_dense_model_path",
    "default_forward",
    "default_nlist",
    "dequantised_copy",
    "encode_texts",
    "faiss_gpu_available",
    "gemma3_gguf_path",
    "l2_normalize",
    "load_model",
    "load_tokenizer",
    "maxsim_scores",
    "maxsim_topk",
    "maxsim_varlen",
    "maxsim_varlen_topk",
    "mean_pool",
    "model_fingerprint",
    "pool_segments",
    "pool_segments_batch",
    "resolve_device",
    "resolve_dtype",
    "smollm2_gguf_path",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]
