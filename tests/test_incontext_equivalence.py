"""In-context retrieval numerics proven against the models' own forward passes (tiny configs)."""

from __future__ import annotations

import pytest
import torch
from support.decoder import ARCHS, causal_lm, random_blocks

from intrinsic_retrieval.models.architectures import decoder_only_for
from intrinsic_retrieval.retrievers.incontext.attention import CorpusKV, quantize_int8, query_pass
from intrinsic_retrieval.retrievers.incontext.prefill import prefill_blocks, prefill_packed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ARCHS)
def test_block_sparse_prefill_equals_independent_prefill(arch: str) -> None:
    model = causal_lm(arch)
    ad = decoder_only_for(model)
    blocks = random_blocks()
    L = ad.num_layers
    with torch.no_grad():
        packed = prefill_packed(ad, blocks, L)
        padded = prefill_blocks(ad, blocks, L, batch_size=3)
        for b, (kp, vp), (kb, vb) in zip(blocks, packed, padded, strict=True):
            torch.testing.assert_close(kp, kb, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(vp, vb, atol=1e-5, rtol=1e-4)
            # the model's own forward pass on this document alone
            out = model(torch.tensor([b]), use_cache=True)
            cache = out.past_key_values
            for layer in range(L):
                ref_k = cache.layers[layer].keys[0].transpose(0, 1)  # (T, Hkv, D)
                ref_v = cache.layers[layer].values[0].transpose(0, 1)
                n = ref_k.shape[0]  # a sliding-window cache keeps only the last tokens
                torch.testing.assert_close(kp[-n:, layer], ref_k, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(vp[-n:, layer], ref_v, atol=1e-5, rtol=1e-4)


def _reference_logits(model, blocks, query, q_offset, window=None):
    """The model's forward over [blocks..., query] with a custom 4D block mask."""
    ids = [t for b in blocks for t in b] + query
    seg = [i for i, b in enumerate(blocks) for _ in b] + [-1] * len(query)
    pos = [p for b in blocks for p in range(len(b))] + [q_offset + i for i in range(len(query))]
    n = len(ids)
    seg_t, pos_t = torch.tensor(seg), torch.tensor(pos)
    idx = torch.arange(n)
    causal = idx[:, None] >= idx[None, :]
    same = seg_t[:, None] == seg_t[None, :]
    is_q = (seg_t == -1)[:, None]
    allowed = causal & (same | is_q)

    def additive(m):
        return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)[None, None]

    mask = additive(allowed)
    if window is not None:
        mask = {
            "full_attention": mask,
            "sliding_attention": additive(allowed & (pos_t[:, None] - pos_t[None, :] < window)),
        }
    out = model(torch.tensor([ids]), attention_mask=mask, position_ids=pos_t[None])
    return out.logits[0, -len(query) :]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("backend", ["einsum", "flex"])
def test_streaming_query_attention_equals_model_forward(
    arch: str, int8: bool, backend: str
) -> None:
    model = causal_lm(arch)
    ad = decoder_only_for(model)
    blocks = random_blocks(5, seed=2)
    query = [5, 17, 33, 2, 8]
    q_offset = 12
    with torch.no_grad():
        kv = prefill_blocks(ad, blocks, ad.num_layers)
        if int8:
            kq = [quantize_int8(k) for k, _ in kv]
            vq = [quantize_int8(v) for _, v in kv]
            corpus = CorpusKV(
                [a for a, _ in kq], [a for a, _ in vq], [s for _, s in kq], [s for _, s in vq]
            )
        else:
            corpus = CorpusKV([k for k, _ in kv], [v for _, v in kv])
        res = query_pass(
            ad,
            corpus,
            torch.tensor([query]),
            q_offset=q_offset,
            num_layers=ad.num_layers,
            block_docs=2,
            mass_layers=[0, 2],
            backend=backend,
        )
        got = ad.logits(ad.final_norm(res.hidden))[0]
        ref = _reference_logits(
            model, blocks, query, q_offset, window=10 if arch == "gemma3" else None
        )
    tol = dict(atol=5e-2, rtol=5e-2) if int8 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, ref, **tol)
    _, mass = res.masses[2]
    assert mass.shape == (1, ad.num_heads, len(blocks))
    assert bool((mass.sum(-1) <= 1 + 1e-5).all())


def test_incremental_decoding_matches_full_pass() -> None:
    model = causal_lm("qwen3")
    ad = decoder_only_for(model)
    blocks = random_blocks(4, seed=3)
    with torch.no_grad():
        kv = prefill_blocks(ad, blocks, ad.num_layers)
        corpus = CorpusKV([k for k, _ in kv], [v for _, v in kv])
        full = query_pass(
            ad, corpus, torch.tensor([[4, 5, 6, 7]]), q_offset=12, num_layers=ad.num_layers
        )
        first = query_pass(
            ad, corpus, torch.tensor([[4, 5]]), q_offset=12, num_layers=ad.num_layers
        )
        second = query_pass(
            ad,
            corpus,
            torch.tensor([[6, 7]]),
            q_offset=12,
            num_layers=ad.num_layers,
            cache=first.cache,
        )
    torch.testing.assert_close(second.hidden[0], full.hidden[0, 2:], atol=1e-5, rtol=1e-4)


