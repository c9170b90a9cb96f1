"""Classification rows: ``text`` and ``label`` (a class name or an integer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from finetune_sdk.formatter import CLASSIFICATION, Formatter


class ClassificationFormatter(Formatter):
    """``text`` + ``label`` for the classifier technique."""

    name: ClassVar[str] = "classification"
    description: ClassVar[str] = "text + label, for the classifier technique"
    task: ClassVar[str] = CLASSIFICATION
    column_sets: ClassVar[tuple[tuple[str, ...], ...]] = (("text", "label"),)
    column_types: ClassVar[Mapping[str, tuple[type, ...]]] = {"text": (str,), "label": (str, int)}
    example: ClassVar[Mapping[str, Any]] = {"text": "I loved it.", "label": "positive"}

    def text_and_label(self, row: Mapping[str, Any]) -> tuple[str, Any]:
        return row["text"], row["label"]
