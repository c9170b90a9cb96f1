"""Unpaired feedback for KTO: ``prompt``, ``completion``, ``label`` (true: desirable, false: undesirable) + ``system``.

The columns are TRL's unpaired preference format and what ``finetune feedback`` writes for thumbs up/down.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.errors import DataError
from finetune_sdk.formatter import KTO, Formatter, Segment
from finetune_sdk.plugins.formatters.preference import ChatAnswers


class KTOFormatter(ChatAnswers, Formatter):
    """A prompt with one completion rated desirable (``label: true``) or undesirable (``label: false``); rendered
    with the tokenizer's chat template (or ChatML when it has none), the completion and its end marker learnt.

    Besides :meth:`segments`, a formatter of task ``kto`` gives :meth:`desirable` (the row's rating) and
    :meth:`mismatched_segments` (a row's prompt with another row's completion: KTO's KL reference point).

    Example:
        >>> from finetune_sdk.testing.tiny import tiny_tokenizer
        >>> row = {"prompt": "Is the sky blue?", "completion": "Yes.", "label": True}
        >>> formatter = KTOFormatter()
        >>> formatter.desirable(row), [s.text for s in formatter.segments(row, tiny_tokenizer(), {}) if s.train][0]
        (True, 'Yes.')
    """

    name: ClassVar[str] = "kto"
    description: ClassVar[str] = "prompt + one completion rated true/false, for KTO (chat template or ChatML)"
    task: ClassVar[str] = KTO
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("prompt", "completion", "label"),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {
        "prompt": (str,), "completion": (str,), "label": (bool,), "system": (str,)}
    example: ClassVar[Mapping[str, Any]] = {"prompt": "Is the sky blue?", "completion": "Yes, on a clear day.",
                                            "label": True}

    def validate(self, row: Mapping[str, Any], where: str) -> None:
        if "label" in row and not isinstance(row["label"], bool):  # null too: a rating left empty is no rating
            hint = " (CSV cells are text: write KTO rows as JSONL or Parquet)" if isinstance(row["label"], str) else ""
            raise DataError(f"{where}: column 'label' must be true (desirable) or false (undesirable), a JSON "
                            f"boolean, got {type(row['label']).__name__} {row['label']!r}{hint}")
        super().validate(row, where)

    def desirable(self, row: Mapping[str, Any]) -> bool:
        """True when the row's completion was rated desirable (thumbs up)."""
        return bool(row["label"])

    def segments(self, row, tokenizer, options):
        return self._answer(row, row["completion"], tokenizer, options)

    def mismatched_segments(self, row: Mapping[str, Any], other: Mapping[str, Any], tokenizer: Any,
                            options: Mapping[str, Any]) -> list[Segment]:
        """``row``'s prompt (and system message) answered with ``other``'s completion."""
        return self._answer(row, other["completion"], tokenizer, options)
