"""Encoder-decoder architectures: where each keeps its layers, norms and cross-attention.

Looked up by ``config.model_type`` (`encoder_decoder_for`). Every supported model is driven
through the same three things:

* `encode`: the single encoder representation that every decoder layer's cross-attention keys
  are computed from (the encoder's final, normalised output; for `EncoderDecoderModel` the
  optional ``enc_to_dec_proj`` is folded into the key side instead of being stored).
* `layers`: for each decoder layer, the cross-attention key map acting on that representation
  (W_K, bias, per-head key RMSNorm scale, GQA grouping), the score scaling and logit soft-cap.
* a query tap: the model runs with the ``"intra"`` attention implementation (eager attention
  plus per-module hooks), so the cross-attention query states are read exactly as the model
  computes them (after T5Gemma2's q-norm and RoPE), never re-derived.

Architectures: T5 / flan-T5 / T5-efficient / mT5 / UMT5 (`T5Attention`), BART / mBART
(`*Attention` with ``encoder_attn``), T5Gemma, T5Gemma2 (merged self+cross attention) and
`EncoderDecoderModel` with a BERT-style decoder (BERT2BERT).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import nn

from ...errors import UnsupportedArchitectureError

ATTN_IMPL = "intra"

#: hook(module, query, key, value, mask, kwargs) -> None (observe) or an (output, weights) override
AttnHook = Callable[..., Any]


# ---------------------------------------------------------------------- attention implementation
def _module_eager(module: nn.Module) -> Callable[..., Any]:
    mod = importlib.import_module(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:  # pragma: no cover - every supported modelling file defines one
        raise UnsupportedArchitectureError(f"{type(module).__name__} has no eager attention")
    return fn


def intra_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention with an optional per-module hook (query tap, null memory)."""
    hook: AttnHook | None = getattr(module, "_intra_hook", None)
    if hook is not None:
        override = hook(module, query, key, value, attention_mask, kwargs)
        if override is not None:
            return override
    return _module_eager(module)(module, query, key, value, attention_mask, **kwargs)


_REGISTERED = False


