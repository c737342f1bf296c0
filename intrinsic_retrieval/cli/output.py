"""What the command line prints: tables, hits, and the machine a figure was measured on."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from typing import Any


def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on; every benchmark records it."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_results(path: str, payload: dict[str, Any], results: Sequence[Any]) -> None:
    """Write a results JSON the way every benchmark does: `payload` plus the reproducing
    command, the machine and each result's record."""
    import json
    import sys
    from pathlib import Path

    full = {
        **payload,
        "command": " ".join(["intrinsic-retrieval", *sys.argv[1:]]),
        "machine": machine_info(),
        "results": [r.to_dict() for r in results],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(full, indent=2))
    print(f"wrote {path}")


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join(
        [line, sep, *("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body)]
    )


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def print_hits(query: str, hits: Sequence[Any], width: int = 100) -> None:
    print(f"\nquery: {query}")
    for h in hits:
        snippet = " ".join(h.text.split())[:width]
        print(f"  {h.rank:>2}. {h.score:8.4f}  {h.document_id}  {snippet}")
