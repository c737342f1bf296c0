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


def _slow_writer(gguf_path: Path, into: Path) -> None:
    """Stands in for transformers' dequantisation: slow enough for two processes to overlap;
    records each call."""
    import os
    import time

    with open(gguf_path.parent / "calls.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (into / "model.safetensors").write_bytes(b"weights")
    (into / "config.json").write_text("{}")


def _copy_in_child(gguf: str, out: str) -> None:
    from intrinsic_retrieval.models import loading

    loading._write_dequantised = _slow_writer  # the forked child keeps the test's stand-in
    Path(out).write_text(str(loading.dequantised_copy(Path(gguf))))


def test_dequantised_copy_two_processes_make_one_copy(tmp_path: Path) -> None:
    """Two processes asking for the same GGUF's copy at once: one dequantises, the other waits
    and maps the same folder; no temporary folder is left and the key is the file's sha256."""
    import hashlib
    import multiprocessing as mp

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(200)))
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_copy_in_child, args=(str(gguf), str(tmp_path / f"out{i}")))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outs = {(tmp_path / f"out{i}").read_text() for i in range(2)}
    assert len(outs) == 1
    folder = Path(outs.pop())
    assert (folder / "config.json").is_file()
    assert folder.name.endswith(hashlib.sha256(gguf.read_bytes()).hexdigest()[:16])
    assert len((tmp_path / "calls.log").read_text().split()) == 1
    leftovers = [p for p in folder.parent.iterdir() if p.name.startswith(".m-")]
    assert leftovers == []
