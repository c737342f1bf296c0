"""Encoder-decoders built from checkpoints that are not encoder-decoders.

Two recipes, each named by a model-string prefix that every retriever accepts:

* ``"bert2bert:<encoder>"``: `EncoderDecoderModel` warm-started from one encoder-only checkpoint
  (Rothe et al. 2020); the decoder's cross-attention is new, initialised from a fixed seed so the
  same build has the same fingerprint on every run.
* ``"t5gemma2:<gemma 3>"``: T5Gemma2 built from a Gemma 3 decoder-only checkpoint, both stacks from
  its weights (`models.t5gemma2`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InvalidInputError

BERT2BERT_PREFIX = "bert2bert:"
T5GEMMA2_PREFIX = "t5gemma2:"
#: the packaged encoder every "bert2bert:" build starts from unless a path or hub id is given
DEFAULT_BERT2BERT_ENCODER = "all-MiniLM-L6-v2"
CROSS_INITS = ("random", "self")


def bert2bert_encoder_path(name: str) -> str:
    """`DEFAULT_BERT2BERT_ENCODER` resolves to the packaged MiniLM; anything else is a local
    path or a hub id."""
    from ..loading import default_dense_model_path

    if not name or (name == DEFAULT_BERT2BERT_ENCODER and not Path(name).exists()):
        return default_dense_model_path()
    return name


def build_bert2bert(path: str, seed: int = 0, cross_init: str = "random") -> nn.Module:
    """`EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)` with a seeded, hence
    reproducible, initialisation of the new cross-attention.

    `cross_init="self"` copies each decoder layer's pretrained self-attention (query, key, value,
    output projection and norm) into its cross-attention. INTRA scores chunks with the
    cross-attention's W_K^T W_Q bilinear form; a random one is uncorrelated with relevance, and
    training only the retrieval tokens and alpha cannot change it. The copy gives it the
    pretrained matching form instead."""
    if cross_init not in CROSS_INITS:
        raise InvalidInputError(f"cross_init must be one of {CROSS_INITS}, got {cross_init!r}")
    from transformers import AutoTokenizer, EncoderDecoderModel
    from transformers.utils import logging as hf_logging

    tok = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialized" is the point here
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    finally:
        hf_logging.set_verbosity(verbosity)
    if cross_init == "self":
        with torch.no_grad():
            for layer in model.decoder.bert.encoder.layer:
                layer.crossattention.load_state_dict(layer.attention.state_dict())
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = tok.cls_token_id
        cfg.pad_token_id = tok.pad_token_id
        cfg.eos_token_id = tok.sep_token_id
    return model.eval()


def load_encoder_decoder(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    cross_init: str = "random",
    encoder_attention: str = "causal",
    memory_adapter: str = "generated",
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a model string: a ``bert2bert:`` or ``t5gemma2:`` build, or any
    seq2seq checkpoint `load_model` reads (directory, hub id)."""
    from ..loading import load_model, load_tokenizer, resolve_device, resolve_dtype

    if model.startswith(T5GEMMA2_PREFIX):
        from ..t5gemma2 import load_from_gemma3

        return load_from_gemma3(
            model.removeprefix(T5GEMMA2_PREFIX),
            encoder=encoder_attention,
            adapter=memory_adapter,
            device=device,
            dtype=dtype,
        )
    if model.startswith(BERT2BERT_PREFIX):
        path = bert2bert_encoder_path(model.removeprefix(BERT2BERT_PREFIX))
        dev = resolve_device(device)
        net = build_bert2bert(path, seed, cross_init)
        return net.to(device=dev, dtype=resolve_dtype(dev, dtype)), load_tokenizer(path)
    return load_model(model, kind="seq2seq", device=device, dtype=dtype)
