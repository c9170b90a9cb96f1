"""The ``sharegpt`` formatter: ``conversations`` lists of ``{"from", "value"}`` turns, rendered as ChatML."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.errors import DataError
from finetune_sdk.formatter import Formatter, Segment

COLUMN = "conversations"
#: ShareGPT speaker names (and their OpenAI-style synonyms) -> ChatML roles.
ROLES: Mapping[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _turn(role: str, text: str) -> list[Segment]:
    """One ChatML turn; the text is user content, encoded as plain text (never as control tokens)."""
    return [Segment(f"{IM_START}{role}\n"), Segment(text, literal=True), Segment(f"{IM_END}\n")]


class ShareGPTFormatter(Formatter):
    """ShareGPT conversations as ChatML: ``<|im_start|>role\\n...<|im_end|>\\n`` per turn.

    Turn values are literal segments: a special-token string inside a message stays plain text. Only the ``gpt``
    turns are learnt: each answer with its ``<|im_end|>``, and after the last answer the tokenizer's
    EOS as well (when EOS isn't ``<|im_end|>`` itself). Turns after the last answer have nothing to learn and are
    left out. The ``system_prompt`` option adds a system turn to conversations that have none.

    Example:
        >>> from finetune_sdk_sharegpt import ShareGPTFormatter
        >>> row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
        >>> tok = type("Tok", (), {"eos_token": "</s>"})()
        >>> [(s.text, s.train) for s in ShareGPTFormatter().segments(row, tok, {})]
        [('<|im_start|>user\\n', False), ('hi', False), ('<|im_end|>\\n', False), ('<|im_start|>assistant\\n', False), ('hello', True), ('<|im_end|></s>', True)]
    """

    name: ClassVar[str] = "sharegpt"
    description: ClassVar[str] = (
        "ShareGPT conversations [{from: system|human|gpt, value}] as ChatML; the gpt turns are learnt")
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = ((COLUMN,),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {COLUMN: (list,)}
    example: ClassVar[Mapping[str, Any]] = {
        COLUMN: [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "What colour is the sky?"},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "And at night?"},
            {"from": "gpt", "value": "Black, with stars."},
        ]
    }

    def validate(self, row: Mapping[str, Any], where: str) -> None:
        super().validate(row, where)  # the column is there and is a list
        turns = row[COLUMN]
        if not turns:
            raise DataError(f"{where}: {COLUMN} is empty; give at least one 'human' and one 'gpt' turn")
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or not {"from", "value"} <= set(turn):
                raise DataError(
                    f"{where}: {COLUMN}[{i}] must be an object with 'from' and 'value', got {_short(turn)}")
            if turn["from"] not in ROLES:
                raise DataError(
                    f"{where}: {COLUMN}[{i}].from is {turn['from']!r}; use one of {', '.join(ROLES)}")
            if not isinstance(turn["value"], str):
                raise DataError(
                    f"{where}: {COLUMN}[{i}].value must be a string, got {type(turn['value']).__name__}")
        if not any(ROLES[t["from"]] == "assistant" for t in turns):
            raise DataError(f"{where}: {COLUMN} has no 'gpt' turn to learn from")

    def _messages(self, turns: list[Mapping[str, Any]], options: Mapping[str, Any]) -> list[tuple[str, str]]:
        messages = [(ROLES[t["from"]], t["value"]) for t in turns]
        if options.get("system_prompt") and (not messages or messages[0][0] != "system"):
            messages.insert(0, ("system", options["system_prompt"]))
        return messages

    def segments(self, row: Mapping[str, Any], tokenizer: Any, options: Mapping[str, Any]) -> list[Segment]:
        messages = self._messages(row[COLUMN], options)
        last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        eos = getattr(tokenizer, "eos_token", None) or ""
        segments: list[Segment] = []
        prompt: list[Segment] = []
        for i, (role, text) in enumerate(messages[: last + 1]):
            if role != "assistant":
                prompt += _turn(role, text)
                continue
            end = IM_END + (eos if i == last and eos != IM_END else "")
            segments += [*prompt, Segment(f"{IM_START}assistant\n"), Segment(text, train=True, literal=True),
                         Segment(end, train=True)]
            prompt = [Segment("\n")]  # the newline that closes the answer's turn starts the next prompt
        return segments

    def chat_format(self, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        """ChatML for the export's templates: EOS follows only the last answer, so none inside a history."""
        from finetune_sdk.exporting.chat_formats import ChatML

        return ChatML.for_tokenizer(tokenizer, answer_end="")

    def end_of_turn(self, tokenizer: Any) -> list[str]:
        """``<|im_end|>`` ends every answer: generation stops there (the contract checks it)."""
        return [IM_END]

    def prompt_segments(self, prompt: str, tokenizer: Any, options: Mapping[str, Any]) -> list[Segment]:
        messages = self._messages([{"from": "human", "value": prompt}], options)
        return [*(s for role, text in messages for s in _turn(role, text)), Segment(f"{IM_START}assistant\n")]
