"""The one tiny tokenizer every tiny test model shares: a byte-level BPE trained in milliseconds
on a few lines of the tests' own vocabulary (no downloads).

Byte-level: any text maps to tokens, nothing is unknown (distinct document ids stay distinct).
Digits are split one per token, as in-context retrieval's document codes need. Special tokens
have fixed ids: `PAD` 0, `EOS` 1 (also the SEP token), `UNK` 2, `BOS` 3 (also the CLS token);
none is added around encoded text. No length limit is set: models bound it by their positions.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]
PAD, EOS, UNK, BOS = range(len(SPECIAL_TOKENS))
#: 256 byte tokens, the 4 special tokens and the merges learnt from `TEXTS`
VOCAB_SIZE = 320

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "protein folding cells cancer gene mutation insulin glucose",
    "0 1 2 3 4 5 6 7 8 9 10 42 doc-1 doc-22 alpha beta gamma delta",
    "volcano magma ash planet jupiter photosynthesis light energy",
    "hello world , the cat sat on the mat .",
    "vitamin study patients risk mice blood (Doc 0123456789) Query: The most relevant document is",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A fresh instance (callers may change its padding side). Another `vocab_size` gives
    another tokenizer (fewer or more merges), e.g. for fingerprint tests."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        sep_token="</s>",
        cls_token="<s>",
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (
        PAD,
        EOS,
        UNK,
        BOS,
    )
    return tok
