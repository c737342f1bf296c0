"""`IntraRetriever`: INTRA (INTrinsic Retrieval via Attention) on the encoded-chunk store.

Per chunk the store keeps, from one encoder pass: the full encoder token states (``states``,
varlen, reused as cross-attention memory for C0 and for generation; with ``store_dtype="int8"``
int8 codes plus one float16 scale per token in ``states_scale``), `pooled` mean-pooled
vectors (``pooled``, fixed ``(p, d)``, what every score reads) and, for key-normed backbones
(T5Gemma2), the per-(layer, KV head) key RMS factors of those pooled vectors (``rnorm``).

Search (paper, sections 2.2-2.3 and 3): (1) encoder-side MaxSim of the encoded query against
pooled vectors picks C0 (k0 chunks; k0=0 gives C0 = {}); (2) one decoder pass reads
``[start, query tokens, r_1..r_m]`` with C0's stored states as cross-attention memory; the
retrieval tokens' cross-attention queries of every layer are folded by Reverse-QWK into the
stored space; (3) every candidate chunk in the corpus (not only C0) is scored by
``sum_{l,h} alpha_lh sum_t max_j logit_lht(pooled_j)`` and the top k are returned. For large
corpora FAISS over pooled vectors proposes candidates per layer; the final scores are exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from ...chunking import Spanner, special_token_count, tokenizer_spans
from ...errors import InvalidInputError, NotTrainedError
from ...models import (
    VectorIndex,
    combine_fingerprints,
    encode_texts,
    maxsim_topk,
    model_fingerprint,
    pool_segments_batch,
    tokenizer_fingerprint,
)
from ...models.architectures import (
    BERT2BERT_PREFIX,
    CROSS_INITS,
    DEFAULT_BERT2BERT_ENCODER,
    T5GEMMA2_PREFIX,
    EncoderDecoderArch,
    encoder_decoder_for,
    load_encoder_decoder,
)
from ...models.quant import dequantize_int8, quantize_int8
from ...protocol import Filter
from ...store import TensorSpec
from ...training import FitReport
from ...types import Chunk, Hit
from ..base import MODEL_LIMIT, Ranked, StoreRetriever
from ..options import SearchOptions, check_choice, check_int
from .head import AUX_NAME, RetrievalHead
from .qwk import Folded, QueryTap, key_rnorm, topk_pooled, topk_pooled_many
from .train import IntraFitConfig

#: `model=None` builds this when Gemma 3 270M is fetched (`make models`): a T5Gemma2 whose both
#: stacks are Gemma 3, with label-free memory adapters (see `models.t5gemma2`)
DEFAULT_MODEL = f"{T5GEMMA2_PREFIX}gemma-3-270m"
#: the fallback without Gemma 3: BERT2BERT warm-started from all-MiniLM-L6-v2 (encoder and decoder
#: weights from the checkpoint; cross-attention freshly initialised with `seed`). Its decoder pass
#: ranks at chance (random cross-attention); it remains for offline tests and small installs.
BERT2BERT_MODEL = f"{BERT2BERT_PREFIX}{DEFAULT_BERT2BERT_ENCODER}"


def default_model() -> str:
    """`DEFAULT_MODEL` when its Gemma 3 checkpoint is fetched, else `BERT2BERT_MODEL`."""
    from ...models import gemma3_gguf_path

    return DEFAULT_MODEL if gemma3_gguf_path() is not None else BERT2BERT_MODEL


_RECIPE_VERSION = 1
STORE_DTYPES = ("float16", "bfloat16", "float32", "int8")
POOLED_DTYPES = ("float16", "bfloat16", "float32")


#: decoder positions whose cross-attention queries score chunks: the m retrieval tokens alone
#: (the paper's Eq. 3), or the query's own tokens as well (ColBERT-style query MaxSim)
QUERY_POSITIONS = ("retrieval", "query+retrieval")
MODES = ("intra", "encoder")
#: where a second stage's initial context C0 comes from: the first stage's top `k0` candidates,
#: or INTRA's own encoder-side MaxSim over the candidates (as in a whole-store search)
RERANK_CONTEXTS = ("first_stage", "encoder")
#: how the encoder-side stage scores chunks: MaxSim by raw dot product (the paper), or by the
#: cosine of states standardised per dimension with the store's pooled-vector mean and standard
#: deviation (label-free; Gemma 3's few huge dimensions swamp a raw dot product)
C0_SCORES = ("dot", "standardised")
#: queries per batched decoder call in `search_batch` (see `retrieval_passes`)
DECODER_BATCH = 8


@dataclass(frozen=True)
class IntraSearchOptions(SearchOptions):
    """INTRA's query-time options. `mode`: full INTRA, or ``"encoder"`` (the C0 stage alone);
    `k0`: initial-context size (0: C0 is empty); `query_positions`: whose cross-attention queries
    score chunks; from `ann_threshold` live chunks FAISS proposes candidates (`ann_k` pooled
    neighbours per query vector, IVF `ann_nprobe`, at most `ann_rerank` rows rescored exactly);
    `rerank_context`: where C0 comes from when INTRA reranks another retriever's candidates;
    `c0_score`: how the encoder-side stage scores chunks (`C0_SCORES`)."""

    mode: str = "intra"
    k0: int = 4
    query_positions: str = "retrieval"
    ann_threshold: int = 50_000
    ann_k: int = 32
    ann_nprobe: int = 16
    ann_rerank: int = 2048
    rerank_context: str = "first_stage"
    c0_score: str = "dot"

    def validate(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("c0_score", self.c0_score, C0_SCORES)
        check_choice("rerank_context", self.rerank_context, RERANK_CONTEXTS)
        check_choice("query_positions", self.query_positions, QUERY_POSITIONS)
        check_int("k0", self.k0, 0)
        check_int("ann_threshold", self.ann_threshold, 0)
        for name in ("ann_k", "ann_nprobe", "ann_rerank"):
            check_int(name, getattr(self, name), 1)


class IntraRetriever(StoreRetriever):
    """INTRA retrieval from within an encoder-decoder (see the module docstring).

    `model`: a local directory / hub id of a supported encoder-decoder (T5, flan-T5, BART,
    T5Gemma, T5Gemma2, EncoderDecoderModel); ``"t5gemma2:<Gemma 3 gguf, directory or hub id>"``
    to build a T5Gemma2 from a Gemma 3 checkpoint (`encoder_attention` "causal" or
    "bidirectional"; `memory_adapter` "generated", "none" or a file, see `models.t5gemma2`); or
    None: `DEFAULT_MODEL` (Gemma 3 270M) when fetched, else BERT2BERT from all-MiniLM-L6-v2.
    `pooled` (p) vectors per chunk; `retrieval_tokens` (m); `k0` initial-context size (0: C0 is
    empty). `query_positions`: whose cross-attention queries score chunks, the retrieval tokens
    alone ("retrieval", the paper) or the query tokens too ("query+retrieval"; measured in
    docs/intra.md). `mode="encoder"` returns the encoder-side C0 stage alone. `ann_threshold`: live
    chunks from which FAISS proposes candidates (`ann_k` pooled neighbours per query vector,
    IVF `ann_nprobe`, at most `ann_rerank` rows rescored exactly) instead of an exact full scan.
    `store_dtype` holds token states (``"int8"``: symmetric per-token int8 with a float16 scale,
    dequantised to float wherever states are read); `pooled_dtype` (default float32 on CPU,
    where half->float conversion bounds the scan; else `store_dtype`, float16 for an int8
    store: pooled vectors are never quantised) holds the pooled vectors.
    """

    name = "intra"
    search_options_class = IntraSearchOptions
    fit_config = IntraFitConfig

    def __init__(
        self,
        model: str | None = None,
        *,
        retrieval_tokens: int = 8,
        pooled: int = 8,
        k0: int = 4,
        mode: str = "intra",
        store_dtype: str = "float16",
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
        cross_init: str = "random",
        encoder_attention: str = "causal",
        query_positions: str = "retrieval",
        memory_adapter: str = "generated",
        ann_threshold: int = 50_000,
        ann_k: int = 32,
        ann_nprobe: int = 16,
        ann_rerank: int = 2048,
        rerank_context: str = "first_stage",
        c0_score: str = "dot",
        pooled_dtype: str | None = None,
        head: str | None = None,
        path: str | PathLike[str] | None = None,
        chunk_size: int | str | None = MODEL_LIMIT,
        chunk_overlap: int = 32,
        index_batch_size: int = 256,
        show_progress: bool = True,
    ) -> None:
        if store_dtype not in STORE_DTYPES:
            raise InvalidInputError(
                f"store_dtype must be float16, bfloat16, float32 or int8, got {store_dtype!r}"
            )
        check_int("retrieval_tokens", retrieval_tokens, 1)
        check_int("pooled", pooled, 1)
        self._set_search_options(
            IntraSearchOptions(
                mode=mode,
                k0=k0,
                query_positions=query_positions,
                ann_threshold=ann_threshold,
                ann_k=ann_k,
                ann_nprobe=ann_nprobe,
                ann_rerank=ann_rerank,
                rerank_context=rerank_context,
                c0_score=c0_score,
            )
        )
        model = default_model() if model is None else model
        self.model_name = model
        self.device_arg, self.dtype_arg, self.seed = device, dtype, int(seed)
        if cross_init not in CROSS_INITS:
            raise InvalidInputError(f"cross_init must be one of {CROSS_INITS}, got {cross_init!r}")
        from ...models.t5gemma2 import ENCODER_MODES

        if encoder_attention not in ENCODER_MODES:
            raise InvalidInputError(
                f"encoder_attention must be one of {ENCODER_MODES}, got {encoder_attention!r}"
            )
        if not isinstance(memory_adapter, str) or not memory_adapter:
            raise InvalidInputError(
                "memory_adapter must be 'generated', 'none' or a path to a safetensors file"
            )
        self.cross_init = cross_init
        self.encoder_attention, self.memory_adapter = encoder_attention, memory_adapter
        self.model, self.tokenizer = self._load(
            model, device, dtype, self.seed, cross_init, encoder_attention, memory_adapter
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.arch: EncoderDecoderArch = encoder_decoder_for(self.model).tap_attention()
        self.layers = self.arch.layers()
        self.n_layers, self.n_heads = len(self.layers), self.layers[0].n_heads
        self.dim = self.arch.memory_dim()
        self.m, self.p = retrieval_tokens, pooled
        self.store_dtype = store_dtype
        self.batch_size = int(batch_size)
        if pooled_dtype is not None and pooled_dtype not in POOLED_DTYPES:
            raise InvalidInputError(
                f"pooled_dtype must be None, float16, bfloat16 or float32, got {pooled_dtype!r}"
            )
        self.pooled_dtype_arg = pooled_dtype
        # CPU: float32 pooled vectors. CPU half->float conversion, not memory, bounds the scan
        # (measured in benchmarks/bench_intra.py); they are p/T of the stored bytes.
        # int8 stores keep float16 pooled vectors off CPU: every score reads them.
        self.pooled_dtype = pooled_dtype or (
            "float32"
            if self.device.type == "cpu"
            else ("float16" if store_dtype == "int8" else store_dtype)
        )
        self.head_path = head
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        limits.append(
            getattr(getattr(self.arch.encoder(), "config", None), "max_position_embeddings", None)
        )
        valid = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        limit = min(valid or [512])
        # long-context backbones (Gemma 3: 32k) would make whole documents one chunk; INTRA pools
        # each chunk to p vectors, so keep chunks passage-sized
        limit = limit if limit <= 4096 else 512
        self.max_length = int(max_length) if max_length is not None else limit
        self._ann: VectorIndex | None = None
        # c0_score="standardised": (mean, std, standardised pooled vectors), cached
        self._standardised: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.head: RetrievalHead | None = None
        super().__init__(
            path=path,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            index_batch_size=index_batch_size,
            show_progress=show_progress,
        )

    # ------------------------------------------------------------------ model
    @staticmethod
    def _load(
        model: str,
        device: str | None,
        dtype: str | None,
        seed: int,
        cross_init: str,
        encoder_attention: str,
        memory_adapter: str,
    ):
        return load_encoder_decoder(
            model,
            device=device,
            dtype=dtype,
            seed=seed,
            cross_init=cross_init,
            encoder_attention=encoder_attention,
            memory_adapter=memory_adapter,
        )

    # ------------------------------------------------------------------ store hooks
    def _model_chunk_size(self) -> int:
        return self.max_length - special_token_count(self.tokenizer)

    def _spanner(self) -> Spanner:
        return tokenizer_spans(self.tokenizer)

    def _specs(self) -> dict[str, TensorSpec]:
        specs = {
            "states": TensorSpec("varlen", self.store_dtype, (self.dim,)),
            "pooled": TensorSpec("fixed", self.pooled_dtype, (self.p, self.dim)),
        }
        if self.store_dtype == "int8":
            specs["states_scale"] = TensorSpec("varlen", "float16", (1,))
        if self.arch.key_norm:
            g = self.layers[0].n_kv_heads
            specs["rnorm"] = TensorSpec("fixed", "float32", (self.p, self.n_layers, g))
        return specs

    def _fingerprint(self) -> str:
        recipe = (
            f"intra-v{_RECIPE_VERSION}|{self.arch.arch}|p={self.p}|dtype={self.store_dtype}"
            f"|max_length={self.max_length}"
        )
        if self.pooled_dtype != self.store_dtype:
            recipe += f"|pooled={self.pooled_dtype}"
        return combine_fingerprints(
            hashlib.sha256(recipe.encode()).hexdigest(),
            model_fingerprint(self.model),
            tokenizer_fingerprint(self.tokenizer),
        )

    def _init_args(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "retrieval_tokens": self.m,
            "pooled": self.p,
            "store_dtype": self.store_dtype,
            "device": self.device_arg,
            "dtype": self.dtype_arg,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "cross_init": self.cross_init,
            "encoder_attention": self.encoder_attention,
            "memory_adapter": self.memory_adapter,
            "pooled_dtype": self.pooled_dtype_arg,
            "head": self.head_path,
        }

    def encode_states(
        self, texts: Sequence[str], *, show_progress: bool = False
    ) -> list[torch.Tensor]:
        """Stored representation ``(len_i, d)`` (float32, CPU) of each text, special tokens kept."""
        return encode_texts(
            self.model,
            self.tokenizer,
            list(texts),
            batch_size=self.batch_size,
            max_length=self.max_length,
            show_progress=show_progress,
            desc="encoding (intra)",
            forward=lambda _m, ids, mask: self.arch.encode(ids, mask),
        )

    def _encode_chunks(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        states = [s.float() for s in self.encode_states([c.text for c in chunks])]
        pooled = pool_segments_batch(states, self.p)
        out: dict[str, Any] = {"states": states, "pooled": pooled}
        if self.store_dtype == "int8":
            codes = [quantize_int8(s) for s in states]
            out["states"] = [q for q, _ in codes]
            out["states_scale"] = [sc[:, None] for _, sc in codes]
        if self.arch.key_norm:
            # from the vectors as stored (rounded to the store dtype), so scores are exact for them
            stored = pooled.to(TensorSpec("fixed", self.pooled_dtype, ()).torch_dtype).float()
            out["rnorm"] = key_rnorm(stored, self.layers)
        return out

    def _on_open(self) -> None:
        self._ann = None
        self._forget_c0_stats()
        if self.head is None:
            self.head = self._initial_head()
            got = self.store.get_aux(AUX_NAME)
            if got is not None:
                self._install_head(RetrievalHead.from_state(dict(got[0]), got[1]), "store head")
            if self.head_path is not None:
                self.load_head(self.head_path)

    def _on_rows_added(self, rows: range, tensors: Mapping[str, Any]) -> None:
        self._forget_c0_stats()
        if self._ann is not None:
            self._ann_add(torch.arange(rows.start, rows.stop), tensors["pooled"])

    def _on_rows_deleted(self, rows: Sequence[int]) -> None:
        self._forget_c0_stats()
        if self._ann is not None:
            r = torch.tensor(list(rows), dtype=torch.long)
            self._ann.remove((r[:, None] * self.p + torch.arange(self.p)).reshape(-1))

    def _before_save(self) -> None:
        if self.head is not None and self.head.trained:
            self.save_head()

    # ------------------------------------------------------------------ head
    def _store_id(self) -> str:
        return f"{self.store.fingerprint[:16]}:{self.store.manifest.get('created_at')}"

    def _initial_head(self) -> RetrievalHead:
        head = RetrievalHead.initial(
            self.arch.decoder_embeddings(),
            self.tokenizer,
            self.m,
            self.n_layers,
            self.n_heads,
            seed=self.seed,
        )
        head.binding = self._binding()
        return head

    def _binding(self) -> dict[str, str]:
        return {
            "model": model_fingerprint(self.model),
            "recipe": self._fingerprint(),
            "store": self._store_id(),
            "arch": self.arch.arch,
        }

    def query_projs(self) -> list[torch.nn.Module]:
        """Each decoder layer's cross-attention query projection (what a query LoRA updates)."""
        projs = [layer.query_proj for layer in self.layers]
        if any(p is None for p in projs):  # pragma: no cover - every adapter sets it
            raise InvalidInputError(f"{self.arch.arch} exposes no query projections")
        return projs  # type: ignore[return-value]

    def _install_head(self, head: RetrievalHead, where: object) -> None:
        head.check(
            query_projs=self.query_projs(),
            model=model_fingerprint(self.model),
            recipe=self._fingerprint(),
            store=self._store_id(),
            where=where,
            shape=(self.n_layers, self.n_heads),
            dim=int(self.arch.decoder_embeddings().weight.shape[1]),
        )
        self.head = head
        self.m = head.m

    def reset_head(self) -> None:
        """Back to the untrained initial head (in memory; the stored head is kept until
        `save_head` or `fit` writes a new one)."""
        self.head = self._initial_head()
        self.m = self.head.m

    def save_head(self, path: str | PathLike[str] | None = None) -> None:
        """Persist the retrieval head: into the store (default) or a standalone safetensors file."""
        assert self.head is not None
        self.head.binding = self._binding()
        if path is None:
            self.store.put_aux(AUX_NAME, self.head.state(), self.head.meta())
        else:
            self.head.save(path)

    def load_head(self, path: str | PathLike[str]) -> None:
        """Use a head saved with `save_head(path)`; `ModelMismatchError` if it was trained for
        another model or store recipe (a head from another corpus with the same model warns)."""
        self._install_head(RetrievalHead.load(path), path)

    @property
    def trained(self) -> bool:
        return bool(self.head is not None and self.head.trained)

    def require_trained(self) -> None:
        if not self.trained:
            raise NotTrainedError("the INTRA retrieval head has not been trained; call fit()")

    # ------------------------------------------------------------------ query side
    def check_length(self, query: str) -> None:
        n = len(self.tokenizer(query, add_special_tokens=True)["input_ids"])
        if n > self.max_length:
            self._warn_truncated("query", n, self.max_length)

    def query_states(self, query: str) -> torch.Tensor:
        return self.encode_states([query])[0]

    def pooled_vectors(self) -> torch.Tensor:
        return self.store.fixed("pooled")

    def key_rnorms(self) -> torch.Tensor | None:
        return self.store.fixed("rnorm") if "rnorm" in self.store.specs else None

    def initial_context(self, qstates: torch.Tensor, candidates: torch.Tensor, k0: int) -> Ranked:
        """C0: top-`k0` candidate rows by encoder-side MaxSim (query token states vs pooled)."""
        n = int(candidates.sum())
        k0 = min(k0, n)
        if k0 == 0:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        cand = candidates
        if self._use_ann(n):
            cand = self._ann_candidates(qstates, candidates) & candidates
            if int(cand.sum()) < k0:
                cand = candidates
        docs, query = self._c0_sides()
        scores, idx = maxsim_topk(query(qstates.float())[None], docs, k0, candidates=cand)
        return idx[0].long(), scores[0]

    def _c0_sides(self) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The pooled vectors the encoder-side stage scans and the map its query states go
        through first (`c0_score`). ``"standardised"``: both sides ``normalize((x - mean) /
        std)`` with the mean and per-dimension std of the live pooled vectors, computed on first
        use and again after rows are added or deleted (each store part of a split index uses its
        own); the standardised copy of the pooled vectors is kept in memory."""
        if self.c0_score == "dot":
            return self.pooled_vectors(), lambda x: x
        if self._standardised is None:
            pooled = self.pooled_vectors()
            live = pooled[self.store.live_rows()].float().reshape(-1, self.dim)
            mean = live.mean(0) if len(live) else torch.zeros(self.dim)
            std = live.std(0).clamp_min(1e-6) if len(live) > 1 else torch.ones(self.dim)
            docs = torch.nn.functional.normalize((pooled.float() - mean) / std, dim=-1)
            self._standardised = (mean, std, docs)
        mean, std, docs = self._standardised
        return docs, lambda x: torch.nn.functional.normalize((x - mean) / std, dim=-1)

    def _forget_c0_stats(self) -> None:
        self._standardised = None

    def decoder_prefix(self, query: str) -> torch.Tensor:
        """Decoder input ids ``[start, query tokens]`` truncated to leave room for m tokens."""
        ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        limit = self.arch.decoder_max_positions()
        room = (limit if limit is not None else self.max_length) - 1 - self.m
        start = self.arch.decoder_start_id(self.tokenizer)
        return torch.tensor([start, *ids[: max(room, 0)]], dtype=torch.long)

    def memory_for(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Cross-attention memory ``(1, S, d)`` and mask from stored states of `rows`
        (a masked one-token dummy when `rows` is empty: C0 = {})."""
        rows = [int(r) for r in rows]
        if not rows:
            mem = torch.zeros((1, 1, self.dim), device=self.device)
            return (
                mem.to(self.model_dtype()),
                torch.zeros((1, 1), dtype=torch.long, device=self.device),
                True,
            )
        states = self._read_states(rows, self.device)
        mem = states.to(dtype=self.model_dtype())[None]
        return mem, torch.ones(mem.shape[:2], dtype=torch.long, device=self.device), False

    def _read_states(self, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """Stored token states of `rows`, concatenated, in the store dtype or (int8 store)
        dequantised to float32 on `device` (codes cross to the device before expanding)."""
        states = torch.cat(self.store.varlen("states", rows), 0).to(device)
        if self.store_dtype != "int8":
            return states
        scale = torch.cat(self.store.varlen("states_scale", rows), 0).to(device)
        return dequantize_int8(states, scale[:, 0])

    def stored_states(self, rows: Sequence[int]) -> list[torch.Tensor]:
        """Token states ``(len_i, d)`` of each row as INTRA reads them (float32, CPU;
        dequantised for an int8 store)."""
        rows = [int(r) for r in rows]
        codes = self.store.varlen("states", rows)
        if self.store_dtype != "int8":
            return [x.float() for x in codes]
        scales = self.store.varlen("states_scale", rows)
        return [dequantize_int8(q, sc[:, 0]) for q, sc in zip(codes, scales, strict=True)]

    def _byte_parts(self) -> dict[str, float]:
        """`states` = token states (+ int8 scales), `pooled` = pooled vectors (+ key-norm
        factors), `tokens` = mean states length."""
        size = {name: self.store.tensor_nbytes(name) for name in self.store.specs}
        return {
            "states": size["states"] + size.get("states_scale", 0),
            "pooled": size["pooled"] + size.get("rnorm", 0),
            "tokens": float(self.store.varlen_lengths("states").float().mean()),
        }

    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _decoder_inputs(self, query: str, head: RetrievalHead) -> torch.Tensor:
        """Decoder input embeddings ``(T, d)``: the prefix (start + query tokens), then the
        head's m retrieval tokens."""
        prefix = self.decoder_prefix(query).to(self.device)
        emb = self.arch.decoder_embeddings()(prefix[None])[0]
        return torch.cat([emb, head.tokens.to(device=self.device, dtype=emb.dtype)], 0)

    def _tapped(self, length: int, m: int) -> slice:
        """The positions, in a decoder row of `length` tokens, whose cross-attention queries
        score chunks (`query_positions`)."""
        if self.query_positions == "retrieval":
            return slice(length - m, length)
        return slice(1, length)

    def retrieval_pass(
        self,
        query: str,
        c0_rows: Sequence[int],
        head: RetrievalHead | None = None,
        *,
        c0_states: Sequence[torch.Tensor] | None = None,
    ) -> Folded:
        """One decoder pass over C0; returns the retrieval tokens' folded queries (with grad
        to the head's tokens when they require it). `c0_states` gives C0's stored token states
        instead of rows of this store (a C0 gathered from several store parts)."""
        head = head or self.head
        assert head is not None
        inputs = self._decoder_inputs(query, head)[None]
        if c0_states is not None and len(c0_states):
            mem = torch.cat([s.to(self.device) for s in c0_states], 0)
            memory = mem.to(dtype=self.model_dtype())[None]
            mask = torch.ones(memory.shape[:2], dtype=torch.long, device=self.device)
            null = False
        else:
            memory, mask, null = self.memory_for([] if c0_states is not None else c0_rows)
        positions = self._tapped(int(inputs.shape[1]), head.m)
        with (
            head.query_lora(self.query_projs()),
            QueryTap(self.layers, positions, null_memory=null) as tap,
        ):
            cross = None if null else self.arch.cross_kv(memory)
            self.arch.decoder_pass(memory, mask, inputs, cross)
        return tap.folded()

    def retrieval_passes(
        self, queries: Sequence[str], c0s: Sequence[Sequence[int]], batch: int = DECODER_BATCH
    ) -> list[Folded]:
        """`retrieval_pass` of several queries without grad, `batch` per decoder call: decoder
        rows right-padded, each query's own C0 as its memory row (padded and masked). Where the
        architecture takes precomputed cross K/V (`cross_kv`), each distinct chunk of the
        batch's C0s is read and projected once and its keys/values gathered into every row that
        holds it; that projection is most of a pass's work. A query with an empty C0 runs
        alone."""
        head = self.head
        assert head is not None
        out: list[Folded] = []
        for start in range(0, len(queries), batch):
            qs = list(queries[start : start + batch])
            cs = [[int(r) for r in c] for c in c0s[start : start + batch]]
            if len(qs) == 1 or not all(cs):
                with torch.no_grad():
                    out.extend(self.retrieval_pass(q, c) for q, c in zip(qs, cs, strict=True))
                continue
            with torch.no_grad():
                rows = [self._decoder_inputs(q, head) for q in qs]
                inputs = pad_sequence(rows, batch_first=True)
                memory, mask, cross = self._shared_memory(cs)
                with (
                    head.query_lora(self.query_projs()),
                    QueryTap(self.layers, slice(None)) as tap,
                ):
                    self.arch.decoder_pass(memory, mask, inputs, cross)
                out.extend(tap.folded_rows([self._tapped(len(r), head.m) for r in rows]))
        return out

    def _shared_memory(
        self, c0s: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Padded memory ``(B, S, d)``, its mask, and (where the architecture allows) every
        layer's cross K/V for it, computed once per distinct chunk and gathered per row."""
        distinct = sorted({r for c in c0s for r in c})
        sizes = self.store.varlen_lengths("states")[distinct].tolist()
        union = self._read_states(distinct, self.device).to(self.model_dtype())
        starts = dict(zip(distinct, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
        size = dict(zip(distinct, sizes, strict=True))
        index = [torch.cat([torch.arange(starts[r], starts[r] + size[r]) for r in c]) for c in c0s]
        lengths = torch.tensor([len(i) for i in index], device=self.device)
        gather = pad_sequence(index, batch_first=True).to(self.device)  # padding reads token 0
        mask = (torch.arange(gather.shape[1], device=self.device)[None] < lengths[:, None]).long()
        memory = union[gather]
        shared = self.arch.cross_kv(union[None])
        if shared is None:
            return memory, mask, None
        flat = gather.reshape(-1)
        cross = [
            tuple(
                t[0]
                .index_select(1, flat)
                .view(t.shape[1], *gather.shape, t.shape[-1])
                .transpose(0, 1)
                for t in kv
            )
            for kv in shared
        ]
        return memory, mask, cross  # type: ignore[return-value]

    # ------------------------------------------------------------------ ANN candidates
    def _use_ann(self, n_candidates: int) -> bool:
        return n_candidates >= self.ann_threshold

    def _ann_add(self, rows: torch.Tensor, pooled: torch.Tensor) -> None:
        assert self._ann is not None
        ids = (rows[:, None] * self.p + torch.arange(self.p)).reshape(-1)
        self._ann.add(pooled.float().reshape(-1, self.dim), ids)

    def _ann_index(self) -> VectorIndex:
        if self._ann is None:
            self._ann = VectorIndex(self.dim, metric="ip", kind="auto", nprobe=self.ann_nprobe)
            live = self.store.live_rows()
            for start in range(0, live.numel(), 50_000):
                r = live[start : start + 50_000]
                self._ann_add(r, self.pooled_vectors()[r])
        return self._ann

    def _ann_candidates(
        self,
        vectors: torch.Tensor,
        candidates: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Candidate rows from FAISS: the `ann_k` best pooled vectors (inner product) of each
        query vector; when more than `ann_rerank` rows come back, the ones with the highest
        approximate score (sum over vectors of weight x best returned similarity) are kept."""
        index = self._ann_index()
        vecs = vectors.float().reshape(-1, self.dim)
        allowed = candidates.repeat_interleave(self.p)
        sims, ids = index.search(vecs, self.ann_k, allowed=allowed)
        w = torch.ones(len(vecs)) if weights is None else weights.float().reshape(-1)
        keep = ids >= 0
        vec_of = torch.arange(len(vecs))[:, None].expand_as(ids)[keep]
        rows = torch.div(ids[keep], self.p, rounding_mode="floor")
        sims = sims[keep]
        mask = torch.zeros_like(candidates)
        if rows.numel() == 0:
            return mask
        # best similarity per (vector, row), then the weighted sum per row
        order = torch.argsort(sims, descending=True)
        key = vec_of[order] * candidates.numel() + rows[order]
        uniq, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((uniq.numel(),), key.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(key.numel()), reduce="amin")
        best = order[first]
        approx = torch.zeros(candidates.numel())
        approx.index_add_(0, rows[best], w[vec_of[best]] * sims[best])
        hit = torch.unique(rows)
        if hit.numel() > self.ann_rerank:
            hit = hit[torch.topk(approx[hit], self.ann_rerank).indices]
        mask[hit] = True
        return mask

    # ------------------------------------------------------------------ store parts
    def distributed_scoring(self) -> str:
        """The encoder stage alone is local; the full pass reads a C0 drawn from every part."""
        return "local" if self.mode == "encoder" else "context"

    def head_digest(self) -> str:
        """The retrieval head's parameters, hashed: store parts must score with the same one."""
        assert self.head is not None
        h = hashlib.sha256()
        for name, t in sorted(self.head.state().items()):
            h.update(name.encode())
            h.update(t.float().numpy().tobytes())
        return h.hexdigest()

    def context_states(self, chunk_ids: Sequence[str]) -> list[torch.Tensor]:
        """Stored token states of chunks of this store, by id (C0 members for another part's
        query pass)."""
        return self.stored_states([self.store.row_of(c) for c in chunk_ids])

    def fold_query(self, query: str, c0_states: Sequence[torch.Tensor]) -> Folded:
        """The full pass's folded queries for a C0 given as stored token states, in C0 order."""
        self.check_length(query)
        with torch.no_grad():
            return self.retrieval_pass(query, [], c0_states=c0_states)

    def search_folded(
        self,
        folded: Folded,
        k: int,
        filter: Filter | None = None,
        context_ids: Sequence[str] = (),
    ) -> list[Hit]:
        """This store's top-`k` for folded queries made elsewhere (`fold_query`); `context_ids`
        are C0's chunk ids (those stored here help FAISS candidates, as in `_score`)."""
        candidates = self.store.candidate_mask(filter)
        n = int(candidates.sum())
        if n == 0:
            return []
        here = self.store.existing_chunk_ids(context_ids)
        mine = [self.store.row_of(c) for c in context_ids if c in here]
        c0 = torch.tensor(mine, dtype=torch.long)
        with self.lock:
            rows, scores = self.score_folded(folded, candidates, min(k, n), c0)
        return self._hits(rows, scores, candidates)

    # ------------------------------------------------------------------ scoring
    def _score(self, queries: Sequence[str], candidates: torch.Tensor, k: int) -> list[Ranked]:
        """A batch shares the encoder pass over its queries, one MaxSim scan of the stored
        chunks (C0 for all of them) and batched decoder passes (each over its own C0)."""
        for q in queries:
            self.check_length(q)
        states = self.encode_states(queries)
        first = self.initial_contexts(states, candidates, k if self.mode == "encoder" else self.k0)
        if self.mode == "encoder":
            return first
        assert self.head is not None
        folded = self.retrieval_passes(queries, [c0.tolist() for c0, _ in first])
        return self.score_folded_many(folded, candidates, k, [c0 for c0, _ in first])

    def initial_contexts(
        self, states: Sequence[torch.Tensor], candidates: torch.Tensor, k0: int
    ) -> list[Ranked]:
        """`initial_context` of several queries: one exact MaxSim scan for all of them (query
        states zero-padded and masked), or per query when FAISS proposes the candidates."""
        if len(states) == 1 or self._use_ann(int(candidates.sum())):
            return [self.initial_context(s, candidates, k0) for s in states]
        k0 = min(k0, int(candidates.sum()))
        if k0 == 0:
            return [(torch.empty(0, dtype=torch.long), torch.empty(0)) for _ in states]
        docs, query = self._c0_sides()
        width = max(int(s.shape[0]) for s in states)
        q = torch.zeros(len(states), width, self.dim)
        mask = torch.zeros(len(states), width, dtype=torch.bool)
        for i, s in enumerate(states):
            q[i, : s.shape[0]], mask[i, : s.shape[0]] = query(s.float()), True
        scores, idx = maxsim_topk(q, docs, k0, query_mask=mask, candidates=candidates)
        return [(idx[i].long(), scores[i]) for i in range(len(states))]

    def _rerank(self, query: str, heads: torch.Tensor, candidates: torch.Tensor, k: int) -> Ranked:
        """As a second stage: the decoder reads C0 = the first stage's top `k0` candidates
        (one chunk each; ``rerank_context="first_stage"``) and Reverse-QWK scores exactly the
        candidates."""
        if self.mode == "encoder" or self.rerank_context == "encoder":
            return super()._rerank(query, heads, candidates, k)
        self.check_length(query)
        c0 = heads[: self.k0]
        assert self.head is not None
        with torch.no_grad():
            folded = self.retrieval_pass(query, c0.tolist())
        return self.score_folded(folded, candidates, k, c0)

    def score_folded_many(
        self,
        folded: Sequence[Folded],
        candidates: torch.Tensor,
        k: int,
        c0s: Sequence[torch.Tensor],
    ) -> list[Ranked]:
        """`score_folded` of several queries: one exact scan of the pooled vectors for each
        `DECODER_BATCH` of them (per query where FAISS proposes the candidates). Larger groups
        measured no faster on CPU: past the shared read of the pooled vectors, the work per
        query is its own."""
        assert self.head is not None
        if len(folded) == 1 or self._use_ann(int(candidates.sum())):
            return [
                self.score_folded(f, candidates, k, c0) for f, c0 in zip(folded, c0s, strict=True)
            ]
        out: list[Ranked] = []
        for start in range(0, len(folded), DECODER_BATCH):
            out += topk_pooled_many(
                folded[start : start + DECODER_BATCH],
                self.head.alpha.detach(),
                self.pooled_vectors(),
                self.layers,
                k,
                candidates,
                self.key_rnorms(),
            )
        return out

    def score_folded(
        self, folded: Folded, candidates: torch.Tensor, k: int, c0: torch.Tensor | None = None
    ) -> Ranked:
        """Exact INTRA top-k over `candidates` (FAISS proposes them per layer when large)."""
        assert self.head is not None
        n = int(candidates.sum())
        cand = candidates
        if self._use_ann(n):
            L, H, m, _ = folded.vectors.shape
            w = self.head.alpha.detach().float().view(L, H, 1).expand(L, H, m)
            cand = self._ann_candidates(folded.vectors.reshape(-1, self.dim), candidates, w)
            if c0 is not None and c0.numel():
                cand[c0] = True
            cand &= candidates
            if int(cand.sum()) < k:
                cand = candidates
        rows, scores = topk_pooled(
            folded,
            self.head.alpha.detach(),
            self.pooled_vectors(),
            self.layers,
            k,
            cand,
            self.key_rnorms(),
        )
        return rows, scores

    # ------------------------------------------------------------------ training / generation
    def _fit(self, queries: Any, qrels: Any, config: Any, **extras: Any) -> FitReport:
        """Train the retrieval head with the paper's soft cross-entropy (see `train`)."""
        from .train import fit

        return fit(self, queries, qrels, config)

    def answer(self, query: str, k: int = 5, **kwargs: Any) -> Any:
        """Retrieve, then generate greedily from the selected chunks' stored states; see
        `generate.answer`."""
        from .generate import answer

        return answer(self, query, k=k, **kwargs)
