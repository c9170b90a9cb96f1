"""Raw text for unsupervised fine-tuning / continued pretraining: every token is learnt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.formatter import Formatter, Segment
from finetune_sdk.plugins.formatters.alpaca import leading_bos


class TextFormatter(Formatter):
    """A ``text`` column; documents are concatenated (each ending with EOS) and cut into ``max_length`` blocks,
    every token in the loss."""

    concatenates: ClassVar[bool] = True

    name: ClassVar[str] = "text"
    description: ClassVar[str] = "raw text (continued pretraining): every token learnt"
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("text",),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {"text": (str,)}
    example: ClassVar[Mapping[str, Any]] = {"text": "The cat sat on the mat."}

    def segments(self, row, tokenizer, options):
        return [Segment(leading_bos(tokenizer)), Segment(row["text"], train=True, literal=True),
                Segment(tokenizer.eos_token or "", train=True)]

    def prompt_segments(self, prompt, tokenizer, options):
        return [Segment(leading_bos(tokenizer)), Segment(prompt, literal=True)]

    def chat_format(self, tokenizer, options):
        return "raw"
