"""Preference pairs for DPO: ``prompt``, ``chosen``, ``rejected`` (+ ``system``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.formatter import Formatter, Segment
from finetune_sdk.plugins.formatters.chat import ChatMLFormatter, ChatTemplateFormatter


class ChatAnswers:
    """Renders a row's ``prompt`` (+ ``system``) with one answer through the tokenizer's chat template, or ChatML when
    it has none (the preference and KTO formatters)."""

    def _chat(self, tokenizer: Any) -> Formatter:
        return ChatTemplateFormatter() if getattr(tokenizer, "chat_template", None) else ChatMLFormatter()

    def _answer(self, row: Mapping[str, Any], answer: str, tokenizer: Any, options: Any) -> list[Segment]:
        chat_row = {"prompt": row["prompt"], "completion": answer}
        if row.get("system"):
            chat_row["system"] = row["system"]
        return self._chat(tokenizer).segments(chat_row, tokenizer, options)

    def prompt_segments(self, prompt, tokenizer, options):
        return self._chat(tokenizer).prompt_segments(prompt, tokenizer, options)

    def chat_format(self, tokenizer, options):
        """The format of the chat formatter the prompts are rendered with (the template's, or ChatML)."""
        return self._chat(tokenizer).chat_format(tokenizer, options)

    def end_of_turn(self, tokenizer: Any) -> list[str]:
        """The end of turn of the chat format the answers are rendered in (chat template or ChatML)."""
        return self._chat(tokenizer).end_of_turn(tokenizer)


class PreferenceFormatter(ChatAnswers, Formatter):
    """A prompt with a preferred and a dispreferred answer; rendered with the tokenizer's chat template (or ChatML
    when it has none), the answers and their end markers learnt."""

    name: ClassVar[str] = "preference"
    description: ClassVar[str] = "prompt + chosen/rejected answers for DPO (chat template or ChatML)"
    task: ClassVar[str] = "preference"
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("prompt", "chosen", "rejected"),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {
        "prompt": (str,), "chosen": (str,), "rejected": (str,), "system": (str,)}
    example: ClassVar[Mapping[str, Any]] = {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.",
                                            "rejected": "No."}


    def pair_segments(self, row: Mapping[str, Any], tokenizer: Any,
                      options: Mapping[str, Any]) -> tuple[list[Segment], list[Segment]]:
        """Segments of (prompt + chosen) and (prompt + rejected)."""
        return (self._answer(row, row["chosen"], tokenizer, options),
                self._answer(row, row["rejected"], tokenizer, options))

    def segments(self, row, tokenizer, options):
        return self.pair_segments(row, tokenizer, options)[0]

    def text_and_label(self, row):
        """Not used directly: the classifier technique expands each pair into a chosen and a rejected row."""
        return row["prompt"] + "\n" + row["chosen"], "chosen"
