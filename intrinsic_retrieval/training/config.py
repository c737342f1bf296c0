"""`FitConfig`: the loop settings every retriever's `fit` shares, validated once.

Each retriever subclasses it with its own fields and defaults (`IntraFitConfig`,
`InContextFitConfig`, `GenerativeFitConfig`). Fields made with `run_field` define a run: a
checkpoint made with other values is refused instead of resumed; the rest (how long to run, where
to checkpoint, progress) can change between an interrupted run and its resumption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Self

from ..errors import InvalidInputError


def run_field(default: Any) -> Any:
    """A dataclass field that is part of the run's identity (checked on resume)."""
    return field(default=default, metadata={"run": True})


@dataclass
class FitConfig:
    """Loop settings. `epochs` may be fractional; `max_steps` and `time_limit_s` stop early (a
    checkpoint lets a later call continue); `eval_every`/`patience` early-stop on held-out
    Recall@1 where the retriever holds queries out (`heldout_fraction`)."""

    batch_size: int = run_field(8)
    lr: float = run_field(1e-3)
    weight_decay: float = run_field(0.0)
    warmup_steps: int = run_field(0)
    grad_clip: float | None = run_field(None)
    seed: int = run_field(0)
    heldout_fraction: float = run_field(0.0)
    epochs: float = 1.0
    max_steps: int | None = None
    time_limit_s: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    eval_every: int | None = None
    patience: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `InvalidInputError` for a setting no run can use; subclasses extend it."""
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        for name in ("lr", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive number, got {v!r}")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 0):
            raise InvalidInputError(
                f"max_steps must be None or an int >= 0, got {self.max_steps!r}"
            )
        if not 0.0 <= float(self.heldout_fraction) < 1.0:
            raise InvalidInputError(
                f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}"
            )
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 1:
            raise InvalidInputError(
                f"checkpoint_every must be an int >= 1, got {self.checkpoint_every!r}"
            )
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)

    @classmethod
    def from_options(cls, config: Self | None = None, **options: Any) -> Self:
        """`config` (or the defaults) with `options` replaced; an unknown name is refused with
        the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown fit option(s) {unknown} for {cls.__name__}; known: {sorted(known)}"
            )
        base = config if config is not None else cls()
        if not isinstance(base, cls):
            raise InvalidInputError(f"config must be a {cls.__name__}, got {type(base).__name__}")
        return dataclasses.replace(base, **options) if options else base

    def run_hash(self) -> str:
        """Digest of the run-defining fields."""
        run = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("run")}
        return hashlib.sha256(json.dumps(run, sort_keys=True, default=list).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
