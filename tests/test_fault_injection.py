"""The reliability probe kept as tests: `intrinsic-retrieval index` killed with SIGKILL at random
points, then checked and resumed. What must hold after every kill: a read-only `info --verify`
passes (or the store does not exist yet), no committed row is lost, and resuming ends with
exactly one live chunk per document and no duplicate."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "intrinsic_retrieval.cli", *args]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


@pytest.mark.slow
def test_index_killed_at_random_points_loses_nothing_and_resumes(tmp_path: Path) -> None:
    n = 40000
    corpus = tmp_path / "corpus.jsonl"
    words = ["tide", "moon", "ice", "river", "gene", "cell", "solar", "panel", "storm", "rock"]
    rng = random.Random(0)
    with corpus.open("w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(30))
            fh.write(json.dumps({"_id": f"d{i}", "text": text}) + "\n")
    store = tmp_path / "store"
    index = _cli("index", str(corpus), "--store", str(store), "--retriever", "bm25",
                 "--option", "index_batch_size=64")  # fmt: skip
    committed = 0
    interrupted = 0  # kills that landed while indexing was still under way
    deadline = time.monotonic() + 240  # bounded in time
    for _ in range(6):
        if time.monotonic() > deadline:
            break
        proc = subprocess.Popen(index, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(1.0, 4.0))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if not (store / "manifest.json").exists():
            continue
        info = subprocess.run(_cli("info", "--store", str(store), "--verify"), env=_env(),
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert info.returncode == 0, info.stderr
        from intrinsic_retrieval.store import EncodedChunkStore

        s = EncodedChunkStore.open(store, read_only=True)
        live = int(s.live_mask().sum())
        s.close()
        assert live >= committed  # nothing committed is ever lost
        committed = live
        interrupted += killed and live < n
    assert interrupted >= 1, "no kill landed mid-index: the probe tested nothing"
    done = subprocess.run(index, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from intrinsic_retrieval.store import EncodedChunkStore

    s = EncodedChunkStore.open(store, read_only=True)
    ids = [c.document_id for _, c in s.iter_chunks()]
    s.verify()
    s.close()
    assert len(ids) == n and len(set(ids)) == n  # exactly the full count, no duplicate
