"""The one training loop: settings, labeled-query shapes, resume, budgets, checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from intrinsic_retrieval.errors import CheckpointMismatchError, InvalidInputError
from intrinsic_retrieval.training import (
    FitConfig,
    FitReport,
    labeled_pairs,
    latest_checkpoint,
    run_field,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToyConfig(FitConfig):
    width: int = run_field(3)


def _toy(seed: int = 0) -> tuple[dict[str, torch.nn.Module], list[tuple[torch.Tensor, float]]]:
    torch.manual_seed(123)
    frozen = torch.nn.Linear(4, 4)  # the same in every run; must not be saved in checkpoints
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.2), torch.nn.Linear(3, 1))
    for p in frozen.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, generator=g), float(i % 3)) for i in range(20)]
    return {"net": net, "frozen": frozen}, data


def _loss(modules):
    def fn(batch, step):
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch])
        return ((modules["net"](modules["frozen"](x)).squeeze(-1) - y) ** 2).mean()

    return fn


def _run(cfg: ToyConfig, seed: int = 0, fingerprints: dict | None = None):
    modules, data = _toy(seed)
    report = train(
        modules,
        _loss(modules),
        data,
        cfg,
        fingerprints=fingerprints or {"data": "d", "run": cfg.run_hash()},
        report=FitReport(),
    )
    return modules, report


def test_loss_falls_and_report_is_filled():
    _, rep = _run(ToyConfig(epochs=10, batch_size=5, lr=0.05, show_progress=False))
    assert rep.steps == rep.total_steps == 40 and rep.stopped == "completed" and rep.completed
    assert len(rep.losses) == 40 and sum(rep.losses[-5:]) < sum(rep.losses[:5])
    assert rep.examples_seen == 200 and rep.examples_per_s > 0


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path):
    base = {"epochs": 3, "batch_size": 4, "lr": 0.05, "show_progress": False}
    straight, _ = _run(ToyConfig(**base))
    ckpt = str(tmp_path / "ck")
    _, first = _run(ToyConfig(**base, max_steps=7, checkpoint_dir=ckpt, checkpoint_every=3))
    assert first.steps == 7 and first.stopped == "max_steps" and not first.completed
    resumed, second = _run(ToyConfig(**base, checkpoint_dir=ckpt), seed=5)  # other init: loaded
    assert second.resumed_from_step == 7 and second.steps == 15 and len(second.losses) == 15
    for a, b in zip(straight["net"].parameters(), resumed["net"].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # only the trained parameters are checkpointed; the state is JSON
    last = latest_checkpoint(ckpt)
    assert last is not None and last.name == "step-00000015"
    assert set(load_file(last / "model.safetensors")) == {
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"
    }  # fmt: skip
    assert json.loads((last / "state.json").read_text())["step"] == 15


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path):
    ckpt = str(tmp_path / "ck")
    _run(ToyConfig(max_steps=2, checkpoint_dir=ckpt, show_progress=False))
    with pytest.raises(CheckpointMismatchError, match="run"):
        _run(ToyConfig(max_steps=4, lr=0.5, checkpoint_dir=ckpt, show_progress=False))
    with pytest.raises(CheckpointMismatchError, match="data"):
        cfg = ToyConfig(max_steps=4, checkpoint_dir=ckpt, show_progress=False)
        _run(cfg, fingerprints={"data": "other", "run": cfg.run_hash()})
    _, rep = _run(ToyConfig(epochs=9, max_steps=4, lr=0.5, checkpoint_dir=ckpt, resume=False,
                            show_progress=False))  # fmt: skip
    assert rep.resumed_from_step is None and rep.steps == 4


def test_time_budget_stops_and_leaves_a_checkpoint(tmp_path: Path):
    ckpt = tmp_path / "ck"
    _, rep = _run(
        ToyConfig(epochs=10_000, time_limit_s=0.3, checkpoint_dir=str(ckpt), show_progress=False)
    )
    assert rep.stopped == "time_limit" and 0 < rep.steps < rep.total_steps
    assert latest_checkpoint(ckpt) is not None


def test_settings_are_validated_once_with_clear_errors():
    with pytest.raises(InvalidInputError, match="batch_size"):
        ToyConfig(batch_size=0)
    with pytest.raises(InvalidInputError, match="lr"):
        ToyConfig(lr=-1)
    with pytest.raises(InvalidInputError, match=r"unknown fit option.*'epoch'"):
        ToyConfig.from_options(epoch=3)
    cfg = ToyConfig.from_options(ToyConfig(width=5), epochs=2)
    assert cfg.width == 5 and cfg.epochs == 2
    assert ToyConfig(width=4).run_hash() != ToyConfig(width=5).run_hash()
    assert ToyConfig(epochs=1).run_hash() == ToyConfig(epochs=9).run_hash()  # not run-defining


def test_labeled_queries_in_every_shape():
    beir = labeled_pairs({"1": "q one", "2": "q two", "3": "q three"},
                         {"1": {"a": 1, "b": 0}, "2": {"c": 2}})  # fmt: skip
    assert beir == [("q one", ["a"]), ("q two", ["c"])]  # non-relevant and unjudged dropped
    assert labeled_pairs(["q1", "q2"], [["a", "b"], "c"]) == [("q1", ["a", "b"]), ("q2", ["c"])]
    assert labeled_pairs({"q1": ["a"], "q2": "b"}) == [("q1", ["a"]), ("q2", ["b"])]
    assert labeled_pairs([("q1", "a"), ("q2", "b")]) == [("q1", ["a"]), ("q2", ["b"])]
    for bad in (
        lambda: labeled_pairs("q1"),
        lambda: labeled_pairs(["q1"], [["a"], ["b"]]),
        lambda: labeled_pairs({"1": "q"}, [["a"]]),
        lambda: labeled_pairs(["just a string"]),
        lambda: labeled_pairs(["q"], [3]),
    ):
        with pytest.raises(InvalidInputError):
            bad()


def test_retrievers_that_do_not_train_say_so(tmp_path: Path):
    from intrinsic_retrieval import BM25Retriever

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add(["a document"])
    with pytest.raises(InvalidInputError, match="nothing to train"):
        r.fit(["q"], [["x"]])


def test_reindex_swaps_in_a_new_store_and_a_failed_one_changes_nothing(tmp_path: Path):
    from intrinsic_retrieval import BM25Retriever

    r = BM25Retriever(path=tmp_path / "s", show_progress=False)
    r.add([{"id": "a", "text": "glaciers carve valleys"}, {"id": "b", "text": "tides and moon"}])
    r.reindex()
    assert len(r) == 2 and r.search("moon", k=1)[0].document_id == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]

    def broken(chunks):
        raise RuntimeError("disk full")

    r._encode_chunks = broken  # an interruption while the new store is being filled
    with pytest.raises(RuntimeError, match="disk full"):
        r.reindex()
    assert len(r) == 2 and r.search("glaciers", k=1)[0].document_id == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
