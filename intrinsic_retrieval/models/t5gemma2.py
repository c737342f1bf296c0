"""A T5Gemma2 encoder-decoder built from a Gemma 3 decoder-only checkpoint, with memory adapters.

T5Gemma 2 initialises both stacks from Gemma 3 and then adapts them with a long UL2 run; its
decoder's merged attention reuses each layer's q/k/v/o projections and k_norm for self- and
cross-attention. `build_t5gemma2` does the initialisation step (Gemma 3 weights copied into both
stacks, embeddings tied) without the adaptation, which cannot be repeated on a CPU.

What a naive build lacks: decoder layer l's ``k_proj``/``v_proj`` were trained on layer l's own
(normalised) input, but as cross-attention they meet the encoder's *final* output. A memory
adapter closes that gap cheaply: each decoder layer gets a linear map ``A_l`` (``memory_proj``)
applied to the stored encoder states before its ``k_proj``/``v_proj``, fitted in closed form
(ridge regression, no labels, no gradient steps) so that ``A_l e`` reproduces the normalised
layer-l input Gemma 3 computes for the same token. Then the cross keys and values are Gemma 3's
own per-layer keys and values of the chunk, the decoder's self-attention is untouched, and,
because ``A_l`` is linear, INTRA's Reverse-QWK folds ``W_K A_l`` into the query side exactly as
it folds ``W_K``: the store still holds one representation per token.

The encoder runs causally by default (``encoder="causal"``), as the Gemma 3 weights were trained;
``"bidirectional"`` is T5Gemma 2's choice (measured in docs/intra.md).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError, ModelMismatchError, UnsupportedArchitectureError

ENCODER_MODES = ("causal", "bidirectional")
ADAPTER_FORMAT = "intrinsic-retrieval/memory-adapter/v1"
#: config attribute recording how the built encoder attends (part of the model fingerprint)
ENCODER_ATTR = "intrinsic_encoder_attention"
_GEMMA3_TYPES = ("gemma3_text", "gemma3")
#: the smallest SigLIP tower T5Gemma2 accepts; it is always built and never used for text
TINY_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}


def _text_config(causal: nn.Module) -> Any:
    cfg = causal.config
    cfg = getattr(cfg, "text_config", None) or cfg
    if getattr(cfg, "model_type", None) not in _GEMMA3_TYPES:
        raise UnsupportedArchitectureError(
            f"build_t5gemma2 needs a Gemma 3 checkpoint, got model_type {cfg.model_type!r}"
        )
    return cfg


def t5gemma2_config(causal: nn.Module, *, encoder: str = "causal") -> Any:
    """A `T5Gemma2Config` whose encoder and decoder both have the Gemma 3 text architecture
    (plus a tiny, unused vision tower: T5Gemma2 always builds one)."""
    from transformers import T5Gemma2Config

    if encoder not in ENCODER_MODES:
        raise InvalidInputError(f"encoder must be one of {ENCODER_MODES}, got {encoder!r}")
    g = _text_config(causal)
    text = dict(
        vocab_size=int(g.vocab_size),
        hidden_size=int(g.hidden_size),
        intermediate_size=int(g.intermediate_size),
        num_hidden_layers=int(g.num_hidden_layers),
        num_attention_heads=int(g.num_attention_heads),
        num_key_value_heads=int(g.num_key_value_heads),
        head_dim=int(g.head_dim),
        hidden_activation=g.hidden_activation,
        max_position_embeddings=int(g.max_position_embeddings),
        rms_norm_eps=float(g.rms_norm_eps),
        query_pre_attn_scalar=g.query_pre_attn_scalar,
        sliding_window=g.sliding_window,
        layer_types=list(g.layer_types),
        rope_parameters=json.loads(json.dumps(g.rope_parameters)),
        attn_logit_softcapping=g.attn_logit_softcapping,
        final_logit_softcapping=g.final_logit_softcapping,
        attention_bias=bool(g.attention_bias),
        pad_token_id=g.pad_token_id,
        bos_token_id=g.bos_token_id,
        eos_token_id=g.eos_token_id,
    )
    vocab = int(g.vocab_size)  # image token ids outside the vocabulary: never matched
    vision = dict(TINY_VISION)
    config = T5Gemma2Config(
        encoder=dict(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=vocab + 1,
            eoi_token_index=vocab + 2,
            image_token_index=vocab + 3,
        ),
        decoder=text,
        image_token_index=vocab + 3,
        eoi_token_index=vocab + 2,
        tie_word_embeddings=True,
    )
    setattr(config, ENCODER_ATTR, encoder)
    return config


_LAYER_MAP = {
    "input_layernorm": "pre_self_attn_layernorm",
    "post_attention_layernorm": "post_self_attn_layernorm",
    "pre_feedforward_layernorm": "pre_feedforward_layernorm",
    "post_feedforward_layernorm": "post_feedforward_layernorm",
}


def _gemma_body(causal: nn.Module) -> nn.Module:
    base = getattr(causal, "model", causal)
    return getattr(base, "language_model", base)


def build_t5gemma2(causal: nn.Module, *, encoder: str = "causal", seed: int = 0) -> nn.Module:
    """T5Gemma2ForConditionalGeneration with `causal`'s (Gemma 3) weights in both stacks.

    Every text weight is copied; the vision tower (unused) is seeded so the built model and its
    fingerprint are the same on every run. Memory adapters start as the identity.
    """
    from transformers import T5Gemma2ForConditionalGeneration

    config = t5gemma2_config(causal, encoder=encoder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5Gemma2ForConditionalGeneration(config)
    body = _gemma_body(causal)
    src = body.state_dict()
    targets = (model.model.encoder.text_model, model.model.decoder)
    with torch.no_grad():
        for stack in targets:
            stack.embed_tokens.weight.copy_(src["embed_tokens.weight"])
            stack.norm.weight.copy_(src["norm.weight"])
            for i, layer in enumerate(stack.layers):
                own = layer.state_dict()
                for name in own:
                    head, _, rest = name.partition(".")
                    gemma_name = next((g for g, t in _LAYER_MAP.items() if t == head), head)
                    key = f"layers.{i}.{gemma_name}" + (f".{rest}" if rest else "")
                    if key not in src:
                        raise UnsupportedArchitectureError(f"Gemma 3 checkpoint lacks {key}")
                    own[name].copy_(src[key])
    model.tie_weights()
    attach_memory_adapters(model)
    dtype = next(causal.parameters()).dtype
    return model.to(dtype=dtype).eval()


# ---------------------------------------------------------------------- memory adapters
def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    return model.get_decoder().layers


def _adapter_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    memory = kwargs.get("encoder_hidden_states")
    if memory is None:
        return args, kwargs
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and cache.is_updated.get(module.layer_idx):
        return args, kwargs  # cross K/V already cached from the adapted memory
    kwargs["encoder_hidden_states"] = module.memory_proj(memory)
    return args, kwargs


def attach_memory_adapters(model: nn.Module) -> None:
    """Give every decoder layer's merged attention a `memory_proj` (identity at first) applied to
    the encoder states before its cross keys and values. Idempotent."""
    for layer in _decoder_layers(model):
        attn = layer.self_attn
        if hasattr(attn, "memory_proj"):
            continue
        d = attn.k_proj.in_features
        ref = attn.k_proj.weight
        proj = nn.Linear(d, d, bias=True, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            proj.weight.copy_(torch.eye(d))
            proj.bias.zero_()
        attn.memory_proj = proj
        attn.register_forward_pre_hook(_adapter_hook, with_kwargs=True)


def memory_adapter(attn: nn.Module) -> nn.Linear | None:
    """The memory adapter of one merged-attention module, or None."""
    proj = getattr(attn, "memory_proj", None)
    return proj if isinstance(proj, nn.Linear) else None


def encoder_attention(model: nn.Module) -> str:
    return str(getattr(model.config, ENCODER_ATTR, "bidirectional"))


def encode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's final states, run causally or bidirectionally as the model was built."""
    enc = model.get_encoder()
    if encoder_attention(model) != "causal":
        return enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    text = getattr(enc, "text_model", enc)
    embeds = text.embed_tokens(input_ids)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    kw = dict(
        config=text.config,
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        cache=None,
        position_ids=pos,
        allow_is_causal_skip=False,
    )
    masks = {
        "full_attention": create_causal_mask(**kw),
        "sliding_attention": create_sliding_window_causal_mask(**kw),
    }
    return text(inputs_embeds=embeds, attention_mask=masks, position_ids=pos).last_hidden_state


