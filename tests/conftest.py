"""Shared fixtures: paths to the real data and shipped models, skipped cleanly when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = Path(os.environ.get("INTRINSIC_RETRIEVAL_SCIFACT", ROOT.parent / "shared/data/scifact"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def scifact_path() -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    return SCIFACT


@pytest.fixture(scope="session")
def scifact(scifact_path: Path):
    from intrinsic_retrieval.eval import load_beir

    return load_beir(scifact_path, split="test")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    try:
        from intrinsic_retrieval.models import default_dense_model_path

        return str(default_dense_model_path())
    except Exception as exc:  # the package is an optional extra
        pytest.skip(f"all-MiniLM-L6-v2 package not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from intrinsic_retrieval.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found (run `make models`)")
    return Path(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread (two spin for ~10 ms per op on a loaded 2-core box).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
