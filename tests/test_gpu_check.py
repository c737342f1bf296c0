"""`make gpu-check`'s script runs every comparison CPU against CPU at small sizes, so it cannot
rot on machines without a GPU (CI has none), and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_self_check_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--device",
            "cpu",
            "--small",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu"
    checks = {r["check"]: r["ok"] for r in result["rows"]}
    assert any(c.startswith("maxsim") for c in checks)
    assert any("flex" in c for c in checks) and any("bfloat16" in c for c in checks)
    assert all(ok in (True, None) for ok in checks.values())
    assert any("no per-document masses" in c and ok for c, ok in checks.items())
    timed = [r for r in result["rows"] if "device ms" in r]
    assert timed and all(r["first_call_ms"] > 0 for r in timed)  # the warm-up (compile) call
    (table,) = result["tables"]  # what render.py puts in docs/benchmarks.md
    assert len(table["rows"]) == len(result["rows"]) and table["columns"][:2] == ["check", "ok"]
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert set().union(*result["rows"]) == set(table["columns"])


def test_gpu_check_without_cuda_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 2 and "no CUDA device" in run.stdout


def test_a_check_past_its_time_limit_is_recorded_and_the_next_runs() -> None:
    """A compile that never finishes must not cost the rows already measured (the first H200
    run lost every figure that way)."""
    import argparse
    import time

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    def check_slow(rows: list, dev: torch.device, small: bool) -> None:
        """A compile that never ends."""
        time.sleep(30)

    def quick(rows: list, dev: torch.device, small: bool) -> None:
        rows.append({"check": "quick", "ok": True})

    rows: list = []
    args = argparse.Namespace(check_seconds=1, small=True)
    started = time.perf_counter()
    for check in (check_slow, quick):
        gpu_check._run_bounded(check, rows, torch.device("cpu"), args)
    assert time.perf_counter() - started < 10
    assert rows == [
        {
            "check": "slow: A compile that never ends.",
            "ok": False,
            "error": "did not finish within 1 s",
        },  # named like a finished check's row
        {"check": "quick", "ok": True},
    ]