def register_attention() -> None:
    """Register ``"intra"`` with transformers (attention function and its eager-style mask)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_IMPL, intra_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    _REGISTERED = True


# ---------------------------------------------------------------------- layer description
@dataclass
class CrossLayer:
    """One decoder layer's cross-attention, seen from the stored representation E.

    Pre-softmax logit of query head h against memory token e (g = h // (H / G)):
    ``softcap(scaling * <q_h, normk(W_g e + b_g)>)`` where ``normk`` is the identity or an
    RMSNorm over the head dimension with scale `key_norm_weight` (T5Gemma2).
    """

    attn: nn.Module
    weight: torch.Tensor  # (G * head_dim, d_mem)
    bias: torch.Tensor | None  # (G * head_dim,)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None = None
    key_norm_weight: torch.Tensor | None = None  # (head_dim,) effective multiplicative scale
    key_norm_eps: float = 1e-6
    merged: bool = False  # cross keys appended to the self-attention keys (T5Gemma2)
    query_proj: nn.Module | None = None  # the cross-attention's query projection (query LoRA)


# ---------------------------------------------------------------------- architectures
class EncoderDecoderArch:
    """What every encoder-decoder exposes; subclasses fill in the architecture specifics."""

    #: short name, part of INTRA's store fingerprint (never rename one)
    arch: ClassVar[str] = ""
    #: ``config.model_type`` values served by this class
    model_types: ClassVar[tuple[str, ...]] = ()
    #: model classes with an LM head, named in error messages
    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers: list[CrossLayer] | None = None

    def tap_attention(self) -> Self:
        """Run the model with the ``"intra"`` attention implementation (eager attention plus
        per-module hooks), which INTRA needs to read cross-attention queries; nothing else
        changes in the model's outputs."""
        register_attention()
        self.model.set_attn_implementation(ATTN_IMPL)
        return self

    # --- encoder side
    def encoder(self) -> nn.Module:
        return self.model.get_encoder()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The stored representation ``(B, T, d)`` every cross-attention key is computed from."""
        out = self.encoder()(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def memory_dim(self) -> int:
        return int(self.layers()[0].weight.shape[1])

    # --- decoder side
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's layer stack (what training freezes or unfreezes by depth)."""
        return self.decoder().layers

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm between the decoder's last layer and the LM head (None if it has none)."""
        return getattr(self.decoder(), "norm", None)

    def decoder_embeddings(self) -> nn.Module:
        return self.model.get_decoder().get_input_embeddings()

    def decoder_start_id(self, tokenizer: Any) -> int:
        return decoder_start_id(self.model.config, tokenizer)

    def decoder_max_positions(self) -> int | None:
        return None

    def forward(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        decoder_inputs_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Decoder logits ``(B, T, V)`` over `memory` ``(B, S, d)``."""
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=memory_mask,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=False,
        )
        return out.logits

    def layers(self) -> list[CrossLayer]:
        if self._layers is None:
            self._layers = self._build_layers()
        return self._layers

    def _build_layers(self) -> list[CrossLayer]:
        raise NotImplementedError

    @property
    def key_norm(self) -> bool:
        return any(layer.key_norm_weight is not None for layer in self.layers())


def _linear(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return m.weight.detach(), None if m.bias is None else m.bias.detach()


class T5Arch(EncoderDecoderArch):
    """T5 family: no 1/sqrt(d) scaling, no biases, keys from the final encoder layer norm."""

    arch = "t5"
    model_types = ("t5", "mt5", "umt5")
    model_classes = (
        "T5ForConditionalGeneration",
        "MT5ForConditionalGeneration",
        "UMT5ForConditionalGeneration",
    )

    def decoder_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.decoder.block

    @property
    def final_norm(self) -> nn.Module | None:
        return self.model.decoder.final_layer_norm

    def _build_layers(self) -> list[CrossLayer]:
        out = []
        for block in self.model.decoder.block:
            attn = block.layer[1].EncDecAttention
            w, b = _linear(attn.k)
            out.append(
                CrossLayer(
                    attn,
                    w,
                    b,
                    attn.n_heads,
                    attn.n_heads,
                    attn.key_value_proj_dim,
                    float(attn.scaling),
                    query_proj=attn.q,
                )
            )
        return out


class BartArch(EncoderDecoderArch):
    """BART / mBART: biased projections, query scaled by 1/sqrt(head_dim)."""

    arch = "bart"
    model_types = ("bart", "mbart")
    model_classes = ("BartForConditionalGeneration", "MBartForConditionalGeneration")

    @property
    def final_norm(self) -> nn.Module | None:
        return getattr(self.decoder(), "layer_norm", None)  # mBART has one, BART none

    def decoder_max_positions(self) -> int | None:
        return int(self.model.config.max_position_embeddings)

    def _build_layers(self) -> list[CrossLayer]:
        out = []
        for layer in self.model.get_decoder().layers:
            attn = layer.encoder_attn
            w, b = _linear(attn.k_proj)
            out.append(
                CrossLayer(
                    attn,
                    w,
                    b,
                    attn.num_heads,
                    attn.num_heads,
                    attn.head_dim,
                    float(attn.scaling),
                    query_proj=attn.q_proj,
                )
            )
        return out


class T5GemmaArch(EncoderDecoderArch):
    """T5Gemma: a separate cross-attention per layer, GQA, optional logit soft-capping."""

    arch = "t5gemma"
    model_types = ("t5gemma",)
    model_classes = ("T5GemmaForConditionalGeneration",)

    def _build_layers(self) -> list[CrossLayer]:
        out = []
        for layer in self.model.get_decoder().layers:
            attn = layer.cross_attn
            w, b = _linear(attn.k_proj)
            cfg = attn.config
            n_heads = int(cfg.num_attention_heads)
            out.append(
                CrossLayer(
                    attn,
                    w,
                    b,
                    n_heads,
                    int(cfg.num_key_value_heads),
                    int(attn.head_dim),
                    float(attn.scaling),
                    softcap=attn.attn_logit_softcapping,
                    query_proj=attn.q_proj,
                )
            )
        return out


class T5Gemma2Arch(EncoderDecoderArch):
    """T5Gemma2: merged self+cross attention; cross keys are ``k_norm(k_proj(E))`` with a
    per-head RMSNorm whose learned scale (1 + w) moves to the query side (Reverse-QWK); the
    per-token RMS factor is the only part that stays on the memory side. A model built from
    Gemma 3 (`models.t5gemma2`) may run its encoder causally and carry a linear memory adapter
    per decoder layer, folded into W_K here."""

    arch = "t5gemma2"
    model_types = ("t5gemma2",)
    model_classes = ("T5Gemma2ForConditionalGeneration",)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from ...models.t5gemma2 import encode

        return encode(self.model, input_ids, attention_mask)

    def _build_layers(self) -> list[CrossLayer]:
        from ...models.t5gemma2 import memory_adapter

        out = []
        for layer in self.model.get_decoder().layers:
            attn = layer.self_attn
            w, b = _linear(attn.k_proj)
            adapter = memory_adapter(attn)
            if adapter is not None:  # keys are W_K (A e + c): fold A and c like W_K and b
                aw, ab = _linear(adapter)
                b = (w @ ab if ab is not None else None) if b is None else b + w @ ab
                w = w @ aw
            cfg = attn.config
            out.append(
                CrossLayer(
                    attn,
                    w,
                    b,
                    int(cfg.num_attention_heads),
                    int(cfg.num_key_value_heads),
                    int(attn.head_dim),
                    float(attn.scaling),
                    softcap=None,
                    key_norm_weight=(1.0 + attn.k_norm.weight.detach().float()),
                    key_norm_eps=float(attn.k_norm.eps),
                    merged=True,
                    query_proj=attn.q_proj,
                )
            )
        return out


class Bert2BertArch(EncoderDecoderArch):
    """`EncoderDecoderModel` with a BERT-style decoder (BERT2BERT, RoBERTa2RoBERTa, ...).
    ``enc_to_dec_proj`` (present when hidden sizes differ) is folded into every W_K."""

    arch = "encoder-decoder"
    model_types = ("encoder-decoder",)
    model_classes = ("EncoderDecoderModel",)

    def decoder_layers(self) -> nn.ModuleList:
        base = getattr(self.model.decoder, "base_model", self.model.decoder)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if layers is None or not hasattr(layers[0], "crossattention"):
            raise UnsupportedArchitectureError(
                f"EncoderDecoderModel decoder {type(self.model.decoder).__name__} has no "
                "BERT-style `crossattention` layers; supported decoders are BERT-like "
                "(add_cross_attention=True)"
            )
        return layers

    @property
    def final_norm(self) -> nn.Module | None:
        """BERT's LM-head transform (dense + activation + LayerNorm) precedes its decoder."""
        cls = getattr(self.model.decoder, "cls", None)
        return getattr(getattr(cls, "predictions", None), "transform", None)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def decoder_embeddings(self) -> nn.Module:
        return self.model.decoder.get_input_embeddings()

    def decoder_max_positions(self) -> int | None:
        return int(getattr(self.model.decoder.config, "max_position_embeddings", 512))

    def _build_layers(self) -> list[CrossLayer]:
        layers = self.decoder_layers()
        proj = getattr(self.model, "enc_to_dec_proj", None)
        out = []
        for layer in layers:
            attn = layer.crossattention.self
            w, b = _linear(attn.key)
            if proj is not None:
                pw, pb = _linear(proj)
                if pb is not None:
                    b = w @ pb if b is None else b + w @ pb
                w = w @ pw
            n_heads = int(attn.num_attention_heads)
            out.append(
                CrossLayer(
                    attn,
                    w,
                    b,
                    n_heads,
                    n_heads,
                    int(attn.attention_head_size),
                    float(attn.scaling),
                    query_proj=attn.query,
                )
            )
        return out


ARCHITECTURES: tuple[type[EncoderDecoderArch], ...] = (
    T5Arch,
    BartArch,
    T5GemmaArch,
    T5Gemma2Arch,
    Bert2BertArch,
)
_BY_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def supported_encoder_decoders() -> list[str]:
    return [c for a in ARCHITECTURES for c in a.model_classes]


def decoder_start_id(config: Any, tokenizer: Any = None) -> int:
    """The token a decoder starts from: the config's, else the decoder config's (BERT2BERT),
    else the tokenizer's CLS or BOS, else padding, else 0."""
    dec = getattr(config, "decoder", None)
    for start in (
        getattr(config, "decoder_start_token_id", None),
        getattr(dec, "decoder_start_token_id", None),
        getattr(dec, "bos_token_id", None),
        getattr(tokenizer, "cls_token_id", None),
        getattr(tokenizer, "bos_token_id", None),
        getattr(config, "pad_token_id", None),
    ):
        if start is not None:
            return int(start)
    return 0


def encoder_decoder_for(model: nn.Module) -> EncoderDecoderArch:
    """The architecture of an encoder-decoder with an LM head, by ``config.model_type``;
    `UnsupportedArchitectureError` names the supported ones."""
    cfg = getattr(model, "config", None)
    cls = _BY_TYPE.get(str(getattr(cfg, "model_type", None)))
    if (
        cls is None
        or not getattr(cfg, "is_encoder_decoder", False)
        or model.get_output_embeddings() is None
    ):
        raise UnsupportedArchitectureError(
            f"INTRA needs an encoder-decoder with cross-attention; {type(model).__name__} is not "
            f"supported. Supported: {', '.join(supported_encoder_decoders())}"
        )
    return cls(model)