def _capture_layer_inputs(model: nn.Module) -> tuple[list[torch.Tensor | None], Callable[[], None]]:
    """Hooks that record each encoder layer's normalised attention input (what k_proj reads)."""
    layers = getattr(model.get_encoder(), "text_model", model.get_encoder()).layers
    seen: list[torch.Tensor | None] = [None] * len(layers)
    handles = []
    for i, layer in enumerate(layers):

        def hook(_m, _args, out, i=i):
            seen[i] = out

        handles.append(layer.pre_self_attn_layernorm.register_forward_hook(hook))

    def remove() -> None:
        for h in handles:
            h.remove()

    return seen, remove


def fit_memory_adapters(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    ridge: float = 1e-2,
    max_length: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fit every decoder layer's `memory_proj` in closed form so that ``A_l e + b_l`` reproduces
    encoder layer l's normalised input for the same token (label-free: `texts` are plain
    documents). With a causal encoder that input is exactly Gemma 3's. Returns fit statistics:
    per-layer R^2 of the adapted memory and cosine of the resulting keys."""
    from tqdm.auto import tqdm

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise InvalidInputError("fit_memory_adapters needs at least one non-empty text")
    layers = _decoder_layers(model)
    n_layers = len(layers)
    dev = next(model.parameters()).device
    d = layers[0].self_attn.k_proj.in_features
    gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(n_layers, d, d + 1, dtype=torch.float64)
    sq = torch.zeros(n_layers, dtype=torch.float64)
    mean = torch.zeros(n_layers, d, dtype=torch.float64)
    count = 0
    seen, remove = _capture_layer_inputs(model)
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=len(texts), desc="fit memory adapters", disable=not show_progress)
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            enc = tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length
            ).to(dev)
            with torch.no_grad():
                e = encode(model, enc["input_ids"], enc["attention_mask"])
            keep = enc["attention_mask"].bool()
            e1 = torch.cat(
                [e[keep].double(), torch.ones(int(keep.sum()), 1, dtype=e.dtype).double()], 1
            )
            gram += e1.T @ e1
            for i in range(n_layers):
                x = seen[i][keep].double()  # type: ignore[index]
                cross[i] += x.T @ e1
                sq[i] += x.pow(2).sum()
                mean[i] += x.sum(0)
            count += int(keep.sum())
            bar.update(len(batch))
        bar.close()
    finally:
        remove()
    reg = ridge * torch.diag(gram).mean() * torch.eye(d + 1, dtype=torch.float64)
    reg[-1, -1] = 0.0
    inv = torch.linalg.inv(gram + reg)
    r2 = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            sol = cross[i] @ inv  # (d, d + 1): [A | b]
            proj = layer.self_attn.memory_proj
            proj.weight.copy_(sol[:, :d].to(proj.weight.dtype))
            proj.bias.copy_(sol[:, d].to(proj.bias.dtype))
            # residual sum of squares from the normal equations
            rss = sq[i] - 2 * (sol * cross[i]).sum() + (sol @ gram * sol).sum()
            tss = sq[i] - mean[i].pow(2).sum() / count
            r2.append(float(1 - rss / tss))
    return {
        "texts": len(texts),
        "tokens": count,
        "ridge": ridge,
        "max_length": max_length,
        "seconds": time.perf_counter() - t0,
        "r2": r2,
    }


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(_decoder_layers(model)):
        proj = layer.self_attn.memory_proj
        out[f"layers.{i}.weight"] = proj.weight.detach().float().cpu().contiguous()
        out[f"layers.{i}.bias"] = proj.bias.detach().float().cpu().contiguous()
    return out


def save_memory_adapters(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Write the adapters (safetensors, atomic) with `meta` (base-model digest, fit statistics)."""
    from ..store.shards import write_safetensors

    metadata = {"format": ADAPTER_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    write_safetensors(Path(path), adapter_state(model), metadata)


def load_memory_adapters(model: nn.Module, path: Path, *, base: str | None = None) -> dict:
    """Install adapters saved by `save_memory_adapters`; refuses ones fitted for another base
    model (`base`: the digest recorded at fit time) or with other shapes."""
    from ..store.shards import read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise ModelMismatchError(path, expected=ADAPTER_FORMAT, found=str(meta.get("format")))
    info = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    if base is not None and info.get("base") not in (None, base):
        raise ModelMismatchError(path, expected=base, found=str(info.get("base")))
    with torch.no_grad():
        for i, layer in enumerate(_decoder_layers(model)):
            proj = layer.self_attn.memory_proj
            w, b = tensors.get(f"layers.{i}.weight"), tensors.get(f"layers.{i}.bias")
            if w is None or b is None or w.shape != proj.weight.shape:
                raise ModelMismatchError(
                    path,
                    expected=f"layer {i} {tuple(proj.weight.shape)}",
                    found="missing or other shape",
                )
            proj.weight.copy_(w)
            proj.bias.copy_(b)
    return info


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------- loading a built model
#: `IntraRetriever(model=...)` spelling of the packaged Gemma 3 270M built into a T5Gemma2
GEMMA3_SPEC = "t5gemma2:gemma-3-270m"
ADAPTER_MODES = ("generated", "none")
#: prompts the base model continues to make the label-free adaptation text (no corpus needed)
_PROMPTS = (
    "Abstract. We",
    "The study found that",
    "In this article, we describe",
    "Background:",
    "The history of",
    "Results show that",
    "How to",
    "A review of",
)


def load_causal_gemma3(source: str, *, device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """Gemma 3 as a causal LM from a packaged name (``gemma-3-270m``), a `.gguf` path, a
    directory or a hub id."""
    from .loading import gemma3_gguf_path, load_model
    from .packaged import fetch_hint

    if source in ("gemma-3-270m", "gemma3"):
        path = gemma3_gguf_path()
        if path is None:
            from ..errors import ModelLoadError

            raise ModelLoadError(
                f"Gemma 3 270M (gemma-3-270m-q4_k_m.gguf) is not fetched; {fetch_hint('gemma3')}"
            )
        source = str(path)
    return load_model(source, kind="causal", device=device, dtype=dtype)


def generated_texts(
    causal: nn.Module,
    tokenizer: Any,
    n: int = 64,
    length: int = 160,
    seed: int = 0,
    show_progress: bool = True,
) -> list[str]:
    """`n` continuations the base model samples from generic prompts (seeded): adaptation text
    that needs no corpus and no labels."""
    from tqdm.auto import tqdm

    out: list[str] = []
    dev = next(causal.parameters()).device
    bar = tqdm(total=n, desc="write adaptation text", disable=not show_progress)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, n, 16):
            prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(start, min(n, start + 16))]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(dev)
            enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                ids = causal.generate(
                    **enc,
                    max_new_tokens=length,
                    do_sample=True,
                    top_p=0.95,
                    temperature=1.0,
                    pad_token_id=tokenizer.pad_token_id,
                )
            out += tokenizer.batch_decode(ids, skip_special_tokens=True)
            bar.update(len(prompts))
    bar.close()
    tokenizer.padding_side = side
    return out


