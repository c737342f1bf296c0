"""`FitReport`: what a `fit` did, the same shape for every retriever."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FitReport:
    """`steps` is the optimizer step reached (counting steps of a resumed checkpoint);
    `total_steps` what the configured epochs need; `losses` one training loss per step since
    step 0; `history` the held-out evaluations; `stopped` is ``completed``, ``max_steps``,
    ``time_limit`` or ``early_stop``. ``examples_per_s`` counts training examples."""

    steps: int = 0
    total_steps: int = 0
    num_examples: int = 0
    num_heldout: int = 0
    example_kinds: dict[str, int] = field(default_factory=dict)
    examples_seen: int = 0
    seconds: float = 0.0
    examples_per_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    best_recall_at_1: float | None = None
    best_step: int | None = None
    stopped: str = "completed"
    resumed_from_step: int | None = None
    trainable_params: int = 0
    total_params: int = 0

    @property
    def completed(self) -> bool:
        """Every configured step ran (early stopping counts as done)."""
        return self.stopped in ("completed", "early_stop")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
