"""Framework-neutral adapter plumbing: model locks, retriever resolution, adapter settings files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.frameworks import ListRetriever

from intrinsic_retrieval import (
    InvalidInputError,
    StoreCorruptedError,
    StoreNotFoundError,
    create_retriever,
)
from intrinsic_retrieval.adapters import (
    arun_locked,
    load_with_config,
    model_lock,
    read_config,
    resolve_retriever,
    run_locked,
    save_with_config,
)


def test_model_lock_choices():
    bm25 = create_retriever("bm25", show_progress=False)
    assert model_lock(bm25) is bm25.lock
    assert isinstance(model_lock(ListRetriever(lock=None)), contextlib.nullcontext)
    plain = ListRetriever()
    assert model_lock(plain) is model_lock(plain)  # one lock per object...
    assert model_lock(plain) is not model_lock(ListRetriever())  # ...not one for all


def test_run_locked_holds_the_lock_in_the_worker_thread():
    model = ListRetriever(lock=threading.RLock())
    seen: list[str] = []

    def work() -> bool:
        seen.append(threading.current_thread().name)
        return model.lock._is_owned()  # type: ignore[attr-defined]

    assert run_locked(model, work) is True
    assert asyncio.run(arun_locked(model, work)) is True
    assert seen[1].startswith("intrinsic-retrieval") and seen[1] != seen[0]


def test_resolve_retriever():
    r = ListRetriever()
    assert resolve_retriever(r) is r
    assert type(resolve_retriever("bm25", {"show_progress": False})).__name__ == "BM25Retriever"
    with pytest.raises(InvalidInputError, match="retriever_kwargs"):
        resolve_retriever(r, {"k1": 1.0})
    with pytest.raises(InvalidInputError, match="expected an intrinsic_retrieval Retriever"):
        resolve_retriever(42)


def test_settings_file_round_trip_and_errors(tmp_path):
    r = create_retriever("bm25", show_progress=False)
    r.add(["alpha beta", "gamma delta"])
    save_with_config(r, tmp_path / "s", "x.json", {"k": 3})
    again, config = load_with_config(tmp_path / "s", "x.json", {"show_progress": False})
    assert config == {"k": 3} and len(again) == 2
    assert load_with_config(tmp_path / "s", "missing.json")[1] == {}  # a bare index loads
    with pytest.raises(InvalidInputError, match="JSON"):
        save_with_config(r, tmp_path / "t", "x.json", {"k": object()})
    (tmp_path / "s" / "x.json").write_text("{not json")
    with pytest.raises(StoreCorruptedError, match=r"x\.json"):
        read_config(tmp_path / "s", "x.json")
    (tmp_path / "s" / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(StoreCorruptedError):
        read_config(tmp_path / "s", "x.json")
    with pytest.raises(StoreNotFoundError):
        load_with_config(tmp_path / "nothing", "x.json")


_FORK_CHECK = """
import asyncio, os
from intrinsic_retrieval.adapters import arun_locked
assert asyncio.run(arun_locked(object(), lambda: 1)) == 1
pid = os.fork()
if pid == 0:  # the inherited pool has no threads: a fresh one must be made
    os._exit(0 if asyncio.run(arun_locked(object(), lambda: 2)) == 2 else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_worker_pool_survives_fork():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _FORK_CHECK], cwd=root, timeout=120)
    assert proc.returncode == 0
