"""Chat formatters over ``messages`` (a list of {role, content}) or ``prompt``/``completion`` (+ ``system``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.errors import DataError
from finetune_sdk.formatter import Formatter, Segment

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
        system = ""
        if messages and messages[0]["role"] == "system":
            system = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n"
            messages = messages[1:]
        segments: list[Segment] = []
        for message in messages:
            if message["role"] == "user":
                segments.append(Segment(f"{bos}[INST] {system}{message['content'].strip()} [/INST]"))
                system = ""
            elif message["role"] == "assistant":
                segments.append(Segment(f" {message['content'].strip()} {eos}", train=True))
        return segments

    def segments(self, row, tokenizer, options):
        return self._render(conversation(row, options), tokenizer)

    def prompt_segments(self, prompt, tokenizer, options):
        return self._render(prompt_conversation(prompt, options), tokenizer)


class ChatMLFormatter(ChatFormatter):
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``; assistant turns (and their end marker) are learnt."""

    name: ClassVar[str] = "chatml"
    description: ClassVar[str] = "ChatML: <|im_start|>role\\n...<|im_end|>"

    def _end(self, tokenizer: Any) -> str:
        eos = tokenizer.eos_token or ""
        return "<|im_end|>" if eos == "<|im_end|>" else "<|im_end|>" + eos

    def segments(self, row, tokenizer, options):
        segments: list[Segment] = []
        prompt = ""
        for message in conversation(row, options):
            if message["role"] == "assistant":
                segments.append(Segment(prompt + "<|im_start|>assistant\n"))
                segments.append(Segment(message["content"] + self._end(tokenizer), train=True))
                prompt = "\n"
            else:
                prompt += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
        return segments

    def prompt_segments(self, prompt, tokenizer, options):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in prompt_conversation(prompt, options))
        return [Segment(text + "<|im_start|>assistant\n")]


class ChatTemplateFormatter(ChatFormatter):
    """The tokenizer's own chat template; each assistant message (and its end-of-turn marker) is learnt.

    When the template's end-of-turn marker isn't the tokenizer's EOS, EOS is appended (and learnt) after the last
    assistant message, so the model learns to stop either way.
    """

    name: ClassVar[str] = "chat-template"
    description: ClassVar[str] = "the tokenizer's own chat template over a messages list"

    def _template(self, tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "formatter 'chat-template': this tokenizer has no chat template; use 'chatml' or 'llama2-chat'")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, row, tokenizer, options):
        messages = conversation(row, options)
        eos = tokenizer.eos_token or ""
        segments: list[Segment] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self._template(tokenizer, messages[:i], generation_prompt=True)
            full = self._template(tokenizer, messages[: i + 1], generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError(
                    "formatter 'chat-template': this chat template rewrites earlier turns, so the answer can't be"
                    " isolated for masking; use 'chatml' or 'llama2-chat'")
            answer = full[len(prefix):]
            is_last = not any(m["role"] == "assistant" for m in messages[i + 1:])
            if is_last and eos and eos not in answer:
                answer += eos  # the template ends turns with its own marker; the conversation ends with EOS
            segments += [Segment(prefix[len(done):]), Segment(answer, train=True)]
            done = full
        return segments

    def prompt_segments(self, prompt, tokenizer, options):
        return [Segment(self._template(tokenizer, prompt_conversation(prompt, options), generation_prompt=True))]
