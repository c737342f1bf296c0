"""Docid schemes, the prefix trie and trie-constrained beam search (generative retrieval)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.generative import tiny_model
from support.tokenizer import tiny_tokenizer

from intrinsic_retrieval.errors import DocidVocabularyError, IdSpaceExhaustedError
from intrinsic_retrieval.retrievers.generative import (
    Backbone,
    DocidMap,
    DocidTrie,
    hierarchical_kmeans,
)
from intrinsic_retrieval.retrievers.generative.docids import naive_string, tokenize_fn

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- trie
def test_trie_insert_lookup_next_and_remove_prunes():
    t = DocidTrie([([5, 6, 1], 0), ([5, 7, 1], 1), ([8, 1], 2)])
    assert len(t) == 3
    assert sorted(t.next_tokens([])) == [5, 8]
    assert sorted(t.next_tokens([5])) == [6, 7]
    assert t.next_tokens([5, 6, 1]) == []  # leaf
    assert t.next_tokens([9]) == []  # off the trie
    assert t.lookup([5, 7, 1]) == 1 and t.lookup([5, 7]) is None
    assert t.remove([5, 7, 1]) and not t.remove([5, 7, 1])
    assert t.next_tokens([5]) == [6]
    assert t.remove([8, 1])
    assert t.next_tokens([]) == [5]  # branch of 8 pruned
    assert t.codes() == [0] and t.max_depth() == 3


def test_trie_refuses_prefix_docids():
    t = DocidTrie([([5, 6], 0)])
    with pytest.raises(ValueError):
        t.insert([5, 6, 7], 1)
    with pytest.raises(ValueError):
        t.insert([5], 2)


# ---------------------------------------------------------------------- schemes
def test_hierarchical_kmeans_is_deterministic_and_respects_c():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    p1, c1 = hierarchical_kmeans(x, k=3, c=10, seed=1)
    p2, c2 = hierarchical_kmeans(x, k=3, c=10, seed=1)
    assert p1 == p2 and sorted(c1) == sorted(c2)
    assert len({tuple(p) for p in p1}) == 120  # unique ids
    leaves: dict[tuple, int] = {}
    for p in p1:
        assert all(0 <= d < 3 for d in p[:-1]) and 0 <= p[-1] < 10
        leaves[tuple(p[:-1])] = leaves.get(tuple(p[:-1]), 0) + 1
    assert max(leaves.values()) <= 10


def test_hierarchical_kmeans_splits_identical_embeddings():
    paths, _ = hierarchical_kmeans(np.ones((9, 4), dtype=np.float32), k=3, c=3, seed=0)
    assert len({tuple(p) for p in paths}) == 9


def test_semantic_id_space_limit():
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.raises(IdSpaceExhaustedError):
        hierarchical_kmeans(x, k=2, c=2, max_depth=1)


def test_semantic_incremental_placement_and_exhaustion():
    tk = tokenize_fn(tiny_tokenizer())
    m = DocidMap("semantic", params={"k": 2, "c": 3, "seed": 0, "max_depth": 2})
    x = np.array([[0, 0], [0, 0.1], [10, 10], [10, 10.1]], dtype=np.float32)
    m.reserve(4)
    m.build_semantic(range(4), x, tk, 1)
    near = {m.strings[2].split()[0], m.strings[3].split()[0]}
    assert len(near) == 1 and len({m.strings[i] for i in range(4)}) == 4
    m.reserve(1)
    m.extend_semantic([4], np.array([[10, 10.05]], dtype=np.float32), tk, 1)
    assert m.strings[4].split()[0] in near and m.strings[4].split()[1] == "2"
    m.reserve(1)
    m.extend_semantic([5], np.array([[9, 9]], dtype=np.float32), tk, 1)  # its leaf is full now
    assert m.strings[5].split()[0] not in near
    m.check_unique()
    m.reserve(1)
    with pytest.raises(IdSpaceExhaustedError):
        m.extend_semantic([6], np.zeros((1, 2), dtype=np.float32), tk, 1)


def test_naive_ids_and_collision_is_a_clear_error():
    assert naive_string("d1#0", "d1") == "d1" and naive_string("d1#2", "d1") == "d1#2"
    tok = tiny_tokenizer()
    m = DocidMap("naive")
    m.reserve(2)
    with pytest.raises(DocidVocabularyError, match="same token sequence"):
        m.assign_naive([0, 1], ["doc-1", "doc-1"], tokenize_fn(tok), 1)


def test_docid_map_json_round_trip_and_validation():
    tok = tiny_tokenizer()
    tk = tokenize_fn(tok)
    m = DocidMap("semantic", params={"k": 2, "c": 2, "seed": 0})
    m.reserve(5)
    m.build_semantic(range(5), np.random.default_rng(1).normal(size=(5, 3)), tk, 1)
    m.deleted.add(2)
    m.trained |= {0, 1, 2, 3}
    back = DocidMap.from_json(m.to_json(), m.centroid_tensors())
    assert back.strings == m.strings and back.tokens == m.tokens
    assert back.deleted == {2} and back.searchable_codes() == [0, 1, 3]
    assert sorted(back.centroids) == sorted(m.centroids)
    assert back.fingerprint() == m.fingerprint()
    back.validate(vocab_size=len(tok), tok=tk, eos=1, head_rows=None)
    with pytest.raises(DocidVocabularyError, match="outside the model vocabulary"):
        back.validate(vocab_size=5, tok=None, eos=None, head_rows=None)
    back.tokens[0] = [7, 7, 1]
    with pytest.raises(DocidVocabularyError, match="no longer tokenizes"):
        back.validate(vocab_size=len(tok), tok=tk, eos=1, head_rows=None)


def test_atomic_capacity():
    m = DocidMap("atomic", params={"capacity": 3})
    m.reserve(3)
    with pytest.raises(IdSpaceExhaustedError):
        m.reserve(1)


# ---------------------------------------------------------------------- constrained decoding
_BACKBONES: dict[str, Backbone] = {}


def _backbone(kind: str) -> Backbone:
    if kind not in _BACKBONES:
        tok = tiny_tokenizer()
        _BACKBONES[kind] = Backbone(tiny_model(kind, len(tok)).eval(), tok)
    return _BACKBONES[kind]


docid_sets = st.lists(
    st.lists(st.integers(4, 60), min_size=1, max_size=4), min_size=1, max_size=12, unique_by=tuple
)


@pytest.mark.parametrize("kind", ["t5", "llama"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqs=docid_sets,
    deleted=st.sets(st.integers(0, 11)),
    beams=st.integers(1, 6),
    query=st.sampled_from(["quick fox", "cells gene cancer", "42", "a b c d e f g"]),
)
def test_constrained_beam_search_only_emits_valid_ids(kind, seqs, deleted, beams, query):
    """Property: whatever the weights, beam search returns only docids in the trie, never a
    deleted one, each at most once, at most `beams` of them."""
    bb = _backbone(kind)
    trie = DocidTrie(([*list(s), bb.eos_id], i) for i, s in enumerate(seqs))
    for code in deleted:
        if code < len(seqs):
            trie.remove([*list(seqs[code]), bb.eos_id])
    allowed = set(trie.codes())
    (hits,) = bb.generate([query], trie, num_beams=beams, max_length=16)
    codes = [c for c, _ in hits]
    assert set(codes) <= allowed
    assert not (set(codes) & {d for d in deleted if d < len(seqs)})
    assert len(codes) == len(set(codes)) <= max(1, min(beams, len(allowed)))
    assert all(np.isfinite(s) for _, s in hits)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    if allowed:
        assert hits, "a non-empty trie always yields at least one docid"


@pytest.mark.parametrize("kind", ["t5", "bart", "bert2bert", "llama"])
def test_every_backbone_decodes_batched_and_scores_are_log_probs(kind):
    bb = _backbone(kind)
    ids = ["doc-1", "doc-22", "42", "alpha beta", "gamma"]
    trie = DocidTrie(([*bb.tokenize(s), bb.eos_id], i) for i, s in enumerate(ids))
    res = bb.generate(["quick fox", "cells gene cancer protein"], trie, num_beams=5, max_length=32)
    assert len(res) == 2
    for hits in res:
        assert hits and all(s <= 0 for _, s in hits)  # sums of log-probabilities
    # a batched query scores like the same query alone
    (single,) = bb.generate(["quick fox"], trie, num_beams=5, max_length=32)
    assert [c for c, _ in single] == [c for c, _ in res[0]]
    assert [s for _, s in single] == pytest.approx([s for _, s in res[0]], abs=1e-4)


@pytest.mark.parametrize("kind", ["t5", "bart", "bert2bert", "llama"])
def test_head_input_matches_logit_lens_final_layer(kind):
    bb = _backbone(kind)
    batch = bb.inputs(["quick fox", "cells"], 32)
    h = bb.head_input(batch)
    assert h.shape == (2, bb.head_dim)
    states, final = bb.layer_states(bb.inputs(["quick fox"], 32))
    assert torch.allclose(final[0], h[0], atol=1e-5)
    assert len(states) == len(bb.decoder_layers()) + 1
