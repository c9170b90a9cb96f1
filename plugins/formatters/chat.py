"""Chat formatters over ``messages`` (a list of {role, content}) or ``prompt``/``completion`` (+ ``system``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.errors import DataError
from finetune_sdk.data.encoding import encode_run
from finetune_sdk.formatter import Formatter, Segment, literal_format
from finetune_sdk.plugins.formatters.template_rendering import TemplateRendering
from finetune_sdk.models.stop_tokens import template_end_of_turn

ROLES = ("system", "user", "assistant")


def conversation(row: Mapping[str, Any], options: Mapping[str, Any]) -> list[dict[str, str]]:
    """A row as a message list; ``system_prompt`` fills in a missing system message."""
    if row.get("messages") is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
    if options.get("system_prompt") and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": options["system_prompt"]})
    return messages


def prompt_conversation(prompt: str, options: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if options.get("system_prompt"):
        messages.insert(0, {"role": "system", "content": options["system_prompt"]})
    return messages


class ChatFormatter(Formatter):
    """Shared validation of chat rows."""

    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("messages",), ("prompt", "completion"))
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {
        "messages": (list,), "prompt": (str,), "completion": (str,), "system": (str,)}
    example: ClassVar[Mapping[str, Any]] = {"prompt": "What colour is the sky?", "completion": "Blue."}

    def validate(self, row: Mapping[str, Any], where: str) -> None:
        super().validate(row, where)
        if row.get("messages") is None:
            return
        messages = row["messages"]
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if message["role"] not in ROLES:
                raise DataError(
                    f"{where}: messages[{i}].role is {message['role']!r}; use one of {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: messages has no 'assistant' message to learn from")


class Llama2ChatFormatter(ChatFormatter):
    """Llama 2 chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>``, multi-turn."""

    name: ClassVar[str] = "llama2-chat"
    description: ClassVar[str] = "Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>"

    def _render(self, messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
        system: list[Segment] = []
        if messages and messages[0]["role"] == "system":
            system = literal_format("<<SYS>>\n{system}\n<</SYS>>\n\n", system=messages[0]["content"])
            messages = messages[1:]
        segments: list[Segment] = []
        for message in messages:
            if message["role"] == "user":
                segments += [Segment(f"{bos}[INST] "), *system,
                             *literal_format("{user} [/INST]", user=message["content"].strip())]
                system = []
            elif message["role"] == "assistant":
                segments += literal_format(" {answer} ", train=True, answer=message["content"].strip())
                segments.append(Segment(eos, train=True))
        return segments

    def segments(self, row, tokenizer, options):
        return self._render(conversation(row, options), tokenizer)

    def chat_format(self, tokenizer, options):
        return "llama2-chat"

    def prompt_segments(self, prompt, tokenizer, options):
        return self._render(prompt_conversation(prompt, options), tokenizer)


def chatml_turn(role: str, content: str) -> list[Segment]:
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` with the content as plain text."""
    return literal_format("<|im_start|>" + role + "\n{content}<|im_end|>\n", content=content)


class ChatMLFormatter(ChatFormatter):
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``; assistant turns (and their end marker) are learnt."""

    name: ClassVar[str] = "chatml"
    description: ClassVar[str] = "ChatML: <|im_start|>role\\n...<|im_end|>"

    def _end(self, tokenizer: Any) -> str:
        eos = tokenizer.eos_token or ""
        return "<|im_end|>" if eos == "<|im_end|>" else "<|im_end|>" + eos

    def end_of_turn(self, tokenizer: Any) -> list[str]:
        """``<|im_end|>`` ends an answer (the EOS trained after it stops generation too)."""
        return ["<|im_end|>"]

    def segments(self, row, tokenizer, options):
        segments: list[Segment] = []
        prompt: list[Segment] = []
        for message in conversation(row, options):
            if message["role"] == "assistant":
                segments += [*prompt, Segment("<|im_start|>assistant\n")]
                segments += [Segment(message["content"], train=True, literal=True),
                             Segment(self._end(tokenizer), train=True)]
                prompt = [Segment("\n")]
            else:
                prompt += chatml_turn(message["role"], message["content"])
        return segments

    def prompt_segments(self, prompt, tokenizer, options):
        turns = [s for m in prompt_conversation(prompt, options) for s in chatml_turn(m["role"], m["content"])]
        return [*turns, Segment("<|im_start|>assistant\n")]

    def chat_format(self, tokenizer, options):
        return "chatml"


class ChatTemplateFormatter(ChatFormatter):
    """The tokenizer's own chat template; each assistant message (and its end-of-turn marker) is learnt.

    Message contents are located in the rendered text and encoded as plain text, so only the template's own
    markers become special tokens. When the template's end-of-turn marker isn't the tokenizer's EOS, EOS is
    appended (and learnt) after the last assistant message, so the model learns to stop either way; whether the
    answer already ends the conversation with EOS is decided on token ids, never on the text.
    """

    name: ClassVar[str] = "chat-template"
    description: ClassVar[str] = "the tokenizer's own chat template over a messages list"

    def end_of_turn(self, tokenizer: Any) -> list[str]:
        """The marker the template puts after an answer (Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``...;
        :func:`~finetune_sdk.models.stop_tokens.template_end_of_turn`), else EOS."""
        return template_end_of_turn(tokenizer) or super().end_of_turn(tokenizer)

    def _template(self, tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "formatter 'chat-template': this tokenizer has no chat template; use 'chatml' or 'llama2-chat'")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, row, tokenizer, options):
        messages = conversation(row, options)
        rendering = TemplateRendering(self, tokenizer, messages)
        eos_id = tokenizer.eos_token_id
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = rendering.render(i, generation_prompt=True)
            full = rendering.render(i + 1, generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    "formatter 'chat-template': this chat template rewrites earlier turns, so the answer can't be"
                    " isolated for masking; use 'chatml' or 'llama2-chat'")
            answer = rendering.segments(len(prefix), len(full), train=True)
            is_last = not any(m["role"] == "assistant" for m in messages[i + 1:])
            if is_last and eos_id is not None and eos_id not in encode_run(answer, tokenizer):
                answer.append(Segment(tokenizer.eos_token, train=True))  # the conversation ends with EOS
            segments += [*rendering.segments(len(done), len(prefix)), *answer]
            done = full
        return segments

    def prompt_segments(self, prompt, tokenizer, options):
        messages = prompt_conversation(prompt, options)
        rendering = TemplateRendering(self, tokenizer, messages)
        return rendering.segments(0, len(rendering.render(len(messages), generation_prompt=True)))

    def chat_format(self, tokenizer, options):
        return "tokenizer"
