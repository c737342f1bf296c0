"""The examples run end to end, offline, as a user would run them (each in its own process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(name: str, *args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _ran(out: str, retriever: str) -> bool:
    return f"== {retriever}:" in out and f"== {retriever}: skipped" not in out


#: the default suite runs the examples with the baselines only: INTRA's default backbone (Gemma 3
#: 270M) takes minutes to set up on a fresh machine; `test_examples_with_intra` (slow) runs it
FAST = ("--retriever", "bm25", "--retriever", "dense")


def test_langchain_chain():
    out = _run("langchain_chain.py", *FAST)
    assert _ran(out, "bm25") and _ran(out, "dense")
    assert "#1 photosynthesis#0" in out
    assert "A: (fake LLM)" in out
    assert "-> top insulin" in out and "-> top jupiter" in out


def test_llamaindex_query_engine():
    out = _run("llamaindex_query_engine.py", *FAST)
    assert _ran(out, "bm25") and _ran(out, "dense")
    assert "#1 insulin#0" in out
    assert "filtered (async): ['insulin', 'antibiotics']" in out


def test_persist_and_reload():
    out = _run("persist_and_reload.py", *FAST)
    for key in ("bm25/langchain", "bm25/llamaindex", "dense/langchain", "dense/llamaindex"):
        assert f"{key}" in out
    assert "DIFFERENT" not in out
    assert out.count("identical ranked ids and scores") >= 4


@pytest.mark.slow
def test_examples_with_intra():
    """The examples as a user runs them, INTRA on the default Gemma 3 backbone included."""
    out = _run("langchain_chain.py")
    assert _ran(out, "intra")
    out = _run("llamaindex_query_engine.py")
    assert _ran(out, "intra")
    out = _run("persist_and_reload.py")
    assert "intra/langchain" in out and "DIFFERENT" not in out
