"""The T5Gemma2 built from Gemma 3 (`models.t5gemma2`): weights land where they belong, the causal
encoder is Gemma 3 itself, memory adapters reproduce Gemma 3's per-layer keys and persist safely.
Reverse-QWK equivalence and generation from stored states for this build run in
test_intra_qwk.py and test_intra_retriever.py (arch ``t5gemma2-gemma3``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.intra import gemma3, gemma3_adapter, save_gemma3
from support.tokenizer import tiny_tokenizer

from intrinsic_retrieval.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelMismatchError,
    UnsupportedArchitectureError,
)
from intrinsic_retrieval.models import model_fingerprint
from intrinsic_retrieval.models.t5gemma2 import (
    build_t5gemma2,
    encode,
    fit_memory_adapters,
    load_from_gemma3,
    load_memory_adapters,
    save_memory_adapters,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1000, 2000, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask


def test_causal_encoder_is_gemma3_and_bidirectional_differs() -> None:
    causal = gemma3()
    ids, mask = _ids()
    with torch.no_grad():
        want = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = encode(build_t5gemma2(causal, encoder="causal"), ids, mask)
        bi = encode(build_t5gemma2(causal, encoder="bidirectional"), ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bi[valid], want[valid], atol=1e-3)


def test_decoder_without_memory_is_gemma3() -> None:
    """With a fully masked memory the merged attention is Gemma 3's self-attention: the decoder
    (weights copied, embeddings tied to the LM head) gives Gemma 3's own logits."""
    from transformers.modeling_outputs import BaseModelOutput

    causal = gemma3()
    model = build_t5gemma2(causal)
    ids, _ = _ids()
    with torch.no_grad():
        want = causal(input_ids=ids).logits
        mem = torch.randn(2, 1, 32)
        got = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=mem),
            attention_mask=torch.zeros(2, 1, dtype=torch.long),
            decoder_input_ids=ids,
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fitted_adapters_reproduce_gemma3_keys_better_than_identity() -> None:
    causal = gemma3()
    tok = tiny_tokenizer()
    texts = [f"note {i}: the {i % 7} river fish eat {i % 3} plants daily" for i in range(48)]
    model = build_t5gemma2(causal)
    stats = fit_memory_adapters(model, tok, texts, show_progress=False)
    assert stats["tokens"] > 0 and len(stats["r2"]) == 3
    assert all(0.0 < r <= 1.0 for r in stats["r2"])
    enc = tok(["the river fish eat plants"], return_tensors="pt")
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.input_layernorm.register_forward_hook(
            lambda _m, _a, out, i=i: inputs.setdefault(i, out)
        )
        for i, layer in enumerate(causal.model.layers)
    ]
    with torch.no_grad():
        causal(**enc)
        e = encode(model, enc["input_ids"], enc["attention_mask"])
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.get_decoder().layers):
        attn = layer.self_attn

        def keys(x: torch.Tensor, attn=attn) -> torch.Tensor:
            return attn.k_norm(attn.k_proj(x).view(1, -1, 2, 8))

        with torch.no_grad():
            want = keys(inputs[i])  # Gemma 3's own key of each token at layer i, before RoPE
            err_fit = (keys(attn.memory_proj(e)) - want).pow(2).mean()
            err_id = (keys(e) - want).pow(2).mean()
        assert err_fit < err_id, (i, float(err_fit), float(err_id))


def test_adapters_round_trip_and_refuse_another_base(tmp_path: Path) -> None:
    causal = gemma3()
    model = build_t5gemma2(causal)
    fit_memory_adapters(model, tiny_tokenizer(), ["a b c d e", "f g h i"], show_progress=False)
    path = tmp_path / "ad.safetensors"
    save_memory_adapters(model, path, {"base": model_fingerprint(causal), "encoder": "causal"})
    again = build_t5gemma2(causal)
    info = load_memory_adapters(again, path, base=model_fingerprint(causal))
    assert info["encoder"] == "causal"
    assert model_fingerprint(again) == model_fingerprint(model)
    assert model_fingerprint(again) != model_fingerprint(build_t5gemma2(causal))
    other = gemma3(seed=1)
    with pytest.raises(ModelMismatchError):
        load_memory_adapters(build_t5gemma2(other), path, base=model_fingerprint(other))
    path.write_bytes(b"not safetensors")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        load_memory_adapters(again, path)


def test_load_from_gemma3_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRINSIC_RETRIEVAL_MODELS", str(tmp_path / "models"))
    src = save_gemma3(tmp_path)
    naive, _ = load_from_gemma3(src, adapter="none")
    for layer in naive.get_decoder().layers:
        torch.testing.assert_close(layer.self_attn.memory_proj.weight, torch.eye(32))
    fitted, _ = load_from_gemma3(src, adapter=gemma3_adapter(tmp_path))
    assert model_fingerprint(fitted) != model_fingerprint(naive)
    with pytest.raises(ModelMismatchError):  # fitted for a causal encoder
        load_from_gemma3(src, encoder="bidirectional", adapter=gemma3_adapter(tmp_path))
    with pytest.raises(InvalidInputError):
        load_from_gemma3(src, adapter=str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidInputError):
        build_t5gemma2(gemma3(), encoder="sideways")


def test_generated_adapters_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRINSIC_RETRIEVAL_MODELS", str(tmp_path / "models"))
    import intrinsic_retrieval.models.t5gemma2 as tg

    calls = []
    real = tg.generated_texts

    def few(causal, tok, **kw):
        calls.append(1)
        return real(causal, tok, n=4, length=8, show_progress=False)

    monkeypatch.setattr(tg, "generated_texts", few)
    src = save_gemma3(tmp_path)
    a, _ = load_from_gemma3(src, adapter="generated", show_progress=False)
    b, _ = load_from_gemma3(src, adapter="generated", show_progress=False)
    assert len(calls) == 1
    assert model_fingerprint(a) == model_fingerprint(b)
    assert list((tmp_path / "models" / "gemma3" / ".adapters").glob("*.safetensors"))


def test_not_gemma3_and_missing_checkpoint_are_typed_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support.intra import build

    with pytest.raises(UnsupportedArchitectureError):
        build_t5gemma2(build("t5"))
    monkeypatch.setenv("INTRINSIC_RETRIEVAL_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("INTRINSIC_RETRIEVAL_GEMMA3_GGUF", str(tmp_path / "none"))
    import intrinsic_retrieval.models.loading as loading

    monkeypatch.setattr(loading, "_REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="make models"):
        load_from_gemma3("gemma-3-270m")
