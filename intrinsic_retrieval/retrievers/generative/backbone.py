"""One interface over seq2seq (T5, BART, BERT2BERT `EncoderDecoderModel`) and causal LMs
(Llama/SmolLM2, Qwen, ...) for what generative retrieval needs: a training loss, the
representation fed to the output projection at the first docid position (atomic ids), per-layer
states for the logit lens, trie-constrained beam search, and document embeddings.

A causal LM reads ``"<text>\\nid:"`` and continues with the docid; a seq2seq model reads the text
in its encoder and decodes the docid from its decoder start token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from ...errors import InvalidInputError, UnsupportedArchitectureError
from ...models import l2_normalize, mean_pool
from ...models.architectures import decoder_layers, decoder_start_id, pre_head
from .trie import DocidTrie, TrieLogitsProcessor

KINDS = ("seq2seq", "causal")
CAUSAL_SEPARATOR = "\nid:"

_CROSS = {"encdecattention", "encoder_attn", "crossattention", "cross_attn"}
_MLP = {"densereludense", "fc1", "fc2", "mlp", "intermediate", "ffn", "feed_forward"}
TRAIN_MODES = ("all", "decoder", "decoder_late")


class Backbone:
    """A Hugging Face model + tokenizer adapted for docid generation."""

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str | None = None) -> None:
        config = model.config
        kind = kind or ("seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal")
        if kind not in KINDS:
            raise InvalidInputError(f"backbone kind must be one of {KINDS}, got {kind!r}")
        if kind == "seq2seq" and not getattr(config, "is_encoder_decoder", False):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} is not an encoder-decoder model; use kind='causal'"
            )
        if model.get_output_embeddings() is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no output projection (load it with an LM head)"
            )
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise UnsupportedArchitectureError("tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)
        eos = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        if eos is None:
            raise UnsupportedArchitectureError("tokenizer has neither an EOS nor a SEP token")
        self.eos_id = int(eos)
        if kind == "causal":
            tokenizer.padding_side = "left"
            self._sep = list(tokenizer(CAUSAL_SEPARATOR, add_special_tokens=False)["input_ids"])
            self.start_id = None
        else:
            if getattr(config, "decoder_start_token_id", None) is None:
                config.decoder_start_token_id = decoder_start_id(config, tokenizer)
            if getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = self.pad_id
            self.start_id = int(config.decoder_start_token_id)
        out = model.get_output_embeddings().weight
        self.vocab_size, self.head_dim = int(out.shape[0]), int(out.shape[1])

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def inputs(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        """Batch encoder inputs (seq2seq) or left-padded prompts (causal)."""
        texts = list(texts)
        if self.kind == "seq2seq":
            enc = self.tokenizer(
                texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        rows = [
            self.tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)[
                "input_ids"
            ]
            + self._sep
            for t in texts
        ]
        return self._left_pad(rows)

    def _left_pad(
        self, rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None
    ) -> dict:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r)
                mask[i, width - len(r) :] = 1
                if labels is not None:
                    lab[i, width - len(r) :] = torch.tensor(labels[i])
        out = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = lab
        out["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        return {k: v.to(self.device) for k, v in out.items()}

    # ------------------------------------------------------------------ frozen-encoder cache
    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], max_length: int, batch_size: int = 64
    ) -> dict[str, torch.Tensor]:
        """Encoder states per distinct text, ``(len_i, d)`` in float16: with a frozen encoder
        they never change, so training reads them instead of re-running the encoder (the
        reverse-engineering paper: a pretrained encoder suffices; retrieval lives in the
        decoder)."""
        if self.kind != "seq2seq":
            raise InvalidInputError("only seq2seq backbones have an encoder to cache")
        was_training = self.model.training
        self.model.eval()
        uniq = sorted(set(texts), key=len)
        out: dict[str, torch.Tensor] = {}
        try:
            for i in range(0, len(uniq), batch_size):
                part = uniq[i : i + batch_size]
                b = self.inputs(part, max_length)
                h = self.model.get_encoder()(**b).last_hidden_state
                for t, hi, m in zip(part, h, b["attention_mask"], strict=True):
                    out[t] = hi[m.bool()].to("cpu", torch.float16).clone()
        finally:
            self.model.train(was_training)
        return out

    def cached_inputs(self, texts: Sequence[str], cache: dict[str, torch.Tensor]) -> dict:
        """A seq2seq batch whose encoder outputs come from `encode`'s cache."""
        from transformers.modeling_outputs import BaseModelOutput

        states = [cache[t] for t in texts]
        width = max(len(h) for h in states)
        dtype = next(self.model.parameters()).dtype
        h = torch.zeros((len(states), width, states[0].shape[-1]), dtype=dtype)
        mask = torch.zeros((len(states), width), dtype=torch.long)
        for i, hi in enumerate(states):
            h[i, : len(hi)] = hi.to(dtype)
            mask[i, : len(hi)] = 1
        return {
            "encoder_outputs": BaseModelOutput(last_hidden_state=h.to(self.device)),
            "attention_mask": mask.to(self.device),
        }

    # ------------------------------------------------------------------ training losses
    def sequence_loss(
        self,
        texts: Sequence[str],
        targets: Sequence[Sequence[int]],
        max_length: int,
        cache: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of docid token sequences (each ending with EOS) given the texts."""
        if self.kind == "seq2seq":
            batch = self.cached_inputs(texts, cache) if cache else self.inputs(texts, max_length)
            width = max(len(t) for t in targets)
            labels = torch.full((len(targets), width), -100, dtype=torch.long)
            for i, t in enumerate(targets):
                labels[i, : len(t)] = torch.tensor(list(t))
            with warnings.catch_warnings():  # EncoderDecoderModel's v4.12 loss notice
                warnings.filterwarnings("ignore", "Version v4.12.0", FutureWarning)
                return self.model(**batch, labels=labels.to(self.device)).loss
        rows, labs = [], []
        for t, target in zip(texts, targets, strict=True):
            prompt = (
                self.tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)[
                    "input_ids"
                ]
                + self._sep
            )
            rows.append(prompt + list(target))
            labs.append([-100] * len(prompt) + list(target))
        batch = self._left_pad(rows, labs)
        return self.model(**batch).loss

    # ------------------------------------------------------------------ first docid position
    @contextmanager
    def _capture_head_input(self) -> Any:
        box: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple) -> None:
            box.append(args[0])

        handle = self.model.get_output_embeddings().register_forward_pre_hook(hook)
        try:
            yield box
        finally:
            handle.remove()

    def _first_step(self, batch: dict[str, torch.Tensor], hidden_states: bool) -> Any:
        if self.kind == "seq2seq":
            n = batch["attention_mask"].shape[0]
            start = torch.full((n, 1), self.start_id, dtype=torch.long, device=self.device)
            return self.model(
                input_ids=batch.get("input_ids"),
                encoder_outputs=batch.get("encoder_outputs"),
                attention_mask=batch["attention_mask"],
                decoder_input_ids=start,
                output_hidden_states=hidden_states,
                use_cache=False,
            )
        kwargs: dict[str, Any] = {"use_cache": False, "output_hidden_states": hidden_states}
        try:
            return self.model(**batch, logits_to_keep=1, **kwargs)
        except TypeError:
            return self.model(**batch, **kwargs)

    def head_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, head_dim)``: what the output projection reads at the first docid position."""
        with self._capture_head_input() as box:
            self._first_step(batch, hidden_states=False)
        return box[-1][:, -1, :]

    def layer_states(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residual stream after the embeddings and after every decoder layer at the first docid
        position (``(B, d)`` each), and the actual output-projection input."""
        with self._capture_head_input() as box:
            out = self._first_step(batch, hidden_states=True)
        states = out.decoder_hidden_states if self.kind == "seq2seq" else out.hidden_states
        return [h[:, -1, :] for h in states], box[-1][:, -1, :]

    def pre_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What the model applies between the last residual stream and its output projection
        (final norm, T5's rescaling, BERT's LM-head transform)."""
        return pre_head(self.model)

    # ------------------------------------------------------------------ constrained decoding
    @torch.no_grad()
    def generate(
        self,
        texts: Sequence[str],
        trie: DocidTrie,
        *,
        num_beams: int,
        max_length: int,
    ) -> list[list[tuple[int, float]]]:
        """Trie-constrained beam search; per text, ``(code, sum of log-probs)`` best first.
        Only complete docids in `trie` are returned (at most `num_beams`, no duplicates)."""
        if len(trie) == 0:
            return [[] for _ in texts]
        beams = max(1, min(num_beams, len(trie)))
        batch = self.inputs(texts, max_length)
        offset = 1 if self.kind == "seq2seq" else batch["input_ids"].shape[1]
        beam_args: dict[str, Any] = (
            {"length_penalty": 0.0, "early_stopping": False} if beams > 1 else {}
        )  # length_penalty=0: a beam scores as the plain sum of its log-probs
        gen = GenerationConfig(
            num_beams=beams,
            num_return_sequences=beams,
            max_new_tokens=trie.max_depth(),
            do_sample=False,
            **beam_args,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            decoder_start_token_id=self.start_id,
            bos_token_id=getattr(self.model.config, "bos_token_id", None),
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=beams == 1,
            use_cache=True,
        )
        proc = TrieLogitsProcessor(trie, offset, self.pad_id)
        kwargs = dict(batch)
        kwargs.pop("position_ids", None)
        out = self.model.generate(
            **kwargs, generation_config=gen, logits_processor=LogitsProcessorList([proc])
        )
        seqs = out.sequences[:, offset:].tolist()
        if beams > 1:
            scores = out.sequences_scores.tolist()
        else:  # greedy: sum the chosen tokens' log-probs from the raw logits
            logps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.logits], 1)
            toks = out.sequences[:, offset:][:, : logps.shape[1]]
            scores = logps.gather(-1, toks.unsqueeze(-1)).squeeze(-1)
            scores = scores.masked_fill(toks == self.pad_id, 0.0).sum(-1).tolist()
        results: list[list[tuple[int, float]]] = []
        for q in range(len(texts)):
            seen: set[int] = set()
            hits: list[tuple[int, float]] = []
            for j in range(q * beams, (q + 1) * beams):
                toks = seqs[j]
                if self.eos_id in toks:
                    toks = toks[: toks.index(self.eos_id) + 1]
                code = trie.lookup(toks)
                s = float(scores[j])
                if code is None or code in seen or not np.isfinite(s):
                    continue
                seen.add(code)
                hits.append((code, s))
            hits.sort(key=lambda x: -x[1])
            results.append(hits)
        return results

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def embed(
        self, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 32
    ) -> np.ndarray:
        """Mean-pooled, L2-normalised encoder states (seq2seq) or last-layer states (causal);
        the default document embedding for semantic ids."""
        was_training = self.model.training
        self.model.eval()
        out: list[torch.Tensor] = []
        try:
            for i in range(0, len(texts), batch_size):
                part = list(texts[i : i + batch_size])
                if self.kind == "seq2seq":
                    enc = self.tokenizer(
                        part,
                        truncation=True,
                        max_length=max_length,
                        padding=True,
                        return_tensors="pt",
                    ).to(self.device)
                    h = self.model.get_encoder()(
                        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                    ).last_hidden_state
                    mask = enc["attention_mask"]
                else:
                    batch = self.inputs(part, max_length)
                    h = self.model(
                        **batch, output_hidden_states=True, use_cache=False
                    ).hidden_states[-1]
                    mask = batch["attention_mask"]
                out.append(l2_normalize(mean_pool(h, mask)).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out).numpy()

    # ------------------------------------------------------------------ freezing
    def decoder_layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def set_trainable(self, mode: str, late_fraction: float = 1 / 3) -> dict[str, int]:
        """Choose what training updates (the reverse-engineering paper: a pretrained encoder
        suffices, and corpus knowledge sits in the last decoder stage's MLPs fed by
        cross-attention).

        ``all``: every weight. ``decoder``: everything but the encoder and the embeddings it
        shares (same as ``all`` for a causal LM). ``decoder_late``: only the MLPs and
        cross-attention of the last `late_fraction` of decoder layers (MLPs only for causal LMs).
        Returns parameter counts.
        """
        if mode not in TRAIN_MODES:
            raise InvalidInputError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}")
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.requires_grad_(mode != "decoder_late")
        if mode == "decoder" and self.kind == "seq2seq":
            for p in self.model.get_encoder().parameters():
                p.requires_grad_(False)
            self.model.get_input_embeddings().weight.requires_grad_(False)
        elif mode == "decoder_late":
            layers = self.decoder_layers()
            n_late = max(1, round(len(layers) * late_fraction))
            for layer in list(layers)[len(layers) - n_late :]:
                for name, p in layer.named_parameters():
                    parts = [x.lower() for x in name.split(".")]
                    is_cross = bool(_CROSS & set(parts))
                    is_mlp = bool(_MLP & set(parts)) or (
                        parts[0] == "output" and "attention" not in parts
                    )
                    if is_mlp or (is_cross and self.kind == "seq2seq"):
                        p.requires_grad_(True)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "total": total}
