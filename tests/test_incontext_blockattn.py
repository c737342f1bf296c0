"""The flex-attention backend computes exactly what the einsum backend computes: batch outputs,
log-sum-exps and per-document masses, under soft-capping, scalable softmax, sliding windows,
padding and fully masked query rows; and a whole query pass agrees across backends."""

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
    n: int = 4,
    t: int = 7,
    d: int = 8,
):
    gen = torch.Generator().manual_seed(seed)
    qg = torch.randn(b, hkv, g, tq, d, generator=gen)
    kb = torch.randn(n, t, hkv, d, generator=gen)
    vb = torch.randn(n, t, hkv, d, generator=gen)
    lens = torch.tensor([t, 3, 1, 5][:n])
    valid = torch.arange(t)[None, :] < lens[:, None]
    return qg, kb, vb, valid


@pytest.mark.parametrize(
    "softcap,ssmax,window",
    [(None, False, None), (5.0, False, None), (None, True, None), (3.0, True, 4)],
)
def test_flex_equals_einsum_on_one_batch(softcap, ssmax, window) -> None:
    qg, kb, vb, valid = _inputs()
    tq = qg.shape[3]
    factor = torch.linspace(0.8, 1.6, tq) if ssmax else None
    spec = BatchLogits(0.35, softcap, factor, window, torch.arange(tq) + 6)
    ref = attend_einsum(qg, kb, vb, valid, spec, doc_lse=True)
    got = attend_flex(qg, kb, vb, valid, spec, doc_lse=True)
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.out, ref.out, atol=1e-5, rtol=1e-5)
    assert got.doc_lse is not None and ref.doc_lse is not None
    torch.testing.assert_close(got.doc_lse, ref.doc_lse, atol=1e-4, rtol=1e-4)


def test_fully_masked_rows_give_zero_output_and_minus_inf() -> None:
    qg, kb, vb, valid = _inputs(seed=1)
    tq = qg.shape[3]
    # window 1 at positions far past every block: no stored key is visible to any query token
    spec = BatchLogits(0.35, None, None, 1, torch.arange(tq) + 100)
    for res in (
        attend_einsum(qg, kb, vb, valid, spec, doc_lse=True),
        attend_flex(qg, kb, vb, valid, spec, doc_lse=True),
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
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
