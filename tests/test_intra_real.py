"""INTRA on the real default backbone: T5Gemma2 built from the packaged Gemma 3 270M (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from intrinsic_retrieval.errors import ModelMismatchError
from intrinsic_retrieval.retrievers.intra import DEFAULT_MODEL, IntraRetriever, default_model

DOCS = [
    {"id": "photo", "text": "Photosynthesis converts light energy into chemical energy in plants."},
    {"id": "insulin", "text": "Insulin is a hormone that lowers blood glucose after a meal."},
    {"id": "volcano", "text": "Volcanic eruptions release ash and sulfur dioxide into the air."},
    {"id": "jupiter", "text": "Jupiter is the largest planet in the solar system."},
]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory):
    from intrinsic_retrieval.models import gemma3_gguf_path

    if gemma3_gguf_path() is None:
        pytest.skip("Gemma 3 270M GGUF not found (run `make models`)")
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("intra-gemma")
    r = IntraRetriever(path=root / "idx", query_positions="query+retrieval", show_progress=False)
    r.add(DOCS)
    return r


@pytest.mark.slow
def test_default_is_gemma3_and_indexes(gemma: IntraRetriever) -> None:
    assert default_model() == DEFAULT_MODEL == gemma.model_name
    assert type(gemma.model).__name__ == "T5Gemma2ForConditionalGeneration"
    assert len(gemma) == len(DOCS)
    hits = gemma.search("Which hormone controls blood sugar?", k=4)
    assert sorted(h.document_id for h in hits) == sorted(d["id"] for d in DOCS)


@pytest.mark.slow
def test_answer_from_stored_states_equals_reencoding(gemma: IntraRetriever) -> None:
    q = "Which hormone controls blood sugar?"
    stored = gemma.answer(q, k=2, max_new_tokens=12, return_logits=True)
    fresh = gemma.answer(q, k=2, max_new_tokens=12, return_logits=True, reencode=True)
    assert stored.token_ids == fresh.token_ids
    # float16 stored states vs float32 fresh ones: logits agree to rounding (measured 2e-3)
    assert float((stored.logits - fresh.logits).abs().max()) < 2e-2
    assert stored.text.strip()


@pytest.mark.slow
def test_store_refuses_the_naive_build(gemma: IntraRetriever, tmp_path: Path) -> None:
    with pytest.raises(ModelMismatchError):
        IntraRetriever(path=gemma.path, memory_adapter="none", show_progress=False)
