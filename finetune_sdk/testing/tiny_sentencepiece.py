"""A tiny SentencePiece-style tokenizer built in code: BPE over ``▁``-marked words with byte fallback, the form of
Llama 2's and Mistral's ``tokenizer.json`` (transformers' ``LlamaTokenizer``).

Example:
    >>> from finetune_sdk.testing.tiny_sentencepiece import tiny_sentencepiece_tokenizer
    >>> tok = tiny_sentencepiece_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("hello world", add_special_tokens=False)["input_ids"])[:1]
    ['▁hello']
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from finetune_sdk.testing.tiny import CHATML_TEMPLATE, CORPUS

BYTE_TOKENS = [f"<0x{byte:02X}>" for byte in range(256)]


@lru_cache(maxsize=2)
def _vocab_and_merges(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS],
                                  show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def tiny_sentencepiece_tokenizer(vocab_size: int = 600, chat_template: bool = True) -> Any:
    """A ``LlamaTokenizer`` (``<unk>``=0, ``<s>``=1, ``</s>``=2, 256 byte tokens) with ChatML markers and ``<pad>``
    added as special tokens; pieces never span a space, as SentencePiece's."""
    from transformers import LlamaTokenizer

    vocab, merges = _vocab_and_merges(vocab_size)
    tok = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), unk_token="<unk>", bos_token="<s>",
                         eos_token="</s>")
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok
