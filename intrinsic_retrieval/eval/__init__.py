"""Evaluation harness: BEIR loading, ir-measures metrics, retriever runs."""

from .beir import BeirDataset, load_beir, load_qrels
from .metrics import DEFAULT_MEASURES, evaluate_run, parse_measures
from .runner import EvalResult, document_run, evaluate, run_queries

__all__ = [
    "DEFAULT_MEASURES",
    "BeirDataset",
    "EvalResult",
    "document_run",
    "evaluate",
    "evaluate_run",
    "load_beir",
    "load_qrels",
    "parse_measures",
    "run_queries",
]
