"""Per-architecture adapters: where an encoder-decoder keeps what INTRA needs.

Every supported model is driven through the same three things:

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
from typing import Any, ClassVar

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


# ---------------------------------------------------------------------- adapters
class EncDecAdapter:
    """Base adapter; subclasses fill in the architecture specifics."""

    arch: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        register_attention()
        model.set_attn_implementation(ATTN_IMPL)
        self._layers: list[CrossLayer] | None = None

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
    def decoder_embeddings(self) -> nn.Module:
        return self.model.get_decoder().get_input_embeddings()

    def decoder_start_id(self, tokenizer: Any) -> int:
        cfg = self.model.config
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = getattr(tokenizer, "cls_token_id", None) or getattr(
                tokenizer, "bos_token_id", None
            )
        if start is None:
            start = getattr(cfg, "pad_token_id", None) or 0
        return int(start)

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


class T5Adapter(EncDecAdapter):
    """T5 family: no 1/sqrt(d) scaling, no biases, keys from the final encoder layer norm."""

    arch = "t5"
    model_classes = (
        "T5ForConditionalGeneration",
        "MT5ForConditionalGeneration",
        "UMT5ForConditionalGeneration",
    )

    def decoder_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

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


class BartAdapter(EncDecAdapter):
    """BART / mBART: biased projections, query scaled by 1/sqrt(head_dim)."""

    arch = "bart"
    model_classes = ("BartForConditionalGeneration", "MBartForConditionalGeneration")

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


class T5GemmaAdapter(EncDecAdapter):
    """T5Gemma: a separate cross-attention per layer, GQA, optional logit soft-capping."""

    arch = "t5gemma"
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


class T5Gemma2Adapter(EncDecAdapter):
    """T5Gemma2: merged self+cross attention; cross keys are ``k_norm(k_proj(E))`` with a
    per-head RMSNorm whose learned scale (1 + w) moves to the query side (Reverse-QWK); the
    per-token RMS factor is the only part that stays on the memory side. A model built from
    Gemma 3 (`models.t5gemma2`) may run its encoder causally and carry a linear memory adapter
    per decoder layer, folded into W_K here."""

    arch = "t5gemma2"
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


class EncoderDecoderAdapter(EncDecAdapter):
    """`EncoderDecoderModel` with a BERT-style decoder (BERT2BERT, RoBERTa2RoBERTa, ...).
    ``enc_to_dec_proj`` (present when hidden sizes differ) is folded into every W_K."""

    arch = "encoder-decoder"
    model_classes = ("EncoderDecoderModel",)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state

    def decoder_embeddings(self) -> nn.Module:
        return self.model.decoder.get_input_embeddings()

    def decoder_max_positions(self) -> int | None:
        return int(getattr(self.model.decoder.config, "max_position_embeddings", 512))

    def _build_layers(self) -> list[CrossLayer]:
        dec = self.model.decoder
        base = getattr(dec, "base_model", dec)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if layers is None or not hasattr(layers[0], "crossattention"):
            raise UnsupportedArchitectureError(
                f"EncoderDecoderModel decoder {type(dec).__name__} has no BERT-style "
                "`crossattention` layers; supported decoders are BERT-like "
                "(add_cross_attention=True)"
            )
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


ADAPTERS: tuple[type[EncDecAdapter], ...] = (
    T5Adapter,
    BartAdapter,
    T5GemmaAdapter,
    T5Gemma2Adapter,
    EncoderDecoderAdapter,
)


def supported_architectures() -> list[str]:
    return [c for a in ADAPTERS for c in a.model_classes]


def adapter_for(model: nn.Module) -> EncDecAdapter:
    """The adapter for `model`'s class; `UnsupportedArchitectureError` names the supported ones."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.model_classes:
            return cls(model)
    raise UnsupportedArchitectureError(
        f"INTRA needs an encoder-decoder with cross-attention; {name} is not supported. "
        f"Supported: {', '.join(supported_architectures())}"
    )
