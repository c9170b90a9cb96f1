"""A chat template's output with each message's content located in it, so content is encoded as plain text."""

from __future__ import annotations

from typing import Any

from finetune_sdk.errors import DataError
from finetune_sdk.formatter import Segment

#: Private-use characters around a message index: no template rewrites them and no tokenizer treats them specially.
OPEN, CLOSE = "\ue000", "\ue001"


class TemplateRendering:
    """Renders ``messages[:n]`` with a chat template and remembers where each message's content lies.

    The template is first rendered with a placeholder per content; when putting the contents back gives exactly
    what the template renders with them (the template doesn't trim or rewrite content), the placeholders'
    positions are the contents' spans. Otherwise each content (or its stripped form) is searched for in order. A
    content holding a special-token string that can't be located is an error: it can't be kept out of the control
    tokens.
    """

    def __init__(self, formatter: Any, tokenizer: Any, messages: list[dict[str, str]]) -> None:
        self.formatter = formatter
        self.tokenizer = tokenizer
        self.messages = messages
        self.text = ""
        self.spans: list[tuple[int, int]] = []

    def render(self, n: int, generation_prompt: bool) -> str:
        """The template's text for ``messages[:n]``; its content spans become those :meth:`segments` uses."""
        messages = self.messages[:n]
        text = self.formatter._template(self.tokenizer, messages, generation_prompt)
        spans = self._placeholder_spans(messages, generation_prompt, text)
        self.text, self.spans = text, spans if spans is not None else self._searched_spans(messages, text)
        return text

    def segments(self, start: int, end: int, train: bool = False) -> list[Segment]:
        """``text[start:end]`` as segments: contents literal, the template's own text not."""
        out: list[Segment] = []
        pos = start
        for span_start, span_end in self.spans:
            if span_end <= pos or span_start >= end:
                continue
            lo, hi = max(span_start, pos), min(span_end, end)
            if lo > pos:
                out.append(Segment(self.text[pos:lo], train=train))
            out.append(Segment(self.text[lo:hi], train=train, literal=True))
            pos = hi
        if end > pos:
            out.append(Segment(self.text[pos:end], train=train))
        return out

    def _placeholder_spans(self, messages: list[dict[str, str]], generation_prompt: bool,
                           expected: str) -> list[tuple[int, int]] | None:
        marked = [{**m, "content": f"{OPEN}{i}{CLOSE}"} for i, m in enumerate(messages)]
        try:
            rendered = self.formatter._template(self.tokenizer, marked, generation_prompt)
        except Exception:  # noqa: BLE001 - a template that inspects content: locate it by search instead
            return None
        text, spans, pos = "", [], 0
        while (open_at := rendered.find(OPEN, pos)) >= 0:
            close_at = rendered.find(CLOSE, open_at)
            index = rendered[open_at + 1:close_at]
            if close_at < 0 or not index.isdigit() or int(index) >= len(messages):
                return None
            text += rendered[pos:open_at]
            content = messages[int(index)]["content"]
            spans.append((len(text), len(text) + len(content)))
            text += content
            pos = close_at + 1
        text += rendered[pos:]
        return spans if text == expected else None

    def _searched_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
        specials = [t for t in getattr(self.tokenizer, "all_special_tokens", []) if t]
        spans, pos = [], 0
        for message in messages:
            for content in (message["content"], message["content"].strip()):
                at = text.find(content, pos) if content else -1
                if at >= 0:
                    spans.append((at, at + len(content)))
                    pos = at + len(content)
                    break
            else:
                if any(t in message["content"] for t in specials):
                    raise DataError(
                        f"formatter 'chat-template': a {message['role']} message holds a special-token string and "
                        "the chat template rewrites the message, so it can't be kept as plain text; use 'chatml' "
                        "or 'llama2-chat'")
        return spans
