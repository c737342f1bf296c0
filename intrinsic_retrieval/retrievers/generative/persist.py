"""Keeping "the index is the model" self-contained: the trained model, its tokenizer and the
docid map live in the store's ``aux/`` folder as safetensors (no pickle), so `load(path)` needs
nothing but the store directory.

* ``aux/model``     every weight of the backbone (tied weights stored once per name) plus
  ``docid_head.weight`` for atomic ids; meta: model class, config JSON, backbone kind, weights
  fingerprint, training report.
* ``aux/tokenizer`` the files `save_pretrained` writes, as uint8 tensors keyed by file name.
* ``aux/docids``    the docid map as JSON (meta) and the semantic centroids (tensor).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import StoreCorruptedError, UnsupportedArchitectureError
from ...store import EncodedChunkStore

HEAD_KEY = "docid_head.weight"


def model_tensors(model: nn.Module, head: nn.Linear | None) -> dict[str, torch.Tensor]:
    out = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    if head is not None:
        out[HEAD_KEY] = head.weight.detach().to("cpu").clone().contiguous()
    return out


def model_meta(model: nn.Module, kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "class": type(model).__name__,
        "config_class": type(model.config).__name__,
        "config": model.config.to_dict(),
        "kind": kind,
        **extra,
    }


def build_model(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[nn.Module, torch.Tensor | None]:
    """Rebuild the model class from its config and load the stored weights into it."""
    import transformers

    cls = getattr(transformers, meta["class"], None)
    config_cls = getattr(transformers, meta["config_class"], None)
    if cls is None or config_cls is None:
        raise UnsupportedArchitectureError(
            f"stored model class {meta['class']} / {meta['config_class']} is not available in "
            f"transformers {transformers.__version__}"
        )
    config = config_cls.from_dict(dict(meta["config"]))
    dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
    if hasattr(config, "dtype"):
        config.dtype = dtype
    model = cls(config)
    tensors = dict(tensors)
    head = tensors.pop(HEAD_KEY, None)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if not _is_tied(model, m)]:
        raise StoreCorruptedError(
            "aux/model",
            f"weights do not fit {meta['class']}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}",
        )
    return model.to(dtype).eval(), head


def _is_tied(model: nn.Module, name: str) -> bool:
    return name.endswith(("lm_head.weight", "decoder.weight", "embed_tokens.weight"))


def tokenizer_tensors(tokenizer: Any) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        out = {}
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                data = f.read_bytes()
                out[f.name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
        return out


def build_tokenizer(tensors: dict[str, torch.Tensor]) -> Any:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, t in tensors.items():
            (Path(tmp) / name).write_bytes(t.numpy().tobytes())
        return AutoTokenizer.from_pretrained(tmp)


def read_stored_model(
    path: str | Path,
) -> tuple[nn.Module, Any, str, torch.Tensor | None, dict] | None:
    """(model, tokenizer, kind, head weight, meta) from a store, or None if it holds no model."""
    if not (Path(path) / "manifest.json").exists():
        return None
    store = EncodedChunkStore.open(path, read_only=True)
    try:
        got = store.get_aux("model")
        tok = store.get_aux("tokenizer")
        if got is None or tok is None:
            return None
        tensors, meta = got
        model, head = build_model(meta, {k: v.clone() for k, v in tensors.items()})
        tokenizer = build_tokenizer(tok[0])
        return model, tokenizer, meta["kind"], head, meta
    finally:
        store.close()
