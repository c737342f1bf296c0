"""Pseudo-queries for training without labeled queries (the DSI-QG recipe).

`QueryGenerator` is anything that writes `n` queries per text. Three ship:

* `LMQueryGenerator`: a packaged causal LM (SmolLM2-135M-Instruct through its chat template,
  or Gemma 3 270M base through a few-shot prompt) writes questions the passage answers, batched;
  the only one that adds words the document lacks.
* `Doc2QueryGenerator`: sampled queries from a seq2seq doc2query model, if you have one.
* `ExtractiveQueryGenerator`: model-free (first sentence, TF-IDF keywords, other sentences).

`cached_queries` keeps what a generator wrote in the store (keyed by the generator's
fingerprint), batch by batch, so an interrupted run resumes and a second `fit` regenerates
nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from ..errors import InvalidInputError


@runtime_checkable
class QueryGenerator(Protocol):
    """Anything that writes `n` pseudo-queries for each text."""

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]: ...


_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-]+")
_STOP_WORDS = """
    a an and are as at be been being but by can could did do does for from had has have how
    in into is it its may might more most no not of on or our than that the their them then
    there these they this those to was we were what when where which while who whom why will
    with within without would also between both each such using used use via after before
    during however here other over under than
"""
_STOP = frozenset(_STOP_WORDS.split())


class ExtractiveQueryGenerator:
    """Model-free pseudo-queries, for when no doc2query model is available.

    Query *i* of a document is, in turn: (0) its title/first sentence cut to `max_words`;
    (1) the `keywords` terms with the highest TF-IDF in the document (IDF over the texts given
    in one call, i.e. the corpus being indexed), in document order; (2+) a random other sentence
    cut to `max_words`. Deterministic for a given `seed`. These mimic the short, term-heavy
    queries of scientific search much better than they mimic natural questions; they narrow the
    length gap between indexing inputs and queries but add no vocabulary the document lacks.
    """

    def __init__(self, *, max_words: int = 16, keywords: int = 6, seed: int = 0) -> None:
        self.max_words, self.keywords, self.seed = max_words, keywords, seed

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]:
        docs_terms = [[w.lower() for w in _WORD.findall(t)] for t in texts]
        df = Counter(w for terms in docs_terms for w in set(terms))
        n_docs = max(1, len(texts))
        out: list[list[str]] = []
        for i, (text, terms) in enumerate(zip(texts, docs_terms, strict=True)):
            rng = random.Random(f"{self.seed}:{i}:{text[:64]}")
            sents = [s.strip() for s in _SENT.split(text) if len(s.split()) >= 3] or [text]
            tf = Counter(w for w in terms if w not in _STOP)
            score = {w: c * math.log((1 + n_docs) / (1 + df[w])) for w, c in tf.items()}
            top = set(sorted(score, key=lambda w: (-score[w], w))[: self.keywords])
            seen: set[str] = set()
            kw = [w for w in terms if w in top and not (w in seen or seen.add(w))]  # type: ignore[func-returns-value]
            queries: list[str] = []
            for j in range(n):
                if j == 0:
                    q = " ".join(sents[0].split()[: self.max_words])
                elif j == 1 and kw:
                    q = " ".join(kw)
                else:
                    q = " ".join(rng.choice(sents).split()[: self.max_words])
                queries.append(q)
            out.append(queries)
        return out


class Doc2QueryGenerator:
    """Sampled queries from a seq2seq doc2query model (e.g. docT5query), if you have one."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_input_length: int = 256,
        max_new_tokens: int = 32,
        top_k: int = 10,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_input_length, self.max_new_tokens = max_input_length, max_new_tokens
        self.top_k, self.batch_size, self.seed = top_k, batch_size, seed

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]:
        import torch

        torch.manual_seed(self.seed)
        out: list[list[str]] = []
        device = next(self.model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            part = list(texts[i : i + self.batch_size])
            enc = self.tokenizer(
                part,
                truncation=True,
                max_length=self.max_input_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                gen = self.model.generate(
                    **enc,
                    do_sample=True,
                    top_k=self.top_k,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=n,
                )
            decoded = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
            out.extend(decoded[j * n : (j + 1) * n] for j in range(len(part)))
        return out


#: the chat instruction, after one worked example (without it SmolLM2-135M mostly summarises
#: the passage instead of asking about it); Gemma 3 base gets a few-shot prompt instead
INSTRUCTION = "Write {n} questions that this passage answers, one per line.\n\nPassage: {text}"
EXAMPLE_PASSAGE = (
    "Aspirin irreversibly inhibits cyclooxygenase, which reduces thromboxane production in "
    "platelets and lowers the risk of clotting."
)
EXAMPLE_QUESTIONS = (
    "How does aspirin affect platelets?\nWhat enzyme does aspirin inhibit?\n"
    "Does aspirin lower the risk of blood clots?"
)
FEW_SHOT = (
    "Passage: Aspirin irreversibly inhibits cyclooxygenase, reducing thromboxane production in "
    "platelets.\nQuestion: how does aspirin affect platelets?\n\n"
    "Passage: The Amazon rainforest produces about six percent of the world's oxygen.\n"
    "Question: how much oxygen does the amazon produce?\n\n"
    "Passage: {text}\nQuestion:"
)
_EXAMPLES = {
    q.strip().lower()
    for q in (*EXAMPLE_QUESTIONS.split("\n"), *re.findall(r"Question: (.+)", FEW_SHOT))
}
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)]|q\d*[:.)])\s*", re.IGNORECASE)


