"""Pictures of evaluation results (matplotlib, an optional extra: ``pip install
'intrinsic-retrieval[plots]'``): quality against corpus size (the dilution curve) and quality
against median query latency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidInputError
from .runner import EvalResult


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInputError(
            "plots need matplotlib: pip install 'intrinsic-retrieval[plots]'"
        ) from None
    return plt


def plot_results(
    results: Sequence[EvalResult], path: str | Path, *, measure: str = "nDCG@10", title: str = ""
) -> Path:
    """Write a PNG (or any format matplotlib infers from `path`): left, `measure` against
    corpus size per retriever; right, `measure` against median query milliseconds (log
    scale). Returns the path."""
    if not results:
        raise InvalidInputError("nothing to plot")
    if any(measure not in r.metrics for r in results):
        raise InvalidInputError(f"{measure} was not measured; add it to --measures")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r.retriever for r in results))
    for name in names:
        mine = sorted((r for r in results if r.retriever == name), key=lambda r: r.num_docs)
        xs = [r.num_docs for r in mine]
        ys = [r.metrics[measure] for r in mine]
        left.plot(xs, ys, marker="o", label=name)
        timed = [r for r in mine if r.median_query_ms]
        if timed:
            right.plot(
                [r.median_query_ms for r in timed],
                [r.metrics[measure] for r in timed],
                marker="o",
                linestyle="--" if len(timed) > 1 else "",
                label=name,
            )
    left.set_xlabel("documents in the corpus")
    left.set_ylabel(measure)
    left.set_title("quality against corpus size")
    right.set_xscale("log")
    right.set_xlabel("median query latency (ms, log scale)")
    right.set_ylabel(measure)
    right.set_title("quality against latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
