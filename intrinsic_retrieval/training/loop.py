"""`train`: the loop behind every `fit` in the library.

Built on `accelerate` (device placement, backward). AdamW over the parameters that require grad
(weight decay on matrices only), linear warm-up, optional gradient clipping, a progress bar, a
time budget, early stopping on held-out Recall@1 (restoring the best weights), and checkpoints
(`checkpoint`) from which an interrupted run resumes and ends with the same weights as an
uninterrupted one: the example order of each epoch and the random seed of each step depend only
on the run's seed, the epoch and the step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import InvalidInputError
from ..store.shards import write_safetensors
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
    trainable_state,
)
from .config import FitConfig
from .report import FitReport

E = TypeVar("E")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each step of one epoch (a seeded shuffle)."""
    order = list(range(n))
    random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def step_seed(seed: int, step: int) -> int:
    """The seed a step's randomness (dropout, sampled negatives) is drawn from."""
    return seed * 1_000_003 + step


def train(
    modules: dict[str, nn.Module],
    loss_fn: Callable[[Sequence[E], int], torch.Tensor],
    examples: Sequence[E],
    config: FitConfig,
    *,
    fingerprints: dict[str, str],
    report: FitReport,
    heldout: Sequence[E] = (),
    evaluate: Callable[[Sequence[E]], float] | None = None,
    desc: str = "training",
) -> FitReport:
    """Train every parameter of `modules` that requires grad; ``loss_fn(batch, step)`` returns
    the batch's mean loss. `fingerprints` (corpus, model, data, run...) are written into every
    checkpoint, and resuming from a checkpoint whose fingerprints differ raises
    `CheckpointMismatchError`. Modules are left in eval mode."""
    from accelerate import Accelerator

    if not examples:
        raise InvalidInputError("no training examples")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise InvalidInputError("no trainable parameters")
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    opt = accelerator.prepare_optimizer(opt)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    full = math.ceil(steps_per_epoch * config.epochs)
    total = full if config.max_steps is None else min(full, config.max_steps)
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    step, best, best_step, bad_evals = 0, -1.0, None, 0
    best_state: dict[str, torch.Tensor] | None = None
    losses: list[float] = []

    if ckpt_dir is not None and config.resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        state = load_checkpoint(last, modules, opt, fingerprints)
        step, best, bad_evals = int(state["step"]), float(state["best"]), int(state["bad_evals"])
        best_step = state.get("best_step")
        losses = list(state.get("losses", []))
        report.history = list(state.get("history", []))
        report.resumed_from_step = step
        if (ckpt_dir / "best.safetensors").exists():
            best_state = load_file(ckpt_dir / "best.safetensors")

    def checkpoint() -> None:
        if ckpt_dir is None:
            return
        state = {
            "step": step, "best": best, "best_step": best_step, "bad_evals": bad_evals,
            "losses": losses, "history": report.history, "fingerprints": fingerprints,
            "config": config.to_json(),
        }  # fmt: skip
        save_checkpoint(ckpt_dir, step, modules, opt, state, config.keep_checkpoints)

    def set_mode(training: bool) -> None:
        for m in modules.values():
            m.train(training)

    orders: dict[int, list[list[int]]] = {}
    set_mode(True)
    t0 = time.perf_counter()
    seen = 0
    stopped = "completed"
    bar = tqdm(total=total, initial=min(step, total), desc=desc, unit="step",
               disable=not config.show_progress)  # fmt: skip
    try:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {
                    epoch: epoch_batches(len(examples), config.batch_size, config.seed, epoch)
                }
            batch = [examples[i] for i in orders[epoch][pos]]
            lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            torch.manual_seed(step_seed(config.seed, step))  # reproducible dropout on resume
            loss = loss_fn(batch, step)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(batch)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}", ex_s=f"{seen / (time.perf_counter() - t0):.1f}"
            )
            if (
                evaluate is not None
                and heldout
                and config.eval_every
                and step % config.eval_every == 0
            ):
                set_mode(False)
                r1 = float(evaluate(heldout))
                set_mode(True)
                report.history.append({"step": step, "loss": losses[-1], "heldout_recall@1": r1})
                if r1 > best:
                    best, best_step, bad_evals = r1, step, 0
                    best_state = trainable_state(modules)
                    if ckpt_dir is not None:
                        write_safetensors(ckpt_dir / "best.safetensors", best_state)
                else:
                    bad_evals += 1
                if config.patience is not None and bad_evals >= config.patience:
                    stopped = "early_stop"
                    checkpoint()
                    break
            if step % config.checkpoint_every == 0:
                checkpoint()
            if config.time_limit_s is not None and time.perf_counter() - t0 >= config.time_limit_s:
                stopped = "time_limit"
                checkpoint()
                break
        else:
            if step < full:
                stopped = "max_steps"
            checkpoint()
    finally:
        bar.close()
    set_mode(False)
    if evaluate is not None and heldout and stopped != "early_stop":
        r1 = float(evaluate(heldout))
        report.history.append({"step": step, "heldout_recall@1": r1})
        if r1 > best:
            best, best_step, best_state = r1, step, None
    if best_state is not None and best_step != step:
        load_trainable_state(modules, best_state, ckpt_dir or Path("."))  # the best weights seen
    elapsed = time.perf_counter() - t0
    report.steps = step
    report.total_steps = full
    report.losses = losses
    report.examples_seen += seen
    report.seconds += elapsed
    report.examples_per_s = seen / elapsed if elapsed > 0 else 0.0
    report.best_recall_at_1 = None if best < 0 else best
    report.best_step = best_step
    report.stopped = stopped
    return report


def parameter_counts(modules: dict[str, nn.Module]) -> dict[str, int]:
    params = [p for m in modules.values() for p in m.parameters()]
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }
