"""Tiny random backbones and a tiny BPE tokenizer for the generative-retrieval tests (no hub)."""

from __future__ import annotations

import functools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "protein folding cells cancer gene mutation insulin glucose",
    "0 1 2 3 4 5 6 7 8 9 10 42 doc-1 doc-22 alpha beta gamma delta",
    "volcano magma ash planet jupiter photosynthesis light energy",
]

DOCS = [
    {"id": "d0", "text": "the quick brown fox jumps", "metadata": {"g": 0, "y": 2000}},
    {"id": "d1", "text": "protein folding in cells", "metadata": {"g": 1, "y": 2001}},
    {"id": "d2", "text": "cancer gene mutation", "metadata": {"g": 0, "y": 2002}},
    {"id": "d3", "text": "lazy dog sleeps all day", "metadata": {"g": 1, "y": 2003}},
    {"id": "d4", "text": "alpha beta gamma delta", "metadata": {"g": 0, "y": 2004}},
    {"id": "d5", "text": "volcano magma and ash", "metadata": {"g": 1, "y": 2005}},
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXTS, trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )


def tiny_model(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(
            vocab_size=vocab, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        return T5ForConditionalGeneration(cfg)
    if kind == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        cfg = BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
            bos_token_id=3, decoder_start_token_id=1, forced_eos_token_id=None,
        )  # fmt: skip
        return BartForConditionalGeneration(cfg)
    if kind == "bert2bert":
        from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

        enc = BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )  # fmt: skip
        dec = BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, is_decoder=True,
            add_cross_attention=True,
        )  # fmt: skip
        cfg = EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.pad_token_id = 3, 0
        return EncoderDecoderModel(config=cfg)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            pad_token_id=0, eos_token_id=1, bos_token_id=3,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    raise ValueError(kind)


def tiny_retriever(kind: str = "t5", seed: int = 0, **kwargs):
    from intrinsic_retrieval.retrievers.generative import GenerativeDocidRetriever

    tok = tiny_tokenizer()
    kwargs.setdefault("show_progress", False)
    return GenerativeDocidRetriever(tiny_model(kind, len(tok), seed), tok, **kwargs)


#: fit() settings that make a tiny model memorise DOCS in about a second
MEMORISE = {
    "inputs": ("firstp",),
    "epochs": 60,
    "batch_size": 6,
    "lr": 1e-2,
    "warmup_steps": 1,
    "heldout_fraction": 0.0,
    "show_progress": False,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded (and do not thrash a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
