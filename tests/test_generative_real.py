"""Generative retrieval with the real backbones shipped here (slow: loads real weights)."""

from __future__ import annotations

import pytest
import torch

from intrinsic_retrieval.retrievers.generative import GenerativeDocidRetriever

DOCS = [
    {"id": "photo", "text": "Photosynthesis converts light energy into chemical energy."},
    {"id": "volcano", "text": "Volcanic eruptions eject magma, ash and sulfur dioxide."},
    {"id": "insulin", "text": "Insulin is a hormone that regulates blood glucose levels."},
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _memorise(r: GenerativeDocidRetriever, **kw) -> None:
    r.add(DOCS)
    r.fit(
        inputs=("firstp",), epochs=40, batch_size=3, lr=1e-3, warmup_steps=1,
        heldout_fraction=0.0, show_progress=False, **kw,
    )  # fmt: skip
    assert [h[0].document_id for h in r.search_batch([d["text"] for d in DOCS], k=1)] == [
        d["id"] for d in DOCS
    ]


@pytest.mark.slow
@pytest.mark.parametrize("docids", ["atomic", "naive"])
def test_bert2bert_from_minilm_memorises(minilm_path, docids, tmp_path):
    r = GenerativeDocidRetriever(
        f"bert2bert:{minilm_path}", docids=docids, path=str(tmp_path / "s"), show_progress=False
    )
    _memorise(r, train_mode="decoder")
    r2 = GenerativeDocidRetriever.load(tmp_path / "s")
    assert r2.search(DOCS[2]["text"], k=1)[0].document_id == "insulin"


@pytest.mark.slow
def test_smollm2_gguf_causal_backbone(smollm2_gguf, tmp_path):
    r = GenerativeDocidRetriever(
        str(smollm2_gguf), docids="atomic", path=str(tmp_path / "s"), show_progress=False
    )
    assert r.backbone.kind == "causal"
    _memorise(r, train_mode="decoder_late")
    out = r.explain(DOCS[0]["text"], "photo")
    assert out["final_rank"] == 1 and len(out["layers"]) == 31  # embeddings + 30 layers
