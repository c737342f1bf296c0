"""The one place that knows model architectures, keyed by ``config.model_type``.

Retrievers never look inside a Hugging Face model themselves; they ask here:

* `encoder_decoder_for`: encoder, decoder layers, final norm, decoder start id, embeddings and each
  layer's cross-attention (INTRA, generative retrieval with a seq2seq backbone);
* `decoder_only_for`: embeddings, per-layer q/k/v with norms and RoPE, the rest of each layer,
  final norm and LM head (in-context retrieval, generative retrieval with a causal LM);
* `build`: encoder-decoders built from an encoder-only (BERT2BERT) or decoder-only (T5Gemma2 from
  Gemma 3) checkpoint;
* `decoder_layers` / `final_norm`: the two facts every trainer needs, for either kind.

Teaching the library a new backbone means adding one class here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .build import (
    BERT2BERT_PREFIX,
    CROSS_INITS,
    DEFAULT_BERT2BERT_ENCODER,
    T5GEMMA2_PREFIX,
    build_bert2bert,
    load_encoder_decoder,
)
from .decoder_only import ARCHITECTURES as DECODER_ONLY
from .decoder_only import DecoderOnlyArch, Gemma3Arch, decoder_only_for
from .encoder_decoder import ARCHITECTURES as ENCODER_DECODERS
from .encoder_decoder import (
    ATTN_IMPL,
    CrossLayer,
    EncoderDecoderArch,
    decoder_start_id,
    encoder_decoder_for,
    supported_encoder_decoders,
)


def architecture_for(model: nn.Module) -> EncoderDecoderArch | DecoderOnlyArch:
    """The architecture of any supported model with an LM head."""
    if getattr(model.config, "is_encoder_decoder", False):
        return encoder_decoder_for(model)
    return decoder_only_for(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer stack, for either kind."""
    return architecture_for(model).decoder_layers()


def pre_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model applies between its last residual stream and its LM head: the final norm
    (BERT's LM-head transform), and T5's ``d_model ** -0.5`` output rescaling."""
    arch = architecture_for(model)
    norm = arch.final_norm
    scale = None
    if getattr(model.config, "scale_decoder_outputs", False) and hasattr(model, "model_dim"):
        scale = float(model.model_dim) ** -0.5

    def apply(h: torch.Tensor) -> torch.Tensor:
        if norm is not None:
            h = norm(h)
        return h if scale is None else h * scale

    return apply


__all__ = [
    "ATTN_IMPL",
    "BERT2BERT_PREFIX",
    "CROSS_INITS",
    "DECODER_ONLY",
    "DEFAULT_BERT2BERT_ENCODER",
    "ENCODER_DECODERS",
    "T5GEMMA2_PREFIX",
    "CrossLayer",
    "DecoderOnlyArch",
    "EncoderDecoderArch",
    "Gemma3Arch",
    "architecture_for",
    "build_bert2bert",
    "decoder_layers",
    "decoder_only_for",
    "decoder_start_id",
    "encoder_decoder_for",
    "load_encoder_decoder",
    "pre_head",
    "supported_encoder_decoders",
]
