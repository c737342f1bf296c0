"""The training loop that *is* indexing for generative retrieval.

Built on `accelerate` (device placement, backward). Checkpoints are safetensors + JSON, no pickle:
``step-XXXXXXXX/model.safetensors`` (every weight, plus the atomic docid head),
``optimizer.safetensors`` (AdamW moment tensors) and ``state.json`` (step, scalars of the
optimizer, early-stopping state, and fingerprints of the corpus, docid map and example config).
Resuming replays the same example order and dropout seeds, so an interrupted run resumed from a
checkpoint ends with the same weights as an uninterrupted one. Early stopping evaluates Recall@1 on
held-out queries and restores the best weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ...errors import CheckpointMismatchError, InvalidInputError
from .examples import INPUT_KINDS, Example

STATE_VERSION = 1


@dataclass
class TrainConfig:
    """How `GenerativeDocidRetriever.fit` builds examples and trains.

    Fields marked (*) define the run: a checkpoint made with other values cannot be resumed.
    """

    inputs: tuple[str, ...] = ("firstp", "daq", "labeled", "synthetic")  # (*)
    span_tokens: int = 64  # (*) FirstP / DaQ window
    daq_spans: int = 10  # (*) DaQ windows per document
    synthetic_per_doc: int = 3  # (*)
    index_retrieval_ratio: float | None = None  # (*) indexing examples per retrieval example
    replay_ratio: float = 1.0  # (*) old-document examples per new-document example (add + fit)
    batch_size: int = 16  # (*)
    lr: float = 5e-4  # (*)
    weight_decay: float = 0.01  # (*)
    warmup_steps: int = 100  # (*)
    seed: int = 0  # (*)
    train_mode: str = "all"  # (*) "all" | "decoder" | "decoder_late"
    max_input_length: int = 64  # (*)
    heldout_fraction: float = 0.1  # (*) of query examples, for early stopping
    cache_encoder: bool = True  # reuse encoder states when the encoder is frozen (seq2seq)
    epochs: float = 3.0
    max_steps: int | None = None
    time_limit_s: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    eval_every: int | None = 200
    patience: int | None = 3
    grad_clip: float = 1.0
    show_progress: bool = True

    _RUN_FIELDS = (
        "inputs", "span_tokens", "daq_spans", "synthetic_per_doc", "index_retrieval_ratio",
        "replay_ratio", "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "train_mode",
        "max_input_length", "heldout_fraction",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        bad = [k for k in self.inputs if k not in INPUT_KINDS]
        if bad or not self.inputs:
            raise InvalidInputError(
                f"inputs must be a non-empty subset of {INPUT_KINDS}, got {self.inputs}"
            )
        if self.batch_size < 1 or self.lr <= 0 or self.epochs <= 0:
            raise InvalidInputError("batch_size, lr and epochs must be positive")

    def run_hash(self) -> str:
        d = {k: getattr(self, k) for k in self._RUN_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = list(self.inputs)
        return d


@dataclass
class TrainReport:
    """What a `fit` did; ``examples_per_s`` counts training examples (not tokens)."""

    steps: int = 0
    examples_seen: int = 0
    seconds: float = 0.0
    examples_per_s: float = 0.0
    num_examples: int = 0
    example_kinds: dict[str, int] = field(default_factory=dict)
    num_heldout: int = 0
    best_recall_at_1: float | None = None
    best_step: int | None = None
    stopped: str = "completed"  # completed | max_steps | time_limit | early_stop
    resumed_from_step: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- checkpoints
def _state_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in modules.items():
        for k, v in mod.state_dict().items():
            out[f"{prefix}.{k}"] = v.detach().to("cpu").clone().contiguous()
    return out


def _load_state(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for prefix, mod in modules.items():
        own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        mod.load_state_dict(own, strict=True)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
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
    save_file(_state_tensors(modules), tmp / "model.safetensors")
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


# ---------------------------------------------------------------------- the loop
def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train(
    modules: dict[str, nn.Module],
    loss_fn: Callable[[Sequence[Example]], torch.Tensor],
    examples: Sequence[Example],
    heldout: Sequence[Example],
    config: TrainConfig,
    *,
    evaluate: Callable[[Sequence[Example]], float] | None,
    fingerprints: dict[str, str],
    report: TrainReport,
) -> TrainReport:
    """Train every parameter of `modules` that requires grad on `examples`.

    `fingerprints` (corpus, docids, model, run) are written into checkpoints; resuming from a
    checkpoint whose fingerprints differ raises `CheckpointMismatchError`.
    """
    from accelerate import Accelerator

    if not examples:
        raise InvalidInputError("no training examples (check TrainConfig.inputs)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise InvalidInputError("no trainable parameters (check TrainConfig.train_mode)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    opt = accelerator.prepare_optimizer(opt)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = math.ceil(steps_per_epoch * config.epochs)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    step, best, best_step, bad_evals = 0, -1.0, None, 0
    best_state: dict[str, torch.Tensor] | None = None

    if ckpt_dir is not None and config.resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        state = json.loads((last / "state.json").read_text())
        for key, fp in fingerprints.items():
            if state.get("fingerprints", {}).get(key) != fp:
                raise CheckpointMismatchError(
                    f"checkpoint {last} was made for a different {key} "
                    f"({str(state.get('fingerprints', {}).get(key))[:12]}… != {fp[:12]}…); "
                    "use another checkpoint_dir or resume=False"
                )
        _load_state(modules, load_file(last / "model.safetensors"))
        opt.load_state_dict(
            _optimizer_from(load_file(last / "optimizer.safetensors"), state["optimizer"])
        )
        step, best, bad_evals = int(state["step"]), float(state["best"]), int(state["bad_evals"])
        best_step = state.get("best_step")
        report.history = list(state.get("history", []))
        report.resumed_from_step = step
        if (ckpt_dir / "best.safetensors").exists():
            best_state = load_file(ckpt_dir / "best.safetensors")

    def checkpoint() -> None:
        if ckpt_dir is None:
            return
        state = {
            "step": step, "best": best, "best_step": best_step, "bad_evals": bad_evals,
            "history": report.history, "fingerprints": fingerprints, "config": config.to_json(),
        }  # fmt: skip
        save_checkpoint(ckpt_dir, step, modules, opt, state, config.keep_checkpoints)

    orders: dict[int, list[list[int]]] = {}
    for m in modules.values():
        m.train()
    t0 = time.perf_counter()
    seen = 0
    stopped = "completed"
    bar = tqdm(
        total=total,
        initial=step,
        desc="training (generative)",
        unit="step",
        disable=not config.show_progress,
    )
    try:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders.clear()
                orders[epoch] = _batches(len(examples), config.batch_size, config.seed, epoch)
            batch_idx = orders[epoch][pos]
            batch = [examples[i] for i in batch_idx]
            lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            torch.manual_seed(config.seed * 1_000_003 + step)  # reproducible dropout on resume
            loss = loss_fn(batch)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(batch)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}", ex_s=f"{seen / (time.perf_counter() - t0):.1f}"
            )
            if (
                evaluate is not None
                and heldout
                and config.eval_every
                and step % config.eval_every == 0
            ):
                for m in modules.values():
                    m.eval()
                r1 = float(evaluate(heldout))
                for m in modules.values():
                    m.train()
                report.history.append(
                    {"step": step, "loss": float(loss.item()), "heldout_recall@1": r1}
                )
                if r1 > best:
                    best, best_step, bad_evals = r1, step, 0
                    best_state = _state_tensors(modules)
                    if ckpt_dir is not None:
                        ckpt_dir.mkdir(parents=True, exist_ok=True)
                        save_file(best_state, ckpt_dir / "best.safetensors")
                else:
                    bad_evals += 1
                if config.patience is not None and bad_evals >= config.patience:
                    stopped = "early_stop"
                    checkpoint()
                    break
            if ckpt_dir is not None and step % config.checkpoint_every == 0:
                checkpoint()
            if config.time_limit_s is not None and time.perf_counter() - t0 >= config.time_limit_s:
                stopped = "time_limit"
                checkpoint()
                break
        else:
            if config.max_steps is not None and total == config.max_steps:
                stopped = "max_steps"
            checkpoint()
    finally:
        bar.close()
    if evaluate is not None and heldout and stopped != "early_stop":
        for m in modules.values():
            m.eval()
        r1 = float(evaluate(heldout))
        report.history.append({"step": step, "heldout_recall@1": r1})
        if r1 > best:
            best, best_step, best_state = r1, step, None
    if best_state is not None and best_step != step:
        _load_state(modules, best_state)  # restore the best weights seen
    for m in modules.values():
        m.eval()
    elapsed = time.perf_counter() - t0
    report.steps = step
    report.examples_seen += seen
    report.seconds += elapsed
    report.examples_per_s = seen / elapsed if elapsed > 0 else 0.0
    report.best_recall_at_1 = None if best < 0 else best
    report.best_step = best_step
    report.stopped = stopped
    return report
