"""`GenerativeFitConfig`: how generative retrieval builds its training examples, and the loop
settings that differ from the shared defaults (`intrinsic_retrieval.training`).

Training *is* indexing here: the model learns to write each stored document's id. The loop,
checkpoints, early stopping on held-out Recall@1 and the report are the library's one training
loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidInputError
from ...training import FitConfig, run_field
from .backbone import TRAIN_MODES
from .examples import INPUT_KINDS


@dataclass
class GenerativeFitConfig(FitConfig):
    """`GenerativeDocidRetriever.fit` settings. Example building: `inputs` (which kinds of
    examples), FirstP/DaQ windows of `span_tokens` (`daq_spans` per document),
    `synthetic_per_doc` generated queries, `index_retrieval_ratio` indexing examples per
    retrieval example, `replay_ratio` old-document examples per new one (add + fit).
    `train_mode` chooses what trains; `cache_encoder` reuses encoder states when it is frozen."""

    inputs: tuple[str, ...] = run_field(("firstp", "daq", "labeled", "synthetic"))
    span_tokens: int = run_field(64)
    daq_spans: int = run_field(10)
    synthetic_per_doc: int = run_field(3)
    index_retrieval_ratio: float | None = run_field(None)
    replay_ratio: float = run_field(1.0)
    train_mode: str = run_field("all")
    cache_encoder: bool = True
    batch_size: int = run_field(16)
    lr: float = run_field(5e-4)
    weight_decay: float = run_field(0.01)
    warmup_steps: int = run_field(100)
    grad_clip: float | None = run_field(1.0)
    heldout_fraction: float = run_field(0.1)
    epochs: float = 3.0
    eval_every: int | None = 200
    patience: int | None = 3

    def validate(self) -> None:
        super().validate()
        self.inputs = tuple(self.inputs)
        bad = [k for k in self.inputs if k not in INPUT_KINDS]
        if bad or not self.inputs:
            raise InvalidInputError(
                f"inputs must be a non-empty subset of {INPUT_KINDS}, got {self.inputs}"
            )
        if self.train_mode not in TRAIN_MODES:
            raise InvalidInputError(
                f"train mode must be one of {TRAIN_MODES}, got {self.train_mode!r}"
            )