def test_routing_keeps_top_documents_and_ssmax_changes_scores() -> None:
    model = causal_lm("llama")
    ad = decoder_only_for(model)
    blocks = random_blocks(6, seed=4)
    with torch.no_grad():
        kv = prefill_blocks(ad, blocks, ad.num_layers)
        corpus = CorpusKV([k for k, _ in kv], [v for _, v in kv])
        q = torch.tensor([[1, 2, 3]])
        res = query_pass(
            ad, corpus, q, q_offset=12, num_layers=3, route_layer=0, route_top=2, mass_layers=[0, 2]
        )
        assert res.routed is not None and len(res.routed) == 2
        assert res.route_scores is not None
        assert set(res.routed.tolist()) == set(torch.topk(res.route_scores, 2).indices.tolist())
        assert res.masses[2][0].tolist() == res.routed.tolist()
        plain = query_pass(ad, corpus, q, q_offset=12, num_layers=3, mass_layers=[2])
        scaled = query_pass(
            ad, corpus, q, q_offset=12, num_layers=3, mass_layers=[2], ssmax=[2.0, 2.0, 2.0]
        )
        assert not torch.allclose(plain.masses[2][1], scaled.masses[2][1])


def _stored(kv, k_layers: int, v_layers: int, kv_dtype: str) -> CorpusKV:
    """Blocks as a store of `kv_dtype` holds them: keys of the first `k_layers` layers, values
    of the first `v_layers` (a routing-keys store: r + 1 and r)."""
    from intrinsic_retrieval.retrievers.incontext.recompute import to_storage

    ks, vs = [to_storage(k[:, :k_layers], kv_dtype) for k, _ in kv], []
    if v_layers:
        vs = [to_storage(v[:, :v_layers], kv_dtype) for _, v in kv]
    int8 = kv_dtype == "int8"
    return CorpusKV(
        [a for a, _ in ks],
        [a for a, _ in vs] or None,
        [s for _, s in ks] if int8 else None,
        [s for _, s in vs] if int8 and vs else None,
    )


@pytest.mark.parametrize("route_layer", [0, 1])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "int8"])
def test_routing_keys_storage_equals_full_storage(route_layer: int, kv_dtype: str) -> None:
    from intrinsic_retrieval.retrievers.incontext.recompute import BlockCache, RecomputedKV

    model = causal_lm("llama")
    ad = decoder_only_for(model)
    blocks = random_blocks(6, seed=5)
    L = ad.num_layers
    with torch.no_grad():
        kv = prefill_blocks(ad, blocks, L)
        full = _stored(kv, L, L, kv_dtype)
        part = RecomputedKV(
            _stored(kv, route_layer + 1, route_layer, kv_dtype),
            ad,
            lambda rows: [blocks[r] for r in rows],
            route_layer=route_layer,
            num_layers=L,
            kv_dtype=kv_dtype,
            cache=BlockCache(2),
            prefill_batch=16,
        )
        q = torch.tensor([[1, 2, 3, 4]])
        kw = dict(
            q_offset=12,
            num_layers=L,
            block_docs=2,
            route_layer=route_layer,
            route_top=3,
            route_before_attend=True,
            mass_layers=range(L),
            ssmax=[0.5] * L,
        )
        a = query_pass(ad, full, q, **kw)
        b = query_pass(ad, part, q, **kw)
        # only the routed blocks were recomputed, and all of them stay held (beyond capacity 2)
        assert part.recomputed_blocks == 3 and len(part.cache) == 3
        assert a.routed is not None and b.routed is not None and b.route_scores is not None
        assert a.routed.tolist() == b.routed.tolist()
        torch.testing.assert_close(b.route_scores, a.route_scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-4)
        for layer in range(L):
            assert a.masses[layer][0].tolist() == b.masses[layer][0].tolist()
            torch.testing.assert_close(b.masses[layer][1], a.masses[layer][1], atol=1e-5, rtol=0)
            # layers before the routing layer read every block, the rest the routed ones only
            assert len(b.masses[layer][0]) == (6 if layer < route_layer else 3)
        # routing from the keys alone picks what routing after the attention picks
        late = query_pass(ad, full, q, **{**kw, "route_before_attend": False})
        assert late.routed is not None and late.route_scores is not None
        assert late.routed.tolist() == a.routed.tolist()
        torch.testing.assert_close(late.route_scores, a.route_scores, atol=1e-5, rtol=1e-5)
        # a decoding step reuses the routing decision and the recomputed blocks
        step = {**kw, "mass_layers": ()}
        sa = query_pass(ad, full, torch.tensor([[5]]), cache=a.cache, routed=a.routed, **step)
        sb = query_pass(ad, part, torch.tensor([[5]]), cache=b.cache, routed=b.routed, **step)
        torch.testing.assert_close(sb.hidden, sa.hidden, atol=1e-5, rtol=1e-4)
        assert part.recomputed_blocks == 3
        # routing everything equals no routing at all
        every = query_pass(ad, part, q, **{**kw, "route_top": 6})
        plain = query_pass(ad, full, q, q_offset=12, num_layers=L, block_docs=2, ssmax=[0.5] * L)
        torch.testing.assert_close(every.hidden, plain.hidden, atol=1e-5, rtol=1e-4)
        # recomputed keys/values equal the stored ones on every layer both hold
        docs = torch.arange(len(blocks))
        for layer in range(route_layer, L):
            kf, vf, lens = full.batch(layer, docs, ad.device)
            kr, vr, lens_r = part.batch(layer, docs, ad.device)
            assert torch.equal(lens, lens_r)
            torch.testing.assert_close(kr, kf, atol=1e-6, rtol=0)
            torch.testing.assert_close(vr, vf, atol=1e-6, rtol=0)
        (kf, _), (kr, _) = (
            full.keys(route_layer, docs, ad.device),
            part.keys(route_layer, docs, ad.device),
        )
        torch.testing.assert_close(kr, kf)
