"""Training checkpoints: safetensors + JSON, no pickle, written atomically.

``step-XXXXXXXX/`` holds ``model.safetensors`` (the parameters being trained, under
``<module>.<name>``; frozen weights never change, so they are not copied), ``optimizer.safetensors``
(the optimizer's moment tensors) and ``state.json`` (step, losses, the optimizer's scalars,
early-stopping state and the fingerprints that make a checkpoint belong to one run). A temporary
directory is renamed into place last, so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointMismatchError

STATE_VERSION = 2


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Copies of every parameter that requires grad, keyed ``<module>.<name>``."""
    return {
        f"{prefix}.{name}": p.detach().to("cpu").clone().contiguous()
        for prefix, mod in modules.items()
        for name, p in mod.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(
    modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], where: Path
) -> None:
    """Copy `tensors` back into the trainable parameters; a different set of names is refused."""
    params = {
        f"{prefix}.{name}": p
        for prefix, mod in modules.items()
        for name, p in mod.named_parameters()
        if p.requires_grad
    }
    if set(params) != set(tensors):
        raise CheckpointMismatchError(
            f"checkpoint {where} trains other parameters than this run "
            f"({len(tensors)} saved, {len(params)} here); use another checkpoint_dir or "
            "resume=False"
        )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key].to(p.device, p.dtype))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": scalars["param_groups"]}


def latest_checkpoint(directory: str | Path) -> Path | None:
    d = Path(directory)
    steps = sorted(p for p in d.glob("step-*") if (p / "state.json").exists()) if d.exists() else []
    return steps[-1] if steps else None


def save_checkpoint(
    directory: Path,
    step: int,
    modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-XXXXXXXX/`` atomically (temp dir renamed last) and prune old ones."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(modules), tmp / "model.safetensors")
    otensors, oscalars = _optimizer_tensors(opt)
    save_file(otensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(
        json.dumps({**state, "optimizer": oscalars, "version": STATE_VERSION}, indent=1)
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(directory.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path,
    modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    fingerprints: dict[str, str],
) -> dict[str, Any]:
    """Restore parameters and optimizer from `path`; returns its state. A checkpoint of another
    run (any fingerprint differs) raises `CheckpointMismatchError` and changes nothing."""
    state = json.loads((path / "state.json").read_text())
    saved = state.get("fingerprints", {})
    for key, fp in fingerprints.items():
        if saved.get(key) != fp:
            raise CheckpointMismatchError(
                f"checkpoint {path} was made for a different {key} "
                f"({str(saved.get(key))[:12]}… != {fp[:12]}…); use another checkpoint_dir or "
                "resume=False"
            )
    load_trainable_state(modules, load_file(path / "model.safetensors"), path)
    opt.load_state_dict(
        _optimizer_state(load_file(path / "optimizer.safetensors"), state["optimizer"])
    )
    return state