def load_from_gemma3(
    source: str = "gemma-3-270m",
    *,
    encoder: str = "causal",
    adapter: str = "generated",
    device: Any = None,
    dtype: Any = None,
    show_progress: bool = True,
) -> tuple[nn.Module, Any]:
    """``(T5Gemma2 model, tokenizer)`` built from Gemma 3 `source`, with memory adapters:

    * ``"generated"`` (default): fitted on text the base model writes itself from generic prompts
      (label-free, corpus-free), once per base model and encoder mode, then cached beside the
      model as safetensors;
    * ``"none"``: identity adapters (the naive build, for comparison);
    * a path: adapters saved by `save_memory_adapters` (e.g. fitted on your own documents with
      `fit_memory_adapters`), refused if they were fitted for another base model.
    """
    from .fingerprint import model_fingerprint
    from .packaged import file_lock, models_dir

    causal, tok = load_causal_gemma3(source, device=device, dtype=dtype)
    model = build_t5gemma2(causal, encoder=encoder)
    base = model_fingerprint(causal)
    if adapter == "none":
        return model, tok
    if adapter == "generated":
        folder = models_dir() / "gemma3" / ".adapters"
        path = folder / f"{base[:16]}-{encoder}-generated.safetensors"
        with file_lock(folder / ".lock"):
            if not path.is_file():
                texts = generated_texts(causal, tok, show_progress=show_progress)
                stats = fit_memory_adapters(model, tok, texts, show_progress=show_progress)
                save_memory_adapters(
                    model,
                    path,
                    {
                        "base": base,
                        "encoder": encoder,
                        "texts": "generated",
                        "texts_sha256": texts_digest(texts),
                        **stats,
                    },
                )
    else:
        path = Path(adapter).expanduser()
        if not path.is_file():
            raise InvalidInputError(
                f"memory adapter must be 'generated', 'none' or a safetensors file; "
                f"{path} does not exist"
            )
    info = load_memory_adapters(model, path, base=base)
    if info.get("encoder") not in (None, encoder):
        raise ModelMismatchError(
            path, expected=f"encoder={encoder}", found=f"encoder={info.get('encoder')}"
        )
    return model, tok
