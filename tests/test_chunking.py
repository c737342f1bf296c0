from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intrinsic_retrieval import Document, DuplicateIdError, InvalidInputError
from intrinsic_retrieval.chunking import Chunker, tokenizer_spans, word_spans
from intrinsic_retrieval.types import as_document


def test_short_document_is_one_chunk():
    doc = Document(id="d", text="a short text", metadata={"x": 1})
    (chunk,) = Chunker(word_spans, 10, 2).split(doc)
    assert (chunk.id, chunk.document_id, chunk.text) == ("d#0", "d", doc.text)
    assert chunk.metadata == {"x": 1}


def test_windows_overlap_and_cover_the_text():
    text = " ".join(f"w{i}" for i in range(25))
    chunks = Chunker(word_spans, 10, 3).split(Document(id="d", text=text))
    words = [c.text.split() for c in chunks]
    assert all(len(w) <= 10 for w in words)
    assert words[0][-3:] == words[1][:3]  # overlap of 3 tokens
    assert words[-1][-1] == "w24"
    assert [c.id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]
    for c in chunks:
        assert text[c.start : c.end] == c.text


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 200), size=st.integers(1, 40), overlap_frac=st.floats(0, 0.9))
def test_every_token_is_in_some_chunk(n, size, overlap_frac):
    overlap = min(size - 1, int(size * overlap_frac))
    text = " ".join(f"t{i}" for i in range(n))
    chunks = Chunker(word_spans, size, overlap).split(Document(id="d", text=text))
    covered = {w for c in chunks for w in c.text.split()}
    assert covered == set(text.split())
    assert all(len(c.text.split()) <= size for c in chunks)


def test_whole_documents_when_chunk_size_is_none():
    text = "x " * 5000
    assert len(Chunker(word_spans, None).split(Document(id="d", text=text))) == 1


def test_bad_parameters():
    with pytest.raises(InvalidInputError):
        Chunker(word_spans, 0)
    with pytest.raises(InvalidInputError):
        Chunker(word_spans, 10, 10)


def test_duplicate_ids_in_batch():
    with pytest.raises(DuplicateIdError):
        Chunker().split_all([Document(id="a", text="x"), Document(id="a", text="y")])


def test_tokenizer_spans_follow_subword_boundaries(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    text = "Photosynthesis happens in chloroplasts. " * 40
    chunks = Chunker(tokenizer_spans(tok), 32, 8).split(Document(id="d", text=text))
    for c in chunks:
        assert len(tok(c.text, add_special_tokens=False)["input_ids"]) <= 32
    assert len(chunks) > 3


def test_as_document_accepts_common_shapes():
    assert as_document("plain").text == "plain"
    assert as_document("plain").id == as_document("plain").id  # stable content id
    d = as_document({"_id": 7, "text": "t", "metadata": {"a": 1}})
    assert (d.id, d.metadata) == ("7", {"a": 1})

    class LC:
        def __init__(self) -> None:
            self.page_content = "lc text"
            self.metadata = {"m": 2}
            self.id = "lc1"

    assert as_document(LC()) == Document(text="lc text", id="lc1", metadata={"m": 2})
    with pytest.raises(InvalidInputError):
        as_document({"title": "no text"})
    with pytest.raises(InvalidInputError):
        as_document(42)
