"""VectorIndex: exact flat search, IVF fallback and training, filtering, removal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from intrinsic_retrieval.errors import DimensionMismatchError, InvalidInputError
from intrinsic_retrieval.models import VectorIndex


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_exact_matches_numpy():
    x = unit(200, 16, 0)
    ids = np.arange(1000, 1200)
    index = VectorIndex.build(torch.from_numpy(x), torch.from_numpy(ids), metric="ip")
    assert not index.is_ivf and len(index) == 200
    q = unit(4, 16, 1)
    scores, got = index.search(q, 5)
    ref = np.argsort(-(q @ x.T), axis=1)[:, :5] + 1000
    assert got.dtype == torch.int64 and scores.dtype == torch.float32
    assert np.array_equal(got.numpy(), ref)
    assert np.allclose(scores.numpy(), np.sort(q @ x.T, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_l2_scores_are_negative_squared_distances():
    x = unit(50, 8, 2)
    index = VectorIndex.build(x, np.arange(50), metric="l2")
    scores, ids = index.search(x[:3], 1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert np.allclose(scores.numpy(), 0.0, atol=1e-5)
    s2, _ = index.search(x[:1], 3)
    assert (s2[0, 1:] < 0).all()


def test_padding_when_fewer_than_k():
    index = VectorIndex.build(unit(3, 4, 3), np.array([5, 6, 7]))
    scores, ids = index.search(unit(2, 4, 4), 5)
    assert ids.shape == (2, 5)
    assert (ids[:, 3:] == -1).all() and torch.isinf(scores[:, 3:]).all()
    assert (scores[:, 3:] < 0).all()
    ranked = index.search_ranked(unit(2, 4, 4), 5)
    assert [len(r[0]) for r in ranked] == [3, 3]
    empty = VectorIndex(4)
    _s, i = empty.search(unit(1, 4, 5), 3)
    assert (i == -1).all()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_filter_never_returns_excluded_ids(kind):
    n = 4000
    x = unit(n, 16, 6)
    index = VectorIndex.build(x, np.arange(n), kind=kind, nlist=16, nprobe=1)
    assert index.is_ivf == (kind == "ivf")
    allowed = np.zeros(n + 10, dtype=bool)
    chosen = np.random.default_rng(7).choice(n, 25, replace=False)
    allowed[chosen] = True
    q = unit(8, 16, 8)
    _scores, ids = index.search(q, 10, allowed=torch.from_numpy(allowed))
    assert (ids >= 0).all(), "a selective filter must still fill k from allowed rows"
    assert allowed[ids.numpy()].all()
    # exact among allowed rows even for IVF with nprobe=1 (short results are re-probed)
    sims = q @ x[chosen].T
    ref = chosen[np.argsort(-sims, axis=1)[:, :10]]
    assert np.array_equal(np.sort(ids.numpy(), axis=1), np.sort(ref, axis=1))
    # nothing allowed -> nothing returned
    _, i = index.search(q, 5, allowed=np.zeros(n, dtype=bool))
    assert (i == -1).all()
    # a mask shorter than the ids: ids past its end count as excluded
    short = np.zeros(10, dtype=bool)
    short[3] = True
    _s, i = index.search(q[:1], 5, allowed=short)
    assert i[0, 0] == 3 and (i[0, 1:] == -1).all()


def test_ivf_falls_back_to_flat_on_tiny_data_and_converts_later():
    index = VectorIndex(8, kind="ivf", nlist=4)
    index.add(unit(20, 8, 9), np.arange(20))  # < 39 * 4 points: flat
    assert not index.is_ivf
    _s, i = index.search(unit(1, 8, 10), 3)
    assert (i >= 0).all()
    index.add(unit(200, 8, 11), np.arange(20, 220))  # now enough to train
    assert index.is_ivf and index.nlist == 4 and len(index) == 220


def test_auto_switches_to_ivf_at_threshold():
    index = VectorIndex(8, kind="auto", flat_threshold=500)
    index.add(unit(300, 8, 12), np.arange(300))
    assert not index.is_ivf
    index.add(unit(300, 8, 13), np.arange(300, 600))
    # nlist = 4*sqrt(600) = 97 -> needs 39*97 points: too few, stays flat
    assert not index.is_ivf
    big = VectorIndex(8, kind="auto", flat_threshold=500, nlist=8)
    big.add(unit(600, 8, 14), np.arange(600))
    assert big.is_ivf


def test_ivf_recall_close_to_flat():
    n, d = 8000, 32
    rng = np.random.default_rng(15)
    centers = rng.standard_normal((40, d)).astype(np.float32)
    x = centers[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    q = x[rng.choice(n, 50, replace=False)] + 0.1 * rng.standard_normal((50, d)).astype(np.float32)
    flat = VectorIndex.build(x, np.arange(n), kind="flat")
    ivf = VectorIndex.build(x, np.arange(n), kind="ivf")  # nlist = 4*sqrt(8000) = 357 > n/39
    assert not ivf.is_ivf
    ivf = VectorIndex.build(x, np.arange(n), kind="ivf", nlist=64)
    assert ivf.is_ivf
    _, ref = flat.search(q, 10)
    _, got = ivf.search(q, 10)
    pairs = zip(ref.tolist(), got.tolist(), strict=True)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in pairs])
    assert recall >= 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_remove(kind):
    n = 2000
    x = unit(n, 8, 16)
    index = VectorIndex.build(x, np.arange(n), kind=kind, nlist=8)
    assert index.remove(torch.tensor([0, 1, 2, 99999])) == 3
    assert len(index) == n - 3
    _, ids = index.search(x[:3], 5)
    assert not set(ids.flatten().tolist()) & {0, 1, 2}
    assert index.remove([]) == 0


def test_errors():
    index = VectorIndex(8)
    with pytest.raises(DimensionMismatchError):
        index.add(unit(3, 7, 17), np.arange(3))
    with pytest.raises(InvalidInputError):
        index.add(unit(3, 8, 17), np.arange(2))
    with pytest.raises(InvalidInputError):
        index.add(unit(1, 8, 17), np.array([-1]))
    index.add(unit(3, 8, 17), np.arange(3))
    with pytest.raises(DimensionMismatchError):
        index.search(unit(1, 4, 18), 1)
    with pytest.raises(InvalidInputError):
        index.search(unit(1, 8, 18), 1, allowed=np.ones(3, dtype=np.int64))
    with pytest.raises(InvalidInputError):
        VectorIndex(8, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(DimensionMismatchError):
        VectorIndex.build(np.zeros(5, dtype=np.float32), np.arange(5))
