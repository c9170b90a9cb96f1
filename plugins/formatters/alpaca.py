"""Alpaca: ``instruction`` (+ optional ``input``) -> ``output``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.formatter import Formatter, Segment, literal_format

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def leading_bos(tokenizer: Any) -> str:
    """The BOS token string when the tokenizer would add one by itself (Llama-style), else ''."""
    if tokenizer.bos_token and getattr(tokenizer, "add_bos_token", False):
        return tokenizer.bos_token
    return ""


class AlpacaFormatter(Formatter):
    """The Stanford Alpaca prompt; the response and EOS are learnt."""

    name: ClassVar[str] = "alpaca"
    description: ClassVar[str] = "Stanford Alpaca: instruction (+ input) -> output"
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("instruction", "output"),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {
        "instruction": (str,), "input": (str,), "output": (str,)}
    example: ClassVar[Mapping[str, Any]] = {"instruction": "Name a colour.", "input": "", "output": "Blue."}

    def _prompt(self, instruction: str, input_text: str | None, tokenizer: Any) -> list[Segment]:
        template = WITH_INPUT if input_text else WITHOUT_INPUT
        return [Segment(leading_bos(tokenizer)), *literal_format(template, instruction=instruction, input=input_text)]

    def segments(self, row, tokenizer, options):
        return [*self._prompt(row["instruction"], row.get("input"), tokenizer),
                Segment(row["output"], train=True, literal=True), Segment(tokenizer.eos_token or "", train=True)]

    def prompt_segments(self, prompt, tokenizer, options):
        return self._prompt(prompt, None, tokenizer)

    def chat_format(self, tokenizer, options):
        return "alpaca"
