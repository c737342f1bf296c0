"""Test support (no downloads): tiny random models and the one tiny tokenizer they all share.

* `tokenizer`: the tiny byte-level BPE tokenizer every tiny model is built and saved with;
* `models`: tiny BERT / T5 / Llama backbones for the `intrinsic_retrieval.models` tests;
* `decoder`: tiny decoder-only LMs (Llama, Qwen2, Qwen3, Gemma 3) for in-context retrieval;
* `intra`: tiny encoder-decoders, one per INTRA architecture, and a tiny Gemma 3 for T5Gemma2;
* `generative`: tiny backbones, documents and fit settings for generative (docid) retrieval;
* `frameworks`: `Retriever` fakes for the LangChain / LlamaIndex adapter tests;
* `retrievers`: a small corpus and a small instance of every registered retriever (the protocol
  conformance suite and the framework integration suites share them).

Test modules import these as ``from support.<module> import ...`` (pytest puts ``tests/`` on
``sys.path``: the test directory has no ``__init__.py``). The `one_thread` fixture that tiny
models want lives in ``conftest.py``.
"""
