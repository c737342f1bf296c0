"""One block batch's attention, packed (no padding): the matmul ("einsum") and flex backends both
equal a naive per-token softmax — batch outputs, log-sum-exps, per-document masses and maxima —
under soft-capping, scalable softmax, sliding windows, blocks of different lengths and fully
masked query rows; and a whole query pass agrees across backends."""

from __future__ import annotations

import pytest
import torch
from support.decoder import causal_lm, random_blocks

from intrinsic_retrieval.models.architectures import decoder_only_for
from intrinsic_retrieval.retrievers.incontext.attention import CorpusKV, query_pass
from intrinsic_retrieval.retrievers.incontext.blockattn import (
    BatchLogits,
    attend_einsum,
    attend_flex,
    resolve_backend,
)
from intrinsic_retrieval.retrievers.incontext.prefill import prefill_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(
    seed: int = 0,
    b: int = 2,
    hkv: int = 2,
    g: int = 3,
    tq: int = 5,
    d: int = 8,
    lengths: tuple[int, ...] = (7, 3, 1, 5),
):
    gen = torch.Generator().manual_seed(seed)
    s = sum(lengths)
    qg = torch.randn(b, hkv, g, tq, d, generator=gen)
    k = torch.randn(s, hkv, d, generator=gen)
    v = torch.randn(s, hkv, d, generator=gen)
    return qg, k, v, torch.tensor(lengths)


def _naive(qg, k, v, lengths, spec):
    """Per-token reference: logits against every key (positions restart in each block), -inf
    outside the window, softmax over the batch; masses and maxima per document."""
    tpos = torch.cat([torch.arange(int(n)) for n in lengths])
    owner = torch.cat([torch.full((int(n),), j) for j, n in enumerate(lengths)])
    lg = spec.adjust(torch.einsum("bhgqd,shd->bhgqs", qg, k), 3)
    if spec.window is not None:
        far = spec.q_pos[:, None] - tpos[None, :] >= spec.window
        lg = lg.masked_fill(far, float("-inf"))
    lse = torch.logsumexp(lg, -1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(lg - lse[..., None]), 0.0)
    out = torch.einsum("bhgqs,shd->bhgqd", p, v)
    n = len(lengths)
    doc_lse = torch.stack([torch.logsumexp(lg[..., owner == j], -1) for j in range(n)], -1)
    doc_max = torch.stack([lg[..., owner == j].amax(-1) for j in range(n)], -1)
    return out, lse, doc_lse, doc_max


CASES = [
    (None, False, None),
    (5.0, False, None),
    (None, True, None),
    (3.0, True, 4),
    (None, True, 4),
]


@pytest.mark.parametrize("softcap,ssmax,window", CASES)
@pytest.mark.parametrize("lengths", [(7, 3, 1, 5), (4, 4, 4)])
def test_packed_backends_equal_naive_softmax(softcap, ssmax, window, lengths) -> None:
    qg, k, v, lens = _inputs(lengths=lengths)
    tq = qg.shape[3]
    factor = torch.linspace(0.8, 1.6, tq) if ssmax else None
    spec = BatchLogits(0.35, softcap, factor, window, torch.arange(tq) + 6)
    out, lse, doc_lse, doc_max = _naive(qg, k, v, lens, spec)
    mm = attend_einsum(qg, k, v, lens, spec, doc_lse=True, doc_max=True)
    fx = attend_flex(qg, k, v, lens, spec, doc_lse=True)
    for got in (mm, fx):
        torch.testing.assert_close(got.lse, lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.out, out, atol=1e-5, rtol=1e-5)
        assert got.doc_lse is not None
        torch.testing.assert_close(got.doc_lse, doc_lse, atol=1e-4, rtol=1e-4)
    assert mm.doc_max is not None
    torch.testing.assert_close(mm.doc_max, doc_max, atol=1e-5, rtol=1e-5)


def test_packed_attention_has_gradients() -> None:
    """Training reuses the pass: gradients reach the queries, keys and values."""
    qg, k, v, lens = _inputs(seed=2)
    for t in (qg, k, v):
        t.requires_grad_(True)
    spec = BatchLogits(0.35, None, torch.linspace(0.8, 1.6, qg.shape[3]), None, torch.arange(5))
    res = attend_einsum(qg, k, v, lens, spec, doc_lse=True)
    assert res.doc_lse is not None
    (res.out.sum() + res.doc_lse.logsumexp(-1).sum()).backward()
    ref = [t.grad.clone() for t in (qg, k, v)]  # type: ignore[union-attr]
    for t in (qg, k, v):
        t.grad = None
    out, _, doc_lse, _ = _naive(qg, k, v, lens, spec)
    (out.sum() + doc_lse.logsumexp(-1).sum()).backward()
    for got, t in zip(ref, (qg, k, v), strict=True):
        torch.testing.assert_close(got, t.grad, atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_give_zero_output_and_minus_inf() -> None:
    qg, k, v, lens = _inputs(seed=1)
    tq = qg.shape[3]
    # window 1 at positions far past every block: no stored key is visible to any query token
    spec = BatchLogits(0.35, None, None, 1, torch.arange(tq) + 100)
    for res in (
        attend_einsum(qg, k, v, lens, spec, doc_lse=True),
        attend_flex(qg, k, v, lens, spec, doc_lse=True),
    ):
        assert bool(torch.isneginf(res.lse).all())
        assert bool((res.out == 0).all())
        assert res.doc_lse is not None and bool(torch.isneginf(res.doc_lse).all())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_query_pass_agrees_across_backends(arch: str) -> None:
    model = causal_lm(arch)
    ad = decoder_only_for(model)
    blocks = random_blocks(7, seed=5)
    ssmax = [0.4] * ad.num_layers
    with torch.no_grad():
        kv = prefill_blocks(ad, blocks, ad.num_layers)
        corpus = CorpusKV([k for k, _ in kv], [v for _, v in kv])
        runs = {
            backend: query_pass(
                ad,
                corpus,
                torch.tensor([[3, 9, 27, 4]]),
                q_offset=12,
                num_layers=ad.num_layers,
                block_docs=3,
                mass_layers=[0, 1],
                ssmax=ssmax,
                route_layer=0,
                route_top=4,
                backend=backend,
            )
            for backend in ("einsum", "flex")
        }
    a, b = runs["einsum"], runs["flex"]
    assert a.routed is not None and b.routed is not None
    assert a.routed.tolist() == b.routed.tolist()
    torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-4)
    for layer in (0, 1):
        torch.testing.assert_close(b.masses[layer][1], a.masses[layer][1], atol=1e-6, rtol=1e-4)


def test_backend_resolution() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "einsum"
    assert resolve_backend("auto", torch.device("cuda")) == "einsum"  # flex not yet checked there
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
