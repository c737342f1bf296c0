"""Label-free training data: LM-written queries, cached in the store, resumable, and `fit()`
without labeled queries for the retrievers that learn from queries."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.decoder import save_causal_lm
from support.intra import save

from intrinsic_retrieval.errors import InvalidInputError
from intrinsic_retrieval.retrievers.intra import IntraRetriever
from intrinsic_retrieval.training.queries import (
    AUX_NAME,
    ExtractiveQueryGenerator,
    LMQueryGenerator,
    cached_queries,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOPICS = ["protein folding", "solar panels", "river ecology", "vaccine trials", "jazz history"]
DOCS = [{"id": f"d{i}", "text": f"note {i} on {TOPICS[i]} and its history"} for i in range(5)]


class Counting:
    """A generator that records every text it is asked about (and can fail on demand)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.seen: list[str] = []
        self.fail_after = fail_after

    def fingerprint(self) -> str:
        return "counting-v1"

    def generate(self, texts, n):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt  # an interruption half-way
        self.seen.extend(texts)
        return [[f"about {t.split(' on ')[-1]} {i}" for i in range(n)] for t in texts]


@pytest.fixture
def intra(tmp_path: Path) -> IntraRetriever:
    models = tmp_path / "models"
    r = IntraRetriever(save("t5", models), path=tmp_path / "idx", show_progress=False, k0=2,
                       pooled=4, retrieval_tokens=3, store_dtype="float32")  # fmt: skip
    r.add(DOCS)
    return r


def test_queries_are_cached_in_the_store_and_resumed(intra: IntraRetriever) -> None:
    docs = [(d["id"], d["text"]) for d in DOCS]
    gen = Counting(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cached_queries(intra.store, docs, gen, 2, batch_size=2)
    assert len(gen.seen) == 2  # the first batch was written before the interruption
    gen.fail_after = None
    out = cached_queries(intra.store, docs, gen, 2, batch_size=2)
    assert len(gen.seen) == 5  # only the three missing documents were generated
    assert out["d3"] == ["about vaccine trials and its history 0",
                         "about vaccine trials and its history 1"]  # fmt: skip
    again = Counting()
    assert cached_queries(intra.store, docs, again, 1) == {d: q[:1] for d, q in out.items()}
    assert again.seen == []  # same fingerprint: nothing regenerated
    assert intra.store.get_aux(AUX_NAME) is not None


def test_fit_without_labels_trains_on_generated_queries(intra: IntraRetriever) -> None:
    gen = Counting()
    rep = intra.fit(query_generator=gen, queries_per_doc=2, epochs=2, batch_size=5, lr=3e-2)
    assert rep.num_examples == 10 and rep.completed and intra.trained
    assert len(gen.seen) == 5
    again = intra.fit(query_generator=Counting(), queries_per_doc=2, max_steps=1)
    assert again.num_examples == 10  # read back from the store's cache
    with pytest.raises(InvalidInputError, match="queries_per_doc"):
        intra.fit(query_generator=gen, queries_per_doc=0)


def test_lm_query_generator_on_a_tiny_lm(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_causal_lm(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    gen = LMQueryGenerator(model, tok, chat=False, max_new_tokens=6, batch_size=2,
                           show_progress=False)  # fmt: skip
    texts = [d["text"] for d in DOCS[:3]]
    out = gen.generate(texts, 2)
    assert len(out) == 3 and all(len(qs) <= 2 for qs in out)
    assert gen.generate(texts, 2) == out  # seeded sampling
    assert gen.fingerprint() == LMQueryGenerator(model, tok, chat=False, max_new_tokens=6,
                                                 show_progress=False).fingerprint()  # fmt: skip
    assert gen._parse(["1. what is x?\n2) why y"], 3) == ["what is x?"]  # base: first line
    gen.chat = True
    assert gen._parse(["1. what is x?\n2) why is y?\n- What is x?\nok then"], 3) == [
        "what is x?", "why is y?"
    ]  # fmt: skip
    # the prompt's own example is not a query about the passage
    assert gen._parse(["How does aspirin affect platelets?\nwhat is ice?"], 2) == ["what is ice?"]
    # no question written: the first sentence of each line stands in
    assert gen._parse(["This passage is about ice. It says more."], 2) == [
        "This passage is about ice."
    ]  # fmt: skip


def test_extractive_generator_fingerprint_is_stable() -> None:
    from intrinsic_retrieval.training.queries import generator_fingerprint

    a, b = ExtractiveQueryGenerator(seed=1), ExtractiveQueryGenerator(seed=1)
    assert generator_fingerprint(a) == generator_fingerprint(b)
    assert generator_fingerprint(a) != generator_fingerprint(ExtractiveQueryGenerator(seed=2))


@pytest.mark.slow
def test_smollm2_writes_questions_about_scifact(scifact) -> None:
    gen = LMQueryGenerator("smollm2", show_progress=False)
    texts = [d.text for d in list(scifact.corpus.values())[:3]]
    out = gen.generate(texts, 3)
    assert all(1 <= len(qs) <= 3 for qs in out)
    assert all(len(q.split()) >= 2 for qs in out for q in qs)