class LMQueryGenerator:
    """Questions written by a causal LM: ``"smollm2"`` (SmolLM2-135M-Instruct, chat prompt; the
    default) or ``"gemma3"`` (Gemma 3 270M base, few-shot prompt, one sampled question per
    sequence), a directory, a ``.gguf`` file or a hub id (with `chat` saying which prompt).

    Sampling (`temperature`, `top_p`) is seeded per batch: the same documents in the same order
    get the same queries (and `cached_queries` keeps them). Texts are cut to `max_input_chars`
    before prompting."""

    def __init__(
        self,
        model: str | Any = "smollm2",
        tokenizer: Any = None,
        *,
        chat: bool | None = None,
        max_new_tokens: int = 48,
        max_input_chars: int = 1200,
        temperature: float = 0.7,
        top_p: float = 0.9,
        batch_size: int = 8,
        device: str | None = None,
        seed: int = 0,
        show_progress: bool = True,
    ) -> None:
        if isinstance(model, str):
            from ..models.loading import load_model
            from ..retrievers.incontext.retriever import packaged_model_path

            self.name = model
            model, tokenizer = load_model(packaged_model_path(model), kind="causal", device=device)
            chat = (self.name == "smollm2") if chat is None else chat
        elif tokenizer is None:
            raise InvalidInputError("pass the tokenizer together with a model object")
        else:
            self.name = type(model).__name__
        self.model, self.tokenizer = model.eval(), tokenizer
        self.chat = (
            bool(chat)
            if chat is not None
            else getattr(tokenizer, "chat_template", None) is not None
        )
        self.max_new_tokens, self.max_input_chars = int(max_new_tokens), int(max_input_chars)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.batch_size, self.seed, self.show_progress = int(batch_size), int(seed), show_progress
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"

    def fingerprint(self) -> str:
        """What determines the queries: model weights, prompt and sampling settings."""
        from ..models.fingerprint import model_fingerprint

        prompts = [INSTRUCTION, EXAMPLE_PASSAGE, EXAMPLE_QUESTIONS, FEW_SHOT]
        sampling = [self.max_new_tokens, self.max_input_chars, self.temperature, self.top_p]
        settings = [self.chat, self.seed, *sampling, *prompts]
        h = hashlib.sha256(json.dumps(settings).encode())
        h.update(model_fingerprint(self.model).encode())
        return h.hexdigest()

    def _prompt(self, text: str, n: int) -> str:
        text = " ".join(text.split())[: self.max_input_chars]
        if self.chat:
            msg = [
                {"role": "user", "content": INSTRUCTION.format(n=3, text=EXAMPLE_PASSAGE)},
                {"role": "assistant", "content": EXAMPLE_QUESTIONS},
                {"role": "user", "content": INSTRUCTION.format(n=n, text=text)},
            ]
            return self.tokenizer.apply_chat_template(
                msg, tokenize=False, add_generation_prompt=True
            )
        return FEW_SHOT.format(text=text)

    def _parse(self, outputs: list[str], n: int) -> list[str]:
        """Questions (lines ending in "?") when the model wrote any; else the first sentence of
        each line, cut to 24 words. Numbering, duplicates, the prompt's example questions and
        run-on lines (over 40 words) are dropped."""
        lines: list[str] = []
        for out in outputs:
            for line in out.split("\n") if self.chat else out.split("\n")[:1]:
                q = _NUMBERING.sub("", line).strip().strip('"')
                if len(q.split()) >= 2:
                    lines.append(q)
        # the prompt's own example questions and run-on repetitions are not queries
        lines = [q for q in lines if q.lower() not in _EXAMPLES and len(q.split()) <= 40]
        questions = [q for q in lines if q.endswith("?")]
        if not questions:
            questions = [" ".join(_SENT.split(q)[0].split()[:24]) for q in lines]
        found: list[str] = []
        for q in questions:
            if q.lower() not in {f.lower() for f in found}:
                found.append(q)
        return found[:n]

    def generate(self, texts: Sequence[str], n: int) -> list[list[str]]:
        import torch

        out: list[list[str]] = []
        device = next(self.model.parameters()).device
        # a chat model writes n questions in one answer; a base model one per sampled sequence
        per_text = 1 if self.chat else n
        bar = tqdm(total=len(texts), desc="writing queries", unit="doc",
                   disable=not self.show_progress)  # fmt: skip
        with bar:
            for i in range(0, len(texts), self.batch_size):
                part = list(texts[i : i + self.batch_size])
                enc = self.tokenizer(
                    [self._prompt(t, n) for t in part],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=not self.chat,
                ).to(device)
                seed = int(
                    hashlib.sha256(f"{self.seed}:{i}:{part[0][:200]}".encode()).hexdigest()[:8], 16
                )
                with torch.no_grad(), torch.random.fork_rng():
                    torch.manual_seed(seed)
                    gen = self.model.generate(
                        **enc,
                        do_sample=True,
                        temperature=self.temperature,
                        top_p=self.top_p,
                        max_new_tokens=self.max_new_tokens * (n if self.chat else 1),
                        num_return_sequences=per_text,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                texts_out = self.tokenizer.batch_decode(
                    gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for j in range(len(part)):
                    out.append(self._parse(texts_out[j * per_text : (j + 1) * per_text], n))
                bar.update(len(part))
        return out


def generator_fingerprint(generator: QueryGenerator) -> str:
    fp = getattr(generator, "fingerprint", None)
    if callable(fp):
        return str(fp())
    state = {k: v for k, v in vars(generator).items() if isinstance(v, int | float | str | bool)}
    return hashlib.sha256(
        json.dumps([type(generator).__name__, state], sort_keys=True).encode()
    ).hexdigest()


AUX_NAME = "generated_queries"


def cached_queries(
    store: Any,
    docs: Sequence[tuple[str, str]],
    generator: QueryGenerator,
    n: int,
    *,
    batch_size: int = 32,
) -> dict[str, list[str]]:
    """``{document id: n queries}`` for `docs` (id, text): read from the store's cache where this
    generator already wrote them, generated (and persisted batch by batch) where not."""
    fp = generator_fingerprint(generator)
    found = store.get_aux(AUX_NAME)
    meta = found[1] if found is not None else {}
    cache: dict[str, list[str]] = {}
    if meta.get("generator") == fp and int(meta.get("n", -1)) >= n:
        cache = {d: list(qs) for d, qs in meta.get("queries", {}).items()}
    todo = [(d, t) for d, t in docs if d not in cache]
    for i in range(0, len(todo), batch_size):
        part = todo[i : i + batch_size]
        written = generator.generate([t for _, t in part], n)
        if len(written) != len(part):
            raise InvalidInputError(
                f"query generator returned {len(written)} query lists for {len(part)} texts"
            )
        cache.update({d: list(qs) for (d, _), qs in zip(part, written, strict=True)})
        if not store.read_only:
            store.put_aux(AUX_NAME, {}, {"generator": fp, "n": n, "queries": cache})
    return {d: cache[d][:n] for d, _ in docs}
