"""`InContextRetriever`: BlockSearch in-context retrieval on the encoded-chunk store.

Indexing prefills every document block on its own (block-sparse prefill, positions from 0) and
stores its per-layer keys/values; a query block placed at position `max_doc_tokens` then attends
to all stored blocks (streaming, online softmax) and documents are scored by attention readout or
by decoding their codes. See docs/incontext.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ...chunking import Spanner, tokenizer_spans
from ...errors import InvalidInputError, ModelMismatchError, NotTrainedError, StoreError
from ...models.architectures import decoder_only_for
from ...models.fingerprint import combine_fingerprints, model_fingerprint, tokenizer_fingerprint
from ...models.loading import gemma3_gguf_path, load_model, smollm2_gguf_path
from ...models.query_lora import LowRankUpdate, check_low_rank
from ...models.trie import PrefixTrie
from ...store import EncodedChunkStore, TensorSpec
from ...store.shards import read_safetensors, write_safetensors
from ...training import FitReport
from ...types import Chunk, Document
from ..base import Ranked, StoreRetriever
from ..options import SearchOptions, check_choice, check_int
from .attention import CorpusKV, QueryResult, default_ssmax, query_pass
from .blockattn import BACKENDS
from .codes import FORMAT_VERSION, NULL_QUERY, PromptFormat, assign_codes
from .kv import (
    KV_LAYOUTS,
    StoreKV,
    check_conversion,
    kv_tensor_names,
    read_blocks,
    split_layers,
    stored_layout,
)
from .prefill import prefill_blocks
from .recompute import BlockCache, RecomputedKV, to_storage
from .scoring import Masses, constrained_beam_search, readout_scores
from .train import QUERY_LORA_AUX, InContextFitConfig

QUERY_LORA_FORMAT = "intrinsic-retrieval/incontext-query-lora/v1"

SCORINGS = ("readout", "codes")
KV_STORAGES = ("full", "routing")
#: content-free passes kept (by documents and options): a first stage's candidate sets, or a
#: few ``using(...)`` variants, without recomputing one each time
NULL_CACHE_ENTRIES = 4
#: what ranks documents at the routing layer (docs/incontext.md, "Routing")
ROUTE_SCORES = ("maxsim", "mass")


@dataclass(frozen=True)
class InContextSearchOptions(SearchOptions):
    """In-context retrieval's query-time options (see `InContextRetriever`): scoring, readout,
    scalable softmax, routing, beams and the attention backend."""

    scoring: str = "readout"
    readout_layers: list[int] | None = None
    readout_heads: list[int] | None = None
    readout_tokens: str = "all"
    calibrate: bool = True
    ssmax: float | list[float | None] | str | None = None
    ssmax_count: str = "tokens"
    ssmax_reference: int = 2048
    route_layer: int | None = None
    route_top: int = 256
    route_before_attend: bool | None = None
    route_score: str = "maxsim"
    recompute_cache_docs: int = 64
    num_beams: int = 10
    block_docs: int = 64
    attention_backend: str = "auto"
    query_batch: int = 16
    use_query_lora: bool = True

    def validate(self) -> None:
        check_choice("scoring", self.scoring, SCORINGS)
        if not isinstance(self.use_query_lora, bool):
            raise InvalidInputError(
                f"use_query_lora must be True or False, got {self.use_query_lora!r}"
            )
        check_choice("readout_tokens", self.readout_tokens, ("all", "query", "last"))
        check_choice("ssmax_count", self.ssmax_count, ("tokens", "docs"))
        check_choice("route_score", self.route_score, ROUTE_SCORES)
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        if isinstance(self.ssmax, str) and self.ssmax != "auto":
            raise InvalidInputError(
                f"ssmax must be a float, a per-layer list or 'auto', got {self.ssmax!r}"
            )
        check_int("recompute_cache_docs", self.recompute_cache_docs, 0)
        check_int("ssmax_reference", self.ssmax_reference, 2)
        for name in ("route_top", "num_beams", "block_docs", "query_batch"):
            check_int(name, getattr(self, name), 1)


#: packaged models by name (`make models` fetches them); any other string is a path or hub id
PACKAGED_MODELS = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}
#: `model=None` loads this packaged model, chosen by measurement (docs/incontext.md): zero-shot
#: on SciFact, Gemma 3 270M beats SmolLM2-135M (nDCG@10 0.79 vs 0.32 plain, 0.77 vs 0.68 with
#: scalable softmax at 250 documents) and answers faster (fewer layers, one KV head)
DEFAULT_MODEL = "gemma3"


def packaged_model_path(model: str) -> str:
    """A packaged model's file for its name (``ModelLoadError`` naming `make models` when it is
    not fetched); any other `model` unchanged."""
    if model not in PACKAGED_MODELS:
        return model
    path = PACKAGED_MODELS[model]()
    if path is None:
        from ...errors import ModelLoadError
        from ...models.packaged import fetch_hint

        raise ModelLoadError(f"packaged model {model!r} is not fetched; {fetch_hint(model)}")
    return str(path)


class InContextRetriever(StoreRetriever):
    """A decoder-only LM reads the corpus as independent document blocks; the query attends to
    all of them and the attention (or the code the model writes) ranks the documents.

    `model`: a packaged name (``"gemma3"``, the default, or ``"smollm2"``; `make models`), a
    directory, a ``.gguf`` file or a hub id. Key options: `max_doc_tokens` (block size and
    query offset), `store_dtype` of the stored K/V ("float16" or
    "int8"), `kv_layers` (layers whose keys/values are stored: the query pass runs exactly these),
    `scoring` ("readout" zero-shot, or "codes" for a fine-tuned model), `readout_layers` /
    `readout_heads`, `calibrate`, `ssmax` (scalable-softmax ``s_l``: a float, one per layer, or
    "auto" = ``1/log(ssmax_reference)``), `route_layer` / `route_top` (QK-MaxSim routing),
    `route_before_attend` (route from the routing layer's keys before its attention),
    `route_score` ("maxsim", BlockSearch's QK-MaxSim, or "mass": the calibrated readout of the
    readout layers below the first routed layer, a far better router on Gemma 3),
    `kv_storage` ("full", or "routing": store only what layers up to `route_layer` need and
    recompute the routed blocks' later layers at query time, `recompute_cache_docs` kept),
    `kv_layout` ("layer", one stored tensor per layer so the layer-by-layer query pass streams;
    "token", what stores built before this option hold; None: an existing store's own, else
    "layer"),
    `query_batch` (readout queries of one `search_batch` that share a pass over the stored
    blocks; routing and code scoring run query by query), `use_query_lora` (False: search
    without the trained query LoRA the store holds, e.g. to compare with zero-shot).
    """

    name = "incontext"
    renamed_options: ClassVar[dict[str, str]] = {"kv_dtype": "store_dtype"}
    search_options_class = InContextSearchOptions
    fit_config = InContextFitConfig
    row_offset_matters = True  # each block's text starts with its code

    def __init__(
        self,
        model: str | None = None,
        *,
        gguf_file: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_doc_tokens: int = 300,
        max_query_tokens: int = 64,
        code_digits: int = 4,
        store_dtype: str = "float16",
        kv_layers: int | None = None,
        kv_source: str = "mmap",
        kv_storage: str = "full",
        kv_layout: str | None = None,
        scoring: str = "readout",
        readout_layers: Sequence[int] | None = None,
        readout_heads: Sequence[int] | None = None,
        readout_tokens: str = "all",
        calibrate: bool = True,
        ssmax: float | Sequence[float | None] | str | None = None,
        ssmax_count: str = "tokens",
        ssmax_reference: int = 2048,
        route_layer: int | None = None,
        route_top: int = 256,
        route_before_attend: bool | None = None,
        route_score: str = "maxsim",
        recompute_cache_docs: int = 64,
        num_beams: int = 10,
        block_docs: int = 64,
        attention_backend: str = "auto",
        query_batch: int = 16,
        use_query_lora: bool = True,
        prefill_batch: int = 8,
        path: str | None = None,
        chunk_size: int | str | None = None,
        chunk_overlap: int = 0,
        index_batch_size: int = 64,
        show_progress: bool = True,
    ) -> None:
        if store_dtype not in ("float16", "int8", "float32"):
            raise InvalidInputError(
                f"store_dtype must be float16, int8 or float32, got {store_dtype!r}"
            )
        if kv_source not in ("mmap", "ram"):
            raise InvalidInputError(f"kv_source must be 'mmap' or 'ram', got {kv_source!r}")
        if int(max_doc_tokens) < 8:
            raise InvalidInputError(f"max_doc_tokens must be >= 8, got {max_doc_tokens}")
        if kv_storage not in KV_STORAGES:
            raise InvalidInputError(f"kv_storage must be one of {KV_STORAGES}, got {kv_storage!r}")
        if kv_layout is None:  # an existing store's own layout; "layer" for a new one
            existing = path is not None and (Path(path) / "manifest.json").exists()
            tensors = EncodedChunkStore.read_manifest(path)["tensors"] if existing else {}
            kv_layout = stored_layout(tensors) if tensors else "layer"
        check_choice("kv_layout", kv_layout, KV_LAYOUTS)
        model = DEFAULT_MODEL if model is None else model
        self.model_name = model  # recorded resolved: a later default never reopens this store
        self.gguf_file = gguf_file
        self.device_arg, self.dtype_arg = device, dtype
        source = packaged_model_path(model)
        self.model, self.tokenizer = load_model(
            str(source), kind="causal", gguf_file=gguf_file, device=device, dtype=dtype
        )
        self.arch = decoder_only_for(self.model)
        L = self.arch.num_layers
        self.kv_layers = L if kv_layers is None else int(kv_layers)
        if not 1 <= self.kv_layers <= L:
            raise InvalidInputError(f"kv_layers must be in [1, {L}], got {kv_layers}")
        self.max_doc_tokens = int(max_doc_tokens)
        self.max_query_tokens = int(max_query_tokens)
        self.code_digits = int(code_digits)
        self.store_dtype, self.kv_source = store_dtype, kv_source
        self.kv_storage, self.kv_layout = kv_storage, kv_layout
        self._block_cache = BlockCache(0)
        self._null_cache: dict[str, tuple[QueryResult, dict[int, Any]]] = {}
        self._set_search_options(
            InContextSearchOptions(
                scoring=scoring,
                readout_layers=None if readout_layers is None else list(readout_layers),
                readout_heads=None if readout_heads is None else list(readout_heads),
                readout_tokens=readout_tokens,
                calibrate=calibrate,
                ssmax=ssmax if isinstance(ssmax, str | float | int | type(None)) else list(ssmax),
                ssmax_count=ssmax_count,
                ssmax_reference=ssmax_reference,
                route_layer=route_layer,
                route_top=route_top,
                route_before_attend=route_before_attend,
                route_score=route_score,
                recompute_cache_docs=recompute_cache_docs,
                num_beams=num_beams,
                block_docs=block_docs,
                attention_backend=attention_backend,
                query_batch=query_batch,
                use_query_lora=use_query_lora,
            )
        )
        self.prefill_batch = int(prefill_batch)
        self.format = PromptFormat(self.tokenizer, self.code_digits)
        self.format.block(0, [], self.max_doc_tokens)  # fails now if the markers leave no room
        self._corpus: Any = None
        self.truncated_ids: list[str] = []
        self._pending_codes: list[int] = []
        self._code_start = 0
        super().__init__(
            path=path,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            index_batch_size=index_batch_size,
            show_progress=show_progress,
        )

    def _resolve_ssmax(self, ssmax: Any, reference: int) -> list[float | None] | None:
        L = self.arch.num_layers
        if ssmax is None:
            return None
        if isinstance(ssmax, str):
            return default_ssmax(L, reference)
        if isinstance(ssmax, float | int):
            return [float(ssmax)] * L
        values = [None if s is None else float(s) for s in ssmax]
        if len(values) != L:
            raise InvalidInputError(f"ssmax needs one value per layer ({L}), got {len(values)}")
        return values

    def _check_search_options(self, options: Any) -> None:
        o: InContextSearchOptions = options
        if o.scoring == "codes" and self.kv_layers != self.arch.num_layers:
            raise InvalidInputError("scoring='codes' needs every layer: leave kv_layers unset")
        if o.readout_layers is not None and any(
            not 0 <= int(x) < self.kv_layers for x in o.readout_layers
        ):
            raise InvalidInputError(f"readout_layers must lie in [0, {self.kv_layers})")
        if o.route_layer is not None and not 0 <= int(o.route_layer) < self.kv_layers:
            raise InvalidInputError(f"route_layer must lie in [0, {self.kv_layers})")
        self._resolve_ssmax(o.ssmax, o.ssmax_reference)  # a per-layer list of the wrong length
        if o.route_score == "mass" and o.route_layer is not None:
            before = self.kv_storage == "routing" or bool(o.route_before_attend)
            first_routed = int(o.route_layer) + (0 if before else 1)
            readout = range(self.kv_layers) if o.readout_layers is None else o.readout_layers
            if not any(int(x) < first_routed for x in readout):
                raise InvalidInputError(
                    f"route_score='mass' routes by the readout of layers below {first_routed}, "
                    f"and readout_layers has none: add one or use route_score='maxsim'"
                )
        if self.kv_storage == "routing":
            if o.route_layer is None:
                raise InvalidInputError(
                    "kv_storage='routing' stores keys up to the routing layer: pass route_layer=r"
                )
            current = getattr(self, "search_options", None)
            if current is not None and o.route_layer != current.route_layer:  # type: ignore[attr-defined]
                raise InvalidInputError(
                    f"route_layer is index-defining with kv_storage='routing' (the store holds "
                    f"keys up to layer {current.route_layer}); build another index to change it"  # type: ignore[attr-defined]
                )
            if o.route_before_attend is False:
                raise InvalidInputError(
                    "kv_storage='routing' routes before the routing layer's attention (its values "
                    "are not stored): route_before_attend cannot be False"
                )

    def _apply_search_options(self, options: Any) -> None:
        super()._apply_search_options(options)
        o: InContextSearchOptions = options
        self.readout_layers = (
            list(range(self.kv_layers))
            if o.readout_layers is None
            else [int(x) for x in o.readout_layers]
        )
        self.readout_heads = None if o.readout_heads is None else [int(x) for x in o.readout_heads]
        self.route_layer = None if o.route_layer is None else int(o.route_layer)
        self.route_before_attend = self.kv_storage == "routing" or bool(o.route_before_attend)
        self.route_score = o.route_score
        self.use_query_lora = o.use_query_lora
        self.ssmax = self._resolve_ssmax(o.ssmax, o.ssmax_reference)
        self._block_cache.capacity = int(o.recompute_cache_docs)

    # ------------------------------------------------------------------ hooks
    def _model_chunk_size(self) -> int:
        """Text tokens one block holds next to its code markers."""
        _, start, end, _ = self.format.block(0, [0] * self.max_doc_tokens, self.max_doc_tokens)
        return end - start

    def _spanner(self) -> Spanner:
        return tokenizer_spans(self.tokenizer)

    def _stored_layers(self) -> tuple[int, int]:
        """Layers whose keys and whose values the store holds (0..n-1 each)."""
        if self.kv_storage == "routing":
            r = int(self.route_layer)  # type: ignore[arg-type]
            return r + 1, r
        return self.kv_layers, self.kv_layers

    def _kv_names(self) -> dict[str, tuple[str, int | None]]:
        """The store tensors of keys, values and scales (`kv.kv_tensor_names`)."""
        k_layers, v_layers = self._stored_layers()
        return kv_tensor_names(self.kv_layout, k_layers, v_layers, self.store_dtype == "int8")

    def _specs(self) -> dict[str, TensorSpec]:
        ad = self.arch
        layers = dict(zip(("k", "v"), self._stored_layers(), strict=True))
        specs = {
            "ids": TensorSpec("varlen", "int32", ()),
            "code": TensorSpec("fixed", "int64", ()),
            "span": TensorSpec("fixed", "int32", (2,)),
        }
        for name, (what, layer) in self._kv_names().items():
            scale = what.endswith("_scale")
            per_token = (ad.num_kv_heads,) if scale else (ad.num_kv_heads, ad.head_dim)
            shape = per_token if layer is not None else (layers[what[0]], *per_token)
            specs[name] = TensorSpec("varlen", "float16" if scale else self.store_dtype, shape)
        return specs

    def _fingerprint(self) -> str:
        recipe = (
            f"incontext|format=v{FORMAT_VERSION}|max_doc_tokens={self.max_doc_tokens}|"
            f"digits={self.code_digits}|kv={self.store_dtype}|layers={self.kv_layers}"
        )
        if self.kv_storage == "routing":  # full stores keep their existing fingerprints
            recipe += f"|storage=routing@{self.route_layer}"
        if self.kv_layout != "token":  # so do stores built before layouts existed
            recipe += f"|layout={self.kv_layout}"
        return combine_fingerprints(
            recipe, model_fingerprint(self.model), tokenizer_fingerprint(self.tokenizer)
        )

    def _init_args(self) -> dict[str, Any]:
        return {
            "model": None if self.model_name is None else str(self.model_name),
            "gguf_file": self.gguf_file,
            "device": self.device_arg,
            "dtype": self.dtype_arg,
            "max_doc_tokens": self.max_doc_tokens,
            "max_query_tokens": self.max_query_tokens,
            "code_digits": self.code_digits,
            "store_dtype": self.store_dtype,
            "kv_layers": self.kv_layers,
            "kv_source": self.kv_source,
            "kv_storage": self.kv_storage,
            "kv_layout": self.kv_layout,
            "prefill_batch": self.prefill_batch,
        }

    # ------------------------------------------------------------------ indexing
    @classmethod
    def check_combined(cls, store: EncodedChunkStore) -> None:
        """Codes must stay unique across parts: a part built without `set_row_offset` starts
        at code 0 again, and its blocks would name other documents' codes."""
        codes = store.fixed("code")[store.live_rows()]
        if len(torch.unique(codes)) != len(codes):
            raise StoreError(
                "in-context parts repeat document codes: each part must be built after "
                "set_row_offset(rows of the parts before it) (index_distributed does this)"
            )

    def set_row_offset(self, offset: int) -> None:
        """Codes of this store part start after the `offset` rows of the parts before it, as
        they would in one store built in a single pass."""
        self._code_start = int(offset)

    def _live_codes(self) -> list[int]:
        live = self.store.live_rows()
        if not len(live):
            return []
        return self.store.fixed("code")[live].tolist()

    def _ingest(self, docs: Sequence[Document]) -> None:
        n_new = sum(len(self.chunker.split(d)) for d in docs)
        assign_codes(self._live_codes(), n_new, self.code_digits, self._code_start)  # fail early
        self._pending_codes: list[int] = []
        self.truncated_ids = []
        try:
            super()._ingest(docs)
        finally:
            self._pending_codes = []
        if self.truncated_ids:
            shown = ", ".join(repr(i) for i in self.truncated_ids[:5])
            more = f" (+{len(self.truncated_ids) - 5} more)" if len(self.truncated_ids) > 5 else ""
            warnings.warn(
                f"{len(self.truncated_ids)} chunk(s) longer than max_doc_tokens="
                f"{self.max_doc_tokens} were truncated: {shown}{more} (their ids are in "
                "retriever.truncated_ids)",
                stacklevel=3,
            )

    def encode_blocks(
        self, codes: Sequence[int], texts: Sequence[str]
    ) -> list[tuple[list[int], int, int, bool]]:
        return [
            self.format.block(c, ids, self.max_doc_tokens)
            for c, ids in zip(codes, self.format.text_ids(texts), strict=True)
        ]

    def _encode_chunks(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        codes = assign_codes(
            [*self._live_codes(), *self._pending_codes],
            len(chunks),
            self.code_digits,
            self._code_start,
        )
        self._pending_codes.extend(codes)
        blocks = self.encode_blocks(codes, [c.text for c in chunks])
        self.truncated_ids.extend(c.id for c, b in zip(chunks, blocks, strict=True) if b[3])
        k_layers, v_layers = self._stored_layers()
        with torch.inference_mode():
            kv = prefill_blocks(
                self.arch, [b[0] for b in blocks], k_layers, batch_size=self.prefill_batch
            )
        kv = [(k[:, :k_layers], v[:, :v_layers]) for k, v in kv]
        out: dict[str, Any] = {
            "ids": [torch.tensor(b[0], dtype=torch.int32) for b in blocks],
            "code": torch.tensor(codes, dtype=torch.int64),
            "span": torch.tensor([[b[1], b[2]] for b in blocks], dtype=torch.int32),
        }
        for i, name in enumerate(("k", "v") if v_layers else ("k",)):
            stored = [to_storage(pair[i].cpu(), self.store_dtype) for pair in kv]
            out.update(split_layers([x for x, _ in stored], name, self.kv_layout))
            if self.store_dtype == "int8":
                out.update(split_layers([sc for _, sc in stored], f"{name}_scale", self.kv_layout))
        return out

    def _on_open(self) -> None:
        self._corpus = None
        self._null_cache.clear()
        self._load_query_lora()
        self._block_cache.clear()  # rows may be renumbered (compaction) or weights changed (fit)

    def _on_rows_added(self, rows: range, tensors: Mapping[str, Any]) -> None:
        self._corpus = None  # existing rows (and their recomputed blocks) are unchanged
        self._null_cache.clear()

    def _on_rows_deleted(self, rows: Sequence[int]) -> None:
        self._null_cache.clear()

    # ------------------------------------------------------------------ query side
    def corpus(self) -> Any:
        """Stored blocks in query-pass form (all store rows; candidates are chosen per query)."""
        if self._corpus is None:
            int8 = self.store_dtype == "int8"
            has_v = self._stored_layers()[1] > 0
            if self.kv_source == "mmap":
                self._corpus = StoreKV(self.store, int8, self.kv_layout)
            elif self.kv_layout == "layer":
                names = self._kv_names()

                def layers(what: str) -> list[torch.Tensor]:
                    """Every layer of `what`, in memory (`varlen_all` maps a single shard)."""
                    return [
                        self.store.varlen_all(name)[0].clone()
                        for name, (kind, _) in names.items()
                        if kind == what
                    ]

                self._corpus = CorpusKV.from_layers(
                    self.store.varlen_lengths("ids"),
                    layers("k"),
                    layers("v"),
                    layers("k_scale") if int8 else None,
                    layers("v_scale") if int8 else None,
                )
            else:
                rows = range(self.store.num_rows)
                k = self.store.varlen("k", rows)
                v = self.store.varlen("v", rows) if has_v else None
                ks = self.store.varlen("k_scale", rows) if int8 else None
                vs = self.store.varlen("v_scale", rows) if int8 and has_v else None
                self._corpus = CorpusKV(k, v, ks, vs)
            if self.kv_storage == "routing":
                self._corpus = RecomputedKV(
                    self._corpus,
                    self.arch,
                    lambda rows: [t.tolist() for t in self.store.varlen("ids", rows)],
                    route_layer=int(self.route_layer),  # type: ignore[arg-type]
                    num_layers=self.kv_layers,
                    kv_dtype=self.store_dtype,
                    cache=self._block_cache,
                    prefill_batch=self.prefill_batch,
                )
        return self._corpus

    def read_texts(self, rows: Sequence[int]) -> list[str]:
        """The part of each stored chunk's text the model actually read (after truncation)."""
        spans = self.store.fixed("span")
        out = []
        for row, ids in zip(rows, self.store.varlen("ids", rows), strict=True):
            s, e = spans[row].tolist()
            out.append(self.tokenizer.decode(ids[s:e].tolist()).strip())
        return out

    def _byte_parts(self) -> dict[str, float]:
        """`kv` = the key/value tensors and int8 scales, for whichever `kv_storage` the store
        uses; `tokens` = mean block length (a row is one block)."""
        kv = sum(self.store.tensor_nbytes(name) for name in self._kv_names())
        return {"kv": float(kv), "tokens": float(self.store.varlen_lengths("ids").float().mean())}

    def _query_ids(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, s, e, cut = self.format.query(text, self.max_query_tokens)
        if cut:
            self._warn_truncated(
                "query", len(self.format.text_ids([text])[0]), self.max_query_tokens
            )
        if self.readout_tokens == "query":
            sel = torch.arange(s, e)
        elif self.readout_tokens == "last":
            sel = torch.tensor([len(ids) - 1])
        else:
            sel = torch.arange(len(ids))
        return torch.tensor([ids]), sel

    def query_projs(self) -> list[torch.nn.Module]:
        """Every layer's query projection (what a query LoRA updates)."""
        return [layer.self_attn.q_proj for layer in self.arch.layers]

    def set_query_lora(self, update: LowRankUpdate | None) -> None:
        """Install (and persist in the store) a trained query-side LoRA, or remove it."""
        if update is None:
            if QUERY_LORA_AUX in self.store.aux_names():
                self.store.delete_aux(QUERY_LORA_AUX)
        else:
            self.store.put_aux(QUERY_LORA_AUX, update.state(), self._query_lora_meta())
        self.query_lora = update  # after the write: a failed write leaves search as it was
        self._null_cache.clear()

    def _query_lora_meta(self) -> dict[str, str]:
        return {"format": QUERY_LORA_FORMAT, "model": model_fingerprint(self.model)}

    def _load_query_lora(self) -> None:
        """The store's query LoRA, refused when it was trained on another model."""
        self.query_lora = None
        got = self.store.get_aux(QUERY_LORA_AUX)
        if got is not None:
            where = f"{self.store.path} (aux {QUERY_LORA_AUX})"
            self.query_lora = self._checked_query_lora(*got, where)

    def _checked_query_lora(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], where: str
    ) -> LowRankUpdate:
        """A stored query LoRA as an update for this model; `ModelMismatchError` when it is
        not one, or was made for another model or shape."""
        if meta.get("format") != QUERY_LORA_FORMAT or not {"lora_a", "lora_b"} <= set(tensors):
            found = str(meta.get("format", "no format"))
            raise ModelMismatchError(where, expected=QUERY_LORA_FORMAT, found=found)
        model = model_fingerprint(self.model)
        if meta.get("model") != model:
            raise ModelMismatchError(where, expected=model, found=str(meta.get("model")))
        check_low_rank(self.query_projs(), tensors["lora_a"], tensors["lora_b"], where)
        return LowRankUpdate(tensors["lora_a"], tensors["lora_b"]).requires_grad_(False)

    def convert_kv_layout(
        self, path: str | PathLike[str], kv_layout: str = "layer", *, batch_rows: int = 64
    ) -> InContextRetriever:
        """A copy of this index at `path` with its keys and values laid out as `kv_layout`,
        without running the model: the stored numbers are moved, not recomputed, so searches
        rank and score exactly as before. This is how a store built before layouts existed
        ("token", whose layer-by-layer query pass reads each layer with a strided gather) gets
        the faster "layer" layout without a new prefill. Live rows and aux entries (the query
        LoRA, cached generated queries) are copied. Interrupted, it resumes: run it again with
        the same `path` and the rows already there (by chunk id) are skipped, so the source
        should not change between the two runs."""
        dest = Path(path)
        check_conversion(self.store.path, dest, self.kv_layout, kv_layout)
        init = {**self.init_args(), "kv_layout": kv_layout, "show_progress": self.show_progress}
        out = type(self)(**init, path=str(dest))  # loads the model: the recipe checks need it
        live = self.store.live_rows().tolist()
        layers = dict(zip(("k", "v"), self._stored_layers(), strict=True))
        kv_names = self._kv_names()
        bar = tqdm(
            total=len(live),
            desc="converting (incontext)",
            unit="block",
            disable=not self.show_progress,
        )
        with self.lock, out.lock, bar:
            for start in range(0, len(live), batch_rows):
                rows = live[start : start + batch_rows]
                chunks = self.store.get(rows)
                done = out.store.existing_chunk_ids(c.id for c in chunks)
                todo = [(r, c) for r, c in zip(rows, chunks, strict=True) if c.id not in done]
                if todo:
                    picked = [r for r, _ in todo]
                    tensors: dict[str, Any] = {}
                    for name, spec in self.store.specs.items():
                        if name in kv_names:  # keys, values, scales: laid out again below
                            continue
                        if spec.kind == "fixed":
                            tensors[name] = self.store.fixed(name)[picked]
                        else:
                            tensors[name] = self.store.varlen(name, picked)
                    for what in sorted({what for what, _ in kv_names.values()}):
                        n = layers[what[0]]
                        blocks = read_blocks(self.store, self.kv_layout, what, n, picked)
                        tensors.update(split_layers(blocks, what, kv_layout))
                    out.store.append([c for _, c in todo], tensors)
                bar.update(len(rows))
            for name in self.store.aux_names():
                self.store.copy_aux_to(out.store, name)
            out._on_open()
        return out

    def save_query_lora(self, path: str | PathLike[str]) -> None:
        """Write the trained query LoRA to a standalone safetensors file (atomically, bound to
        the model's fingerprint), for another index of the same model (`load_query_lora`):
        train on a sample of the corpus, search the whole of it. The update only touches the
        query side, so it needs no re-encoding wherever it goes."""
        if self.query_lora is None:
            raise NotTrainedError("no query LoRA to save: fit(objective='readout') first")
        write_safetensors(Path(path), self.query_lora.state(), self._query_lora_meta())

    def load_query_lora(self, path: str | PathLike[str]) -> None:
        """Use a query LoRA saved with `save_query_lora` and write it into this store (it reloads
        with it; unlike INTRA's `load_head`, which installs in memory only). `InvalidInputError`
        when there is no such file or it is not a query LoRA; `ModelMismatchError` when it was
        trained for another model. A refused file leaves the store as it was. The file is bound
        to the model only: use it with the query-time options it was trained with."""
        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"no query LoRA file at {path}")
        try:
            tensors, meta = read_safetensors(path)
        except Exception as exc:  # safetensors raises its own error types for a bad file
            raise InvalidInputError(f"{path} is not a safetensors file: {exc}") from None
        if meta.get("format") != QUERY_LORA_FORMAT:
            raise InvalidInputError(f"{path} is not an in-context query LoRA (save_query_lora)")
        self.set_query_lora(self._checked_query_lora(tensors, meta, str(path)))

    def _pass(
        self, ids: torch.Tensor, docs: torch.Tensor, num_layers: int, **kw: Any
    ) -> QueryResult:
        lora = self.query_lora if self.use_query_lora else None
        with lora.applied(self.query_projs()) if lora is not None else contextlib.nullcontext():
            return self._plain_pass(ids, docs, num_layers, **kw)

    def _plain_pass(
        self, ids: torch.Tensor, docs: torch.Tensor, num_layers: int, **kw: Any
    ) -> QueryResult:
        return query_pass(
            self.arch,
            self.corpus(),
            ids,
            q_offset=self.max_doc_tokens,
            num_layers=num_layers,
            docs=docs,
            block_docs=self.block_docs,
            backend=self.attention_backend,
            ssmax=self.ssmax,
            ssmax_count=self.ssmax_count,
            route_before_attend=self.route_before_attend,
            **kw,
        )

    def _null(self, docs: torch.Tensor) -> QueryResult:
        """The content-free query's pass over `docs`, cached by the documents and the search
        options (it costs as much as a query): a ``using(...)`` block gets its own entry and
        leaves the others, so searches after it do not pay the pass again. Data and weight
        changes clear the cache."""
        options = json.dumps(self.search_options.to_json(), sort_keys=True, default=str)
        digest = hashlib.blake2b(docs.numpy().tobytes(), digest_size=16)
        digest.update(options.encode())
        key = digest.hexdigest()
        hit = self._null_cache.pop(key, None)
        if hit is None:
            ids, sel = self._query_ids(NULL_QUERY)
            upto = self._depth() if self.route_layer is None else self._routed_from()
            res = self._pass(ids, docs, upto, mass_layers=self.readout_layers, mass_tokens=sel)
            hit = (res, {"sel": sel, "ids": ids})
        self._null_cache[key] = hit  # most recently used last
        while len(self._null_cache) > NULL_CACHE_ENTRIES:
            del self._null_cache[next(iter(self._null_cache))]
        return hit[0]

    def _routed_from(self) -> int:
        """First layer that attends only to the routed documents."""
        assert self.route_layer is not None
        return self.route_layer + (0 if self.route_before_attend else 1)

    def _depth(self) -> int:
        """Layers the readout needs: up to the last readout layer (and the routing layer)."""
        depth = max(self.readout_layers) + 1
        if self.route_layer is not None:
            depth = max(depth, self.route_layer + 1)
        return depth

    def _route_kw(self, null: Masses | None) -> dict[str, Any]:
        """A query pass's routing arguments: the routing layer and, with ``route_score="mass"``,
        the scorer (the readout of the layers before the first routed one, calibrated by the
        content-free query's masses `null`) and the layers whose masses it reads."""
        kw: dict[str, Any] = {"route_layer": self.route_layer, "route_top": self.route_top}
        if self.route_layer is None or self.route_score != "mass":
            return kw
        layers = [x for x in self.readout_layers if x < self._routed_from()]
        n, heads = self.store.num_rows, self.readout_heads

        def by_mass(masses: Masses, docs: torch.Tensor) -> torch.Tensor:
            return readout_scores(masses, n, layers, heads, null)[0][docs]

        kw["route_by"] = by_mass
        kw["mass_layers"] = layers
        return kw

    def _readout_batch(self, queries: Sequence[str], docs: torch.Tensor, k: int) -> list[Ranked]:
        """Readout of several queries in one pass over the stored blocks: the queries are
        packed into one row without padding (`query_pass` ``segments``: each token attends to
        its own query's tokens and to the blocks) and each one's readout tokens are weighted by
        its own row. No routing here: routed sets differ per query."""
        parts = [self._query_ids(q) for q in queries]
        ids = torch.cat([row[0] for row, _ in parts])[None]
        lengths = torch.tensor([int(row.shape[1]) for row, _ in parts])
        starts = torch.cumsum(lengths, 0) - lengths
        segments = torch.repeat_interleave(torch.arange(len(parts)), lengths)
        weights = torch.zeros(len(parts), int(lengths.sum()))
        for i, (_, sel) in enumerate(parts):
            weights[i, starts[i] + sel] = 1.0 / len(sel)
        res = self._pass(
            ids,
            docs,
            self._depth(),
            mass_layers=self.readout_layers,
            mass_tokens=weights,
            segments=segments,
        )
        null = dict(self._null(docs).masses) if self.calibrate else None
        out: list[Ranked] = []
        for i in range(len(parts)):
            masses = {layer: (d, m[i : i + 1]) for layer, (d, m) in res.masses.items()}
            scores, _ = readout_scores(
                masses, self.store.num_rows, self.readout_layers, self.readout_heads, null
            )
            top = torch.topk(scores[docs], k)
            out.append((docs[top.indices], top.values))
        return out

    def _readout_rank(self, query: str, docs: torch.Tensor, k: int) -> Ranked:
        ids, sel = self._query_ids(query)
        depth = self._depth()
        null = self._null(docs) if self.calibrate else None
        route = self._route_kw(None if null is None else null.masses)
        route["mass_layers"] = self.readout_layers
        res = self._pass(ids, docs, depth, mass_tokens=sel, **route)
        null_masses = None
        if null is not None:
            null_masses = dict(null.masses)
            if res.routed is not None and depth > self._routed_from():
                # the content-free query resumes where routing starts, over the same routed set
                nids, nsel = self._query_ids(NULL_QUERY)
                cont = self._pass(
                    nids,
                    res.routed,
                    depth,
                    mass_layers=self.readout_layers,
                    mass_tokens=nsel,
                    start_layer=self._routed_from(),
                    hidden=null.hidden,
                    route_layer=self.route_layer,
                    routed=res.routed,
                )
                null_masses.update(cont.masses)
        n = self.store.num_rows
        scores, _ = readout_scores(
            res.masses, n, self.readout_layers, self.readout_heads, null_masses
        )
        if res.routed is not None and res.route_scores is not None:
            first = res.routed[torch.argsort(scores[res.routed], descending=True)]
            rest_mask = torch.ones(n, dtype=torch.bool)
            rest_mask[res.routed] = False
            rest_mask &= torch.isin(torch.arange(n), docs)
            rest = torch.nonzero(rest_mask).flatten()
            rest = rest[torch.argsort(res.route_scores[rest], descending=True)]
            order = torch.cat([first, rest])[:k]
            floor = float(scores[first].min()) if len(first) else 0.0
            out = scores.clone()
            out[rest] = (
                floor - 1.0 - torch.arange(len(rest), dtype=torch.float32) / max(1, len(rest))
            )
            return order, out[order]
        vals = scores[docs]
        top = torch.topk(vals, k)
        return docs[top.indices], top.values

    def _code_rank(self, query: str, docs: torch.Tensor, k: int) -> Ranked:
        ids, _ = self._query_ids(query)
        L = self.arch.num_layers
        null = self._null(docs) if self.calibrate and self.route_score == "mass" else None
        res = self._pass(ids, docs, L, **self._route_kw(None if null is None else null.masses))
        first = torch.log_softmax(
            self.arch.logits(self.arch.final_norm(res.hidden[:, -1])).float(), -1
        )[0]
        codes = self.store.fixed("code")[docs].tolist()
        by_code = {
            self.format.code_str(c): int(r) for c, r in zip(codes, docs.tolist(), strict=True)
        }
        trie = PrefixTrie(([int(ch) for ch in c], int(c)) for c in by_code)
        state = {"cache": res.cache}

        def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            cache = state["cache"].select(parents.to(self.arch.device))
            out = self._pass(
                tokens[:, None],
                docs,
                L,
                cache=cache,
                route_layer=self.route_layer,
                routed=res.routed,
            )
            state["cache"] = out.cache
            logits = self.arch.logits(self.arch.final_norm(out.hidden[:, -1]))
            return torch.log_softmax(logits.float(), -1)

        width = min(len(by_code), max(self.num_beams, k))
        beams = constrained_beam_search(
            first,
            step,
            trie,
            self.format.digit_ids,
            self.code_digits,
            width,  # type: ignore[attr-defined]
        )[:k]
        rows = torch.tensor([by_code[c] for c, _ in beams], dtype=torch.long)
        return rows, torch.tensor([s for _, s in beams], dtype=torch.float32)

    def _score(self, queries: Sequence[str], candidates: torch.Tensor, k: int) -> list[Ranked]:
        docs = torch.nonzero(candidates).flatten()
        out: list[Ranked] = []
        with torch.inference_mode():
            if self.scoring == "readout" and self.route_layer is None and len(queries) > 1:
                for i in range(0, len(queries), self.query_batch):
                    out.extend(self._readout_batch(queries[i : i + self.query_batch], docs, k))
                return out
            for q in queries:
                if self.scoring == "codes":
                    out.append(self._code_rank(q, docs, k))
                else:
                    out.append(self._readout_rank(q, docs, k))
        return out

    # ------------------------------------------------------------------ training
    def _fit(self, queries: Any, qrels: Any, config: Any, **extras: Any) -> FitReport:
        """`objective="readout"`: a query-side LoRA on the readout (`train.fit_readout`; the
        stored blocks stay valid). `"codes"`: fine-tune the model to emit codes
        (`train.fit_codes`); the stored blocks were made by the old weights, so the index is
        rebuilt from the stored texts afterwards."""
        from .train import fit_codes, fit_readout

        if config.objective == "readout":
            return fit_readout(self, queries, qrels, config)
        return fit_codes(self, queries, qrels, config)
