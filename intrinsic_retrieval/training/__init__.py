"""The one training loop every retriever that trains uses (INTRA's head, in-context LoRA,
generative retrieval), with the settings, report, checkpoints and labeled-query shape they share.
"""

from .checkpoint import latest_checkpoint, save_checkpoint
from .config import FitConfig, run_field
from .labels import LabeledQueries, labeled_pairs
from .loop import epoch_batches, parameter_counts, step_seed, train
from .report import FitReport

__all__ = [
    "FitConfig",
    "FitReport",
    "LabeledQueries",
    "epoch_batches",
    "labeled_pairs",
    "latest_checkpoint",
    "parameter_counts",
    "run_field",
    "save_checkpoint",
    "step_seed",
    "train",
]
