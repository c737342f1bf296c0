"""Batched text -> token-state encoding and the poolings the retrievers store.

`encode_texts` sorts texts by token length before batching so each batch pads to a similar
length (far less wasted compute than input-order batching on mixed-length corpora), then
returns results in input order with padding removed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from tqdm.auto import tqdm

from ..errors import InvalidInputError

ForwardFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

_HUGE = 1_000_000  # tokenizers report ~1e30 as model_max_length when they have no limit


def default_forward(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Last hidden states ``(B, T, d)`` of the part of `model` that reads the input.

    Encoder-decoder models run only their encoder; models with an LM head run their base model
    (`model.base_model`), so no vocabulary-sized logits are computed.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        body = model.get_encoder()
    else:
        body = getattr(model, "base_model", model)
    out = body(input_ids=input_ids, attention_mask=attention_mask)
    states = getattr(out, "last_hidden_state", None)
    if states is None:
        states = out[0]
    return states


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _length_limit(model: Any, tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        if max_length < 1:
            raise InvalidInputError(f"max_length must be positive, got {max_length}")
        return int(max_length)
    limits = [getattr(tokenizer, "model_max_length", None)]
    config = getattr(model, "config", None)
    limits.append(getattr(config, "max_position_embeddings", None))
    valid = [int(x) for x in limits if isinstance(x, int | float) and 0 < x < _HUGE]
    return min(valid) if valid else None


@overload
def encode_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    return_ids: Literal[False] = ...,
    batch_size: int = ...,
    max_length: int | None = ...,
    show_progress: bool = ...,
    desc: str = ...,
    forward: ForwardFn | None = ...,
    add_special_tokens: bool = ...,
    device: str | torch.device | None = ...,
) -> list[torch.Tensor]: ...


@overload
def encode_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    return_ids: Literal[True],
    batch_size: int = ...,
    max_length: int | None = ...,
    show_progress: bool = ...,
    desc: str = ...,
    forward: ForwardFn | None = ...,
    add_special_tokens: bool = ...,
    device: str | torch.device | None = ...,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...


def encode_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    show_progress: bool = True,
    desc: str = "encoding",
    forward: ForwardFn | None = None,
    add_special_tokens: bool = True,
    return_ids: bool = False,
    device: str | torch.device | None = "cpu",
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-text token states ``(len_i, d)`` in input order, padding removed.

    `max_length` truncates (default: the smaller of the tokenizer's and the model's limit).
    `forward(model, input_ids, attention_mask) -> (B, T, d)` replaces `default_forward`.
    Results land on `device` (None: stay on the model's device) in the model's output dtype.
    With `return_ids=True` also returns each text's token ids (int64, CPU).
    """
    if isinstance(texts, str):
        raise InvalidInputError("encode_texts takes a sequence of strings, not one string")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInputError(f"text {i} is {type(t).__name__}, not str")
    if not texts:
        return ([], []) if return_ids else []
    limit = _length_limit(model, tokenizer, max_length)
    enc = tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        truncation=limit is not None,
        max_length=limit,
        padding=False,
    )
    ids: list[list[int]] = enc["input_ids"]
    for i, row in enumerate(ids):
        if not row:
            raise InvalidInputError(f"text {i} produced no tokens; it cannot be encoded")
    fwd = forward or default_forward
    model_device = _model_device(model)
    out_device = None if device is None else torch.device(device)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    results: list[torch.Tensor | None] = [None] * len(ids)
    with tqdm(total=len(ids), desc=desc, unit="text", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(ids[batch[0]])
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, i in enumerate(batch):
                n = len(ids[i])
                input_ids[j, :n] = torch.tensor(ids[i], dtype=torch.long)
                mask[j, :n] = 1
            with torch.inference_mode():
                states = fwd(model, input_ids.to(model_device), mask.to(model_device))
                if out_device is not None:
                    states = states.to(out_device)
            # cloned outside inference mode: callers may train on these (inference tensors
            # cannot be saved for backward), and a clone frees the padded batch buffer
            for j, i in enumerate(batch):
                results[i] = states[j, : len(ids[i])].clone()
            bar.update(len(batch))
    out = [r for r in results if r is not None]
    if return_ids:
        return out, [torch.tensor(row, dtype=torch.long) for row in ids]
    return out


def mean_pool(
    states: torch.Tensor, mask: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Masked mean over tokens: ``(B, T, d)`` + ``(B, T)`` -> ``(B, d)``, summed in float32.

    Rows with an all-zero mask give zeros (the denominator is clamped, as in
    sentence-transformers) rather than NaN.
    """
    if states.dim() != 3 or mask.shape != states.shape[:2]:
        raise InvalidInputError(
            f"mean_pool expects states (B, T, d) and mask (B, T); got {tuple(states.shape)} "
            f"and {tuple(mask.shape)}"
        )
    m = mask.to(device=states.device, dtype=torch.float32).unsqueeze(-1)
    summed = (states.float() * m).sum(dim=1)
    return (summed / m.sum(dim=1).clamp(min=1e-9)).to(dtype)


def _segment_pairs(
    lengths: torch.Tensor, p: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sequences of `lengths` flattened end to end: (output row, flat token) pairs that put
    each token in its segment, plus each output row's token count."""
    n = lengths.numel()
    i = torch.arange(p, dtype=torch.long)
    L = lengths.unsqueeze(1)  # (n, 1)
    start = torch.div(i * L, p, rounding_mode="floor")  # (n, p)
    end = torch.maximum(torch.div((i + 1) * L, p, rounding_mode="floor"), start + 1)
    counts = (end - start).reshape(-1)  # (n*p,)
    seq_offset = torch.cumsum(lengths, 0) - lengths  # start of each sequence in the flat tensor
    abs_start = (start + seq_offset.unsqueeze(1)).reshape(-1)
    rows = torch.repeat_interleave(torch.arange(n * p), counts)
    first = torch.cumsum(counts, 0) - counts
    tokens = abs_start[rows] + (torch.arange(rows.numel()) - first[rows])
    return rows, tokens, counts


def pool_segments_batch(
    states: Sequence[torch.Tensor], p: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed-length pooling of many variable-length sequences: list of ``(L_i, d)`` ->
    ``(n, p, d)``; see `pool_segments` for the segment rule. One scatter-add for the whole list."""
    if p < 1:
        raise InvalidInputError(f"p must be positive, got {p}")
    if isinstance(states, torch.Tensor):
        raise InvalidInputError("pool_segments_batch takes a list of (L_i, d) tensors")
    if not states:
        return torch.empty((0, p, 0), dtype=dtype)
    d = states[0].shape[-1]
    for k, s in enumerate(states):
        if s.dim() != 2 or s.shape[1] != d:
            raise InvalidInputError(f"sequence {k} has shape {tuple(s.shape)}, expected (L, {d})")
        if s.shape[0] == 0:
            raise InvalidInputError(f"sequence {k} is empty; it has no tokens to pool")
    device = states[0].device
    flat = torch.cat([s.to(device=device, dtype=torch.float32) for s in states])
    lengths = torch.tensor([s.shape[0] for s in states], dtype=torch.long)
    rows, tokens, counts = _segment_pairs(lengths, p)
    out = torch.zeros((len(states) * p, d), dtype=torch.float32, device=device)
    out.index_add_(0, rows.to(device), flat[tokens.to(device)])
    out /= counts.to(device=device, dtype=torch.float32).unsqueeze(1)
    return out.reshape(len(states), p, d).to(dtype)


def pool_segments(
    states: torch.Tensor, p: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Split ``(L, d)`` token states into `p` contiguous, nearly equal segments and average each
    -> ``(p, d)`` (INTRA's fixed-length mean-pooled chunk representation).

    Segment i covers tokens ``[floor(i*L/p), floor((i+1)*L/p))``; segment sizes differ by at most
    one. When ``L < p`` segment i is the single token ``floor(i*L/p)``, i.e. tokens are repeated
    (evenly spread) so every output row is still the average of real tokens, never zeros.
    """
    if states.dim() != 2:
        raise InvalidInputError(f"pool_segments expects (L, d), got {tuple(states.shape)}")
    return pool_segments_batch([states], p, dtype=dtype)[0]


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Unit-length vectors along `dim` (zero vectors stay zero)."""
    return torch.nn.functional.normalize(x, p=2.0, dim=dim, eps=eps)
