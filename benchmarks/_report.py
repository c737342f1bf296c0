"""The head every benchmark result starts with, and how results are written.

A result records the command that reproduces it and the machine it ran on, with the load average
at the end of the run (these machines are shared: a busy one makes timings pessimistic).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any


def result_head(script: str, name: str, title: str) -> dict[str, Any]:
    """name, title, the reproducing command (this run's arguments) and the machine."""
    from intrinsic_retrieval.cli import machine_info

    command = f"python benchmarks/{Path(script).name} " + shlex.join(sys.argv[1:])
    return {
        "name": name,
        "title": title,
        "command": command.strip(),
        "machine": {**machine_info(), "load_average_1_5_15_at_end": os.getloadavg()},
    }


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write `result` as JSON atomically (temp file + rename): a killed run leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(result, indent=2))
        from intrinsic_retrieval.store.shards import user_mode

        user_mode(tmp)  # mkstemp makes it 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
