"""The :class:`Formatter` plugin type: turns a dataset row into text segments, marking what the loss sees."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from finetune_sdk.errors import DataError

CAUSAL_LM = "causal-lm"
CLASSIFICATION = "classification"
PREFERENCE = "preference"
#: Unpaired feedback (a prompt, one completion and a thumbs up/down), trained with KTO.
KTO = "kto"
#: Prompt-only rows: the policy writes the answers (online RL, GRPO).
PROMPT = "prompt"
TASKS = (CAUSAL_LM, CLASSIFICATION, PREFERENCE, KTO, PROMPT)
#: The task of a pairwise reward model (the ``reward-model`` technique): a technique's task, trained on
#: ``preference`` data; no formatter makes ``reward`` rows.
REWARD = "reward"
#: Technique tasks whose model is a backbone (``AutoModel``) with a trained head, not a causal LM that generates.
HEAD_TASKS = (CLASSIFICATION, REWARD)


@dataclass(frozen=True)
class Segment:
    """A piece of formatted text; ``train=True`` when its tokens count in the loss.

    Template text (``literal=False``, the default): special-token strings in ``text`` (``tokenizer.eos_token``,
    ``<|im_start|>``...) become their single token id. Use it only for the template's own markers.

    User content (``literal=True``): ``text`` is plain text; a special-token string in it (an HTML answer with
    ``<s>$40</s>``, a ``<|im_end|>`` in a prompt) is encoded as the ordinary tokens of its characters, never as a
    control token. Every message, field and document a formatter takes from a row must be a literal segment.

    Example:
        >>> from finetune_sdk.data.encoding import encode_segments
        >>> from finetune_sdk.testing.tiny import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> ids = encode_segments([Segment("<s>$40</s>", literal=True), Segment("</s>")], tok, None)["input_ids"]
        >>> ids.count(tok.eos_token_id), ids.count(tok.bos_token_id)
        (1, 0)
    """

    text: str
    train: bool = False
    literal: bool = False


def literal_format(template: str, *, train: bool = False, **fields: Any) -> list[Segment]:
    r"""``template.format(**fields)`` as segments: the template's text as template text, each field's value as a
    literal segment (user content).

    >>> [(s.text, s.literal) for s in literal_format("Q: {question}\nA:", question="<s>hi")]
    [('Q: ', False), ('<s>hi', True), ('\nA:', False)]
    """
    segments: list[Segment] = []
    for text, field, spec, conversion in string.Formatter().parse(template):
        if text:
            segments.append(Segment(text, train=train))
        if field is not None:
            value = format(fields[field], spec or "") if not conversion else repr(fields[field])
            if value:
                segments.append(Segment(value, train=train, literal=True))
    return segments


class Formatter:
    """Base class of dataset formatters.

    A formatter declares the column sets it accepts (``column_sets``, the first one that a row has wins),
    renders a training row into :class:`Segment` s, and renders a bare prompt the same way for generation.
    Content taken from a row (or a generation prompt) goes in ``Segment(..., literal=True)``: only the template's
    own markers may become special tokens (see docs/formatters.md).

    Example:
        >>> from finetune_sdk.formatter import Formatter, Segment
        >>> class Upper(Formatter):
        ...     name = "upper"
        ...     column_sets = (("prompt", "completion"),)
        ...     def segments(self, row, tokenizer, options):
        ...         return [Segment(row["prompt"].upper(), literal=True), Segment("\\n"),
        ...                 Segment(row["completion"], train=True, literal=True), Segment(tokenizer.eos_token, train=True)]
        ...     def prompt_segments(self, prompt, tokenizer, options):
        ...         return [Segment(prompt.upper(), literal=True), Segment("\\n")]
        >>> tok = type("Tok", (), {"eos_token": "</s>"})()
        >>> [s.text for s in Upper().segments({"prompt": "hi", "completion": "yo"}, tok, {})]
        ['HI', '\\n', 'yo', '</s>']
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    task: ClassVar[str] = CAUSAL_LM
    #: Alternative sets of required columns, in order of preference.
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: Column types checked row by row: column -> tuple of accepted Python types.
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {}
    #: True when documents are joined and cut into ``max_length`` blocks (continued pretraining).
    concatenates: ClassVar[bool] = False
    #: A valid row, used by docs and by the contract tests in ``finetune_sdk.testing``.
    example: ClassVar[Mapping[str, Any]] = {}

    def accepts(self, columns: Sequence[str]) -> bool:
        """True when the columns contain one of :attr:`column_sets`."""
        return any(set(needed) <= set(columns) for needed in self.column_sets)

    def validate(self, row: Mapping[str, Any], where: str) -> None:
        """Raise :class:`DataError` naming ``where`` (file and row) when ``row`` can't be formatted."""
        for needed in self.column_sets:
            if set(needed) <= set(row) and all(row[c] is not None for c in needed):
                break
        else:
            wanted = " or ".join("(" + ", ".join(s) + ")" for s in self.column_sets)
            present = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{where}: formatter {self.name!r} needs columns {wanted}; this row has {present}"
            )
        for column, types in self.column_types.items():
            if column in row and row[column] is not None and not isinstance(row[column], types):
                expected = " or ".join(t.__name__ for t in types)
                raise DataError(
                    f"{where}: column {column!r} must be {expected}, got {type(row[column]).__name__}"
                )

    def segments(self, row: Mapping[str, Any], tokenizer: Any, options: Mapping[str, Any]) -> list[Segment]:
        """Render one training row (causal-lm formatters)."""
        raise NotImplementedError

    def prompt_segments(self, prompt: str, tokenizer: Any, options: Mapping[str, Any]) -> list[Segment]:
        """Render a bare prompt exactly as :meth:`segments` renders a training prompt, up to the answer."""
        raise NotImplementedError

    def text_and_label(self, row: Mapping[str, Any]) -> tuple[str, Any]:
        """Return (text, label) for classification formatters."""
        raise NotImplementedError

    def chat_format(self, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        """The chat format :meth:`prompt_segments` renders in with ``tokenizer`` and ``options``, for exporters.

        One of: a format name of ``finetune_sdk.exporting.chat_formats.FORMATS`` (``"chatml"``, ``"llama2-chat"``,
        ``"llama3"``, ``"alpaca"``), ``"tokenizer"`` (the tokenizer's own chat template), ``"raw"`` (plain text, no
        template), a ``ChatFormat`` instance (a format of the plugin's own, with its Jinja and Go templates), or
        None (the formatter renders no prompts to chat with, or doesn't say: the export keeps the tokenizer's own
        template). The export writes that format as the GGUF file's chat template and the Modelfile's
        ``TEMPLATE``; ``FormatterContract`` checks both render exactly what training rendered.

        Example:
            >>> from finetune_sdk.plugins.formatters.chat import ChatMLFormatter
            >>> ChatMLFormatter().chat_format(None, {})
            'chatml'
        """
        return None

    def end_of_turn(self, tokenizer: Any) -> list[str]:
        """The token strings that end the model's answer in this format: generation stops at them (besides EOS
        and the model's ``generation_config.eos_token_id``; see :func:`finetune_sdk.models.stop_tokens.stop_token_ids`).

        Default: the tokenizer's EOS, which is what a format that ends its answer with EOS needs. A format that
        ends a turn with its own marker declares it (ChatML: ``["<|im_end|>"]``; the chat template: the marker its
        template puts after an answer). A string that is not one token of the vocabulary is ignored.

        >>> tok = type("Tok", (), {"eos_token": "</s>"})()
        >>> Formatter().end_of_turn(tok)
        ['</s>']
        """
        return [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []


#: Question/answer columns of the builtin formatters' rows, in the order tried (chat, then alpaca).
_QUESTION_ANSWER_COLUMNS = (("prompt", "completion"), ("instruction", "output"))
#: The answer put after the last question while rendering a few-shot conversation, then cut off (never encoded).
_PLACEHOLDER_ANSWER = "FEWSHOTPLACEHOLDERANSWER"


def few_shot_segments(formatter: Formatter, examples: Sequence[tuple[str, str]], question: str, tokenizer: Any,
                      options: Mapping[str, Any]) -> list[Segment]:
    """``examples`` (question, answer) as earlier turns of one conversation in the format the model was trained in,
    then ``question`` up to where the answer starts: few-shot prompting in the model's chat format, not plain text.

    A formatter that takes ``messages`` renders one conversation (user/assistant turns, the question last, its
    answer cut off: the trailing ``train=True`` segments); any other renders each example as a training row
    (``prompt``/``completion``) and then :meth:`Formatter.prompt_segments` of the question. With no examples this is
    ``prompt_segments(question)``. Used by ``finetune bench`` (lm-eval's few-shot as multi-turn) and by the advice's
    few-shot scoring (:mod:`finetune_sdk.advice.prompting`).

    Example:
        >>> from finetune_sdk.plugins.formatters.chat import ChatMLFormatter
        >>> tok = type("Tok", (), {"eos_token": "<|im_end|>"})()
        >>> "".join(s.text for s in few_shot_segments(ChatMLFormatter(), [("2+2?", "4")], "3+3?", tok, {}))
        '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n<|im_start|>user\\n3+3?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if not examples:
        return formatter.prompt_segments(question, tokenizer, options)
    if formatter.accepts(("messages",)):
        messages = [m for q, a in examples for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": _PLACEHOLDER_ANSWER}]
        rendered = list(formatter.segments({"messages": messages}, tokenizer, options))
        while rendered and rendered[-1].train:
            rendered.pop()
        if rendered and not any(_PLACEHOLDER_ANSWER in s.text for s in rendered):
            return rendered
    columns = next((pair for pair in _QUESTION_ANSWER_COLUMNS if formatter.accepts(pair)), None)
    segments: list[Segment] = []
    for q, a in examples:
        if columns is None:  # a format with no question/answer rows: the example as plain text
            segments.append(Segment(f"{q}\n{a}\n\n", literal=True))
        else:
            segments += formatter.segments(dict(zip(columns, (q, a))), tokenizer, options)
    return segments + formatter.prompt_segments(question, tokenizer, options)
