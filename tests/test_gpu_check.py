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


def test_gpu_check_without_cuda_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        return
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 2 and "no CUDA device" in run.stdout
