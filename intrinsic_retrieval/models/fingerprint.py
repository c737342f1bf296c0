"""Fingerprints that tie a store (or a trained head) to the exact model and tokenizer that made it.

Weights are hashed after rounding to bfloat16, on CPU, in name order. The rounding is the choice
that makes the fingerprint independent of how the model was loaded: a float32 checkpoint loaded
in float32 or in bfloat16, on CPU or CUDA, gives the same digest (fp32 -> bf16 is the same
round-to-nearest-even cast that loading in bf16 performs). A float16 load usually matches too,
but fp32 -> fp16 -> bf16 can round differently in rare tie cases, so it is not guaranteed. The
cost is that weight changes smaller than bf16 precision in *every* tensor go unnoticed, which no
real fine-tuning produces. Hashing raw bytes instead would make every dtype change look like a
different model and force needless re-indexing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import torch

from ..errors import InvalidInputError

FINGERPRINT_VERSION = "intrinsic-retrieval/fingerprint/v1"
_CACHE_ATTR = "_intrinsic_retrieval_fingerprint"
_CHUNK = 1 << 22  # elements per hashed piece: bounds the extra memory of the bf16 copy

# Config keys that describe how a model was loaded or saved, not what it computes.
_VOLATILE_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "attn_implementation",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "torchscript",
        "use_return_dict",
        "quantization_config",
        "device_map",
    }
)


def _clean_config(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            str(k): _clean_config(v)
            for k, v in obj.items()
            if k not in _VOLATILE_KEYS and not str(k).startswith("_")
        }
    if isinstance(obj, list | tuple):
        return [_clean_config(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return None
    return obj


def config_fingerprint(model: torch.nn.Module) -> str:
    """Digest of the class name and the architecture-defining part of `model.config`."""
    config = getattr(model, "config", None)
    data: dict[str, Any] = {"class": type(model).__name__}
    if config is not None:
        data["config"] = _clean_config(config.to_dict())
    text = json.dumps(data, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=32).hexdigest()


def _hash_tensor(h: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start : start + _CHUNK].to(torch.bfloat16).cpu()
            h.update(piece.view(torch.int16).numpy().tobytes())
    else:
        for start in range(0, flat.numel(), _CHUNK):
            piece = flat[start : start + _CHUNK].to(torch.int64).cpu()
            h.update(piece.numpy().tobytes())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Digest of every persistent tensor in the state dict (see the module docstring)."""
    h = hashlib.blake2b(digest_size=32)
    seen: dict[tuple[Any, ...], str] = {}
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if tensor.device.type == "meta":
            raise InvalidInputError(f"cannot fingerprint weight {name!r}: it is on the meta device")
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.is_floating_point()}|".encode())
        # tied weights appear under several names; hash the storage once, then by reference
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            h.update(f"tied:{seen[key]}|".encode())
            continue
        seen[key] = name
        _hash_tensor(h, tensor)
    return h.hexdigest()


def _cache_key(model: torch.nn.Module) -> tuple[Any, ...]:
    """Changes whenever a parameter or buffer is replaced, moved, cast or modified in place
    (optimizer steps and `load_state_dict` bump `_version`), so the cached digest stays valid."""
    return tuple(
        (t.data_ptr(), t._version, t.dtype, t.device)
        for t in (*model.parameters(), *model.buffers())
    )


def model_fingerprint(model: torch.nn.Module, *, refresh: bool = False) -> str:
    """Stable hex digest of (class, architecture config, weights).

    Cached on the model; the cache is invalidated automatically when weights are replaced,
    moved, cast or changed in place through autograd-visible ops. Writes through ``.data``
    (e.g. peft's ``merge_and_unload``) do not bump tensor versions and are invisible to the
    cache: pass ``refresh=True`` after such edits.
    """
    key = _cache_key(model)
    cached = getattr(model, _CACHE_ATTR, None)
    if not refresh and cached is not None and cached[0] == key:
        return cached[1]
    digest = combine_fingerprints(
        FINGERPRINT_VERSION, config_fingerprint(model), weights_fingerprint(model)
    )
    with contextlib.suppress(AttributeError, TypeError):  # exotic wrappers without __dict__
        object.__setattr__(model, _CACHE_ATTR, (key, digest))
    return digest


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Digest of what the tokenizer maps text to: the full backend definition for fast
    tokenizers (vocab, merges, normalizer, pre-tokenizer), else the vocab and special tokens.
    Truncation/padding state is left out: transformers changes it on every call."""
    payload: dict[str, Any] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        payload["backend"] = spec
    else:
        payload["vocab"] = sorted(tokenizer.get_vocab().items())
    special = getattr(tokenizer, "all_special_tokens", None) or []
    payload["special"] = sorted(str(t) for t in special)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    payload["added"] = sorted((int(i), str(t)) for i, t in added.items())
    text = json.dumps(payload, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=32).hexdigest()


def combine_fingerprints(*parts: str) -> str:
    """One digest for several parts (order matters); length-prefixed so joins are unambiguous."""
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        b = str(part).encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
