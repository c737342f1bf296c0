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
    if getattr(module, "_intra_grouped", False) and query.shape[0] > 1:
        return grouped_eager_attention(module, query, key, value, attention_mask, **kwargs)
    return _module_eager(module)(module, query, key, value, attention_mask, **kwargs)


def grouped_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gemma family's eager attention with each KV head's query heads stacked along the
    query length instead of K/V repeated per head. Same arithmetic; but for a batch of more
    than one row, the repeated K/V cannot be a view inside the batched matrix multiply, and
    copying them cost as much as a batched INTRA pass saved (measured on CPU)."""
    B, H, T, D = query.shape
    G, S = key.shape[1], key.shape[2]
    rep = H // G
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    q = query.reshape(B, G, rep * T, D)
    weights = (torch.matmul(q, key.transpose(2, 3)) * scaling).view(B, H, T, S)
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(B, G, rep * T, S), value).view(B, H, T, -1)
    return out.transpose(1, 2).contiguous(), weights


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
    #: the value map acting on E (W_V, bias; a memory adapter folded in), where the decoder can
    #: take precomputed cross K/V (`EncoderDecoderArch.cross_kv`)
    value_weight: torch.Tensor | None = None
    value_bias: torch.Tensor | None = None


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

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every decoder layer's cross-attention keys and values ``(B, G, S, head_dim)`` for
        `memory` ``(B, S, d)``, for a decoder that can take them precomputed (`decoder_pass`):
        a batch then projects a chunk shared by several queries' contexts once. None where the
        architecture cannot, or while gradients would flow into the key/value side."""
        return None

    def decoder_pass(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        decoder_inputs_embeds: torch.Tensor,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """The decoder stack over `memory` without the LM head: what a query tap reads. (Gemma
        3's 262k-token vocabulary makes the head cost more than the decoder's layers for a
        retrieval pass.) Rows are right-padded: a causal decoder's real tokens never see the
        padding after them, and `memory_mask` hides padded memory. `cross_kv` (from `cross_kv`)
        replaces the decoder's own projections of `memory`."""
        if cross_kv is not None:
            raise NotImplementedError(f"{type(self).__name__} computes its own cross K/V")
        self._decoder_stack()(
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=self._decoder_memory(memory),
            encoder_attention_mask=memory_mask,
            use_cache=False,
        )

    def _decoder_stack(self) -> nn.Module:
        """The module `decoder_pass` calls: the decoder without an LM head."""
        return self.decoder()

    def _decoder_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory as the decoder stack receives it (`EncoderDecoderModel` projects it)."""
        return memory

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


def _fold_adapter(
    proj: nn.Linear, adapter: nn.Linear | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``proj(adapter(e))`` as one linear map: ``(W A, W c + b)`` (`proj` alone without one)."""
    w, b = _linear(proj)
    if adapter is None:
        return w, b
    aw, ab = _linear(adapter)
    if ab is not None:
        b = w @ ab if b is None else b + w @ ab
    return w @ aw, b


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


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

    def tap_attention(self) -> Self:
        """As the base class; batched decoder passes use `grouped_eager_attention` (the same
        arithmetic as the model's eager attention, which is Gemma's)."""
        super().tap_attention()
        for layer in self.model.get_decoder().layers:
            layer.self_attn._intra_grouped = True
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from ...models.t5gemma2 import encode

        return encode(self.model, input_ids, attention_mask)

    def _build_layers(self) -> list[CrossLayer]:
        from ...models.t5gemma2 import memory_adapter

        out = []
        for layer in self.model.get_decoder().layers:
            attn = layer.self_attn
            adapter = memory_adapter(attn)
            # keys are W_K (A e + c): fold A and c like W_K and b (values likewise)
            w, b = _fold_adapter(attn.k_proj, adapter)
            vw, vb = _fold_adapter(attn.v_proj, adapter)
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
                    value_weight=vw,
                    value_bias=vb,
                )
            )
        return out

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys ``k_norm(W_K A e + W_K c)`` and values ``W_V A e + W_V c`` with the memory
        adapter folded into each projection (one d x 2Gd_h product per memory token and layer
        instead of the adapter's d x d and then the projections), in float32."""
        layers = self.layers()
        if torch.is_grad_enabled() and any(
            p.requires_grad
            for layer in layers
            for m in (layer.attn.k_proj, layer.attn.v_proj, layer.attn.k_norm)
            for p in m.parameters()
        ):
            return None
        B, S, _ = memory.shape
        x = memory.float()
        out = []
        with torch.no_grad():
            for layer in layers:
                assert layer.value_weight is not None
                shape = (B, S, layer.n_kv_heads, layer.head_dim)
                k = nn.functional.linear(x, layer.weight.float(), _float(layer.bias))
                v = nn.functional.linear(x, layer.value_weight.float(), _float(layer.value_bias))
                k = layer.attn.k_norm(k.to(memory.dtype).view(shape).transpose(1, 2))
                out.append((k, v.to(memory.dtype).view(shape).transpose(1, 2)))
        return out

    def decoder_pass(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        decoder_inputs_embeds: torch.Tensor,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """With `cross_kv`, the decoder reads them from a prefilled cross-attention cache (its
        merged attention then skips projecting `memory`, and the adapters skip it too)."""
        if cross_kv is None:
            super().decoder_pass(memory, memory_mask, decoder_inputs_embeds)
            return
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        decoder = self.decoder()
        cache = EncoderDecoderCache(DynamicCache(config=decoder.config), DynamicCache())
        for i, (k, v) in enumerate(cross_kv):
            cache.cross_attention_cache.update(k, v, i)
            cache.is_updated[i] = True
        decoder(
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=memory,
            encoder_attention_mask=memory_mask,
            cache=cache,
            use_cache=True,
        )


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

    def _decoder_stack(self) -> nn.Module:
        return self.model.decoder.base_model  # BERT's decoder without its LM head

    def _decoder_memory(self, memory: torch.Tensor) -> torch.Tensor:
        proj = getattr(self.model, "enc_to_dec_proj", None)
        return memory if proj is None else proj(memory)

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
