"""MaxSim kernels against a plain loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from intrinsic_retrieval.errors import DimensionMismatchError
from intrinsic_retrieval.models import (
    maxsim_scores,
    maxsim_topk,
    maxsim_varlen,
    maxsim_varlen_topk,
)

NEG = float("-inf")


def naive(queries, docs, query_mask=None, doc_mask=None, candidates=None, weights=None):
    """Loops over queries, documents, query vectors and doc vectors; float64."""
    Q, m, _ = queries.shape
    out = torch.full((Q, len(docs)), NEG, dtype=torch.float64)
    for qi in range(Q):
        for n, doc in enumerate(docs):
            if candidates is not None and not candidates[n]:
                continue
            valid = [j for j in range(len(doc)) if doc_mask is None or doc_mask[n][j]]
            if not valid:
                continue
            total = 0.0
            for i in range(m):
                if query_mask is not None and not query_mask[qi, i]:
                    continue
                best = max(float(queries[qi, i].double() @ doc[j].double()) for j in valid)
                w = 1.0 if weights is None else float(weights[qi, i])
                total += w * best
            out[qi, n] = total
    return out


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) == torch.isinf(b)
    finite = ~torch.isinf(b)
    return bool(same_inf.all()) and torch.allclose(a[finite], b[finite], rtol=tol, atol=tol)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 4, 8, generator=g)
    docs = torch.randn(11, 5, 8, generator=g)
    return queries, docs


@pytest.mark.parametrize("block_size", [None, 1, 3, 4, 11, 50])
def test_matches_naive_for_any_block_size(data, block_size):
    q, d = data
    assert close(maxsim_scores(q, d, block_size=block_size), naive(q, d))


def test_masks_weights_and_candidates(data):
    q, d = data
    g = torch.Generator().manual_seed(1)
    qm = torch.rand(3, 4, generator=g) > 0.3
    qm[:, 0] = True
    dm = torch.rand(11, 5, generator=g) > 0.4
    dm[2] = False  # a document with no valid vectors scores -inf
    cand = torch.rand(11, generator=g) > 0.3
    w = torch.rand(3, 4, generator=g)
    ref = naive(q, d, qm, dm, cand, w)
    for bs in (None, 2, 5):
        got = maxsim_scores(
            q, d, query_mask=qm, doc_mask=dm, candidates=cand, weights=w, block_size=bs
        )
        assert close(got, ref)
    assert torch.isinf(got[:, 2]).all()
    assert torch.isinf(got[:, ~cand]).all()


def test_sparse_candidates_are_gathered(data):
    q, d = data
    cand = torch.zeros(11, dtype=torch.bool)
    cand[[1, 7]] = True
    got = maxsim_scores(q, d, candidates=cand, block_size=1)
    assert close(got, naive(q, d, candidates=cand))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_docs_accumulate_in_float32(data, dtype):
    q, d = data
    dh = d.to(dtype)
    got = maxsim_scores(q, dh, block_size=4)
    assert got.dtype == torch.float32
    assert close(got, naive(q, dh.float()), tol=1e-4)  # exact up to fp32 rounding of the inputs


def test_single_query_and_single_doc():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 6, generator=g)
    d = torch.randn(1, 2, 6, generator=g)
    assert close(maxsim_scores(q, d), naive(q, d))
    assert maxsim_scores(q[0], d).shape == (1, 1)  # (m, d) is one query
    s, i = maxsim_topk(q, d, 5)
    assert s.shape == (1, 1) and i.tolist() == [[0]]


@pytest.mark.parametrize("block_size", [None, 1, 4, 7])
def test_topk_equals_full_sort(data, block_size):
    q, d = data
    full = maxsim_scores(q, d)
    s, i = maxsim_topk(q, d, 6, block_size=block_size)
    ref_s, ref_i = torch.sort(full, dim=1, descending=True)
    assert torch.equal(i, ref_i[:, :6])
    assert torch.allclose(s, ref_s[:, :6])


def test_topk_with_candidates_never_returns_excluded(data):
    q, d = data
    for dense in (False, True):
        cand = torch.zeros(11, dtype=torch.bool)
        cand[[0, 3, 4] + ([5, 6, 8, 9, 10] if dense else [])] = True
        s, i = maxsim_topk(q, d, 20, candidates=cand, block_size=3)
        assert i.shape == (3, int(cand.sum()))
        assert cand[i].all()
        ref = maxsim_scores(q, d, candidates=cand)
        assert torch.allclose(s, torch.sort(ref, dim=1, descending=True).values[:, : i.shape[1]])


def test_k_zero_and_shape_errors(data):
    q, d = data
    s, _i = maxsim_topk(q, d, 0)
    assert s.shape == (3, 0)
    with pytest.raises(DimensionMismatchError):
        maxsim_scores(q, torch.randn(4, 5, 7))
    with pytest.raises(DimensionMismatchError):
        maxsim_scores(q, d, candidates=torch.ones(3, dtype=torch.bool))
    with pytest.raises(DimensionMismatchError):
        maxsim_scores(q, d, doc_mask=torch.ones(11, 4, dtype=torch.bool))


# ---------------------------------------------------------------------- varlen
@pytest.fixture
def varlen():
    g = torch.Generator().manual_seed(3)
    lengths = [3, 1, 0, 7, 2, 5, 4, 1]
    docs = [torch.randn(n, 8, generator=g) for n in lengths]
    flat = torch.cat(docs)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q = torch.randn(2, 3, 8, generator=g)
    return q, docs, flat, offsets


@pytest.mark.parametrize("block_size", [None, 1, 4, 9, 100])
def test_varlen_matches_naive(varlen, block_size):
    q, docs, flat, offsets = varlen
    got = maxsim_varlen(q, flat, offsets, block_size=block_size)
    assert close(got, naive(q, docs))
    assert torch.isinf(got[:, 2]).all()  # the empty document


@pytest.mark.parametrize("block_size", [None, 2, 5])
def test_varlen_candidates_masks_and_topk(varlen, block_size):
    q, docs, flat, offsets = varlen
    qm = torch.tensor([[True, False, True], [True, True, True]])
    w = torch.tensor([0.5, 1.0, 2.0])
    for cand_rows in ([1, 5], [0, 1, 3, 4, 5, 6, 7]):  # sparse (gathered) and dense (scanned)
        cand = torch.zeros(len(docs), dtype=torch.bool)
        cand[cand_rows] = True
        ref = naive(q, docs, qm, None, cand, w.expand(2, 3))
        got = maxsim_varlen(
            q, flat, offsets, query_mask=qm, weights=w, candidates=cand, block_size=block_size
        )
        assert close(got, ref)
        s, i = maxsim_varlen_topk(
            q, flat, offsets, 3, query_mask=qm, weights=w, candidates=cand, block_size=block_size
        )
        assert cand[i].all()
        ref_s, ref_i = torch.sort(ref.float(), dim=1, descending=True)
        assert torch.equal(i, ref_i[:, :2] if len(cand_rows) == 2 else ref_i[:, :3])
        assert close(s, ref_s[:, : i.shape[1]])


def test_varlen_half_precision(varlen):
    q, docs, flat, offsets = varlen
    got = maxsim_varlen(q, flat.half(), offsets, block_size=3)
    assert close(got, naive(q, [d.half().float() for d in docs]))


def test_varlen_bad_offsets(varlen):
    q, _, flat, offsets = varlen
    with pytest.raises(DimensionMismatchError):
        maxsim_varlen(q, flat, offsets[:-1])
    bad = offsets.clone()
    bad[1] = 10  # decreasing afterwards
    with pytest.raises(DimensionMismatchError):
        maxsim_varlen(q, flat, bad)


def test_large_random_against_dense_matmul():
    """A bigger shape checked with a fully vectorised reference (no loops)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 6, 16, generator=g)
    d = torch.randn(1000, 4, 16, generator=g).to(torch.bfloat16)
    ref = torch.einsum("qmd,npd->qnmp", q.double(), d.double()).amax(-1).sum(-1)
    got = maxsim_scores(q, d, block_size=97)
    assert torch.allclose(got.double(), ref, atol=1e-3)
    s, i = maxsim_topk(q, d, 10, block_size=97)
    assert torch.equal(i, torch.topk(ref, 10, dim=1).indices)
    assert not math.isnan(float(s.sum()))
