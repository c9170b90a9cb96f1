"""Prompts without answers, for online reinforcement learning (GRPO): ``prompt`` (+ ``system``) rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.formatter import PROMPT, Formatter, Segment
from finetune_sdk.plugins.formatters.chat import ChatMLFormatter, ChatTemplateFormatter


class PromptFormatter(Formatter):
    """A prompt the policy answers itself (GRPO samples the answers); rendered with the tokenizer's chat template
    (or ChatML when it has none) up to where the answer starts. Nothing in a row is learnt from directly: the
    other columns of a row (e.g. ``answer``) are handed to the reward functions as keyword arguments."""

    name: ClassVar[str] = "prompt"
    description: ClassVar[str] = "prompts only, answered by the policy for online RL (GRPO; chat template or ChatML)"
    task: ClassVar[str] = PROMPT
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("prompt",),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {"prompt": (str,), "system": (str,)}
    example: ClassVar[Mapping[str, Any]] = {"prompt": "Name a colour of the sky."}

    def _chat(self, tokenizer: Any) -> Formatter:
        return ChatTemplateFormatter() if getattr(tokenizer, "chat_template", None) else ChatMLFormatter()

    def segments(self, row: Mapping[str, Any], tokenizer: Any, options: Mapping[str, Any]) -> list[Segment]:
        """The row's prompt (and its ``system`` message, if any) up to where the answer starts."""
        if row.get("system"):
            options = {**options, "system_prompt": row["system"]}
        return self.prompt_segments(row["prompt"], tokenizer, options)

    def prompt_segments(self, prompt: str, tokenizer: Any, options: Mapping[str, Any]) -> list[Segment]:
        return self._chat(tokenizer).prompt_segments(prompt, tokenizer, options)

    def chat_format(self, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        """The format of the chat formatter the prompts are rendered with (the template's, or ChatML)."""
        return self._chat(tokenizer).chat_format(tokenizer, options)

    def end_of_turn(self, tokenizer: Any) -> list[str]:
        """Where the policy's answer ends: the chat format's end of turn (chat template or ChatML)."""
        return self._chat(tokenizer).end_of_turn(tokenizer)
