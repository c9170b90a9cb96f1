"""Class labels of the classifier technique: one order, whatever file format the labels came from."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

INTEGER = re.compile(r"[+-]?\d+")


def is_integer_label(label: Any) -> bool:
    """True for an ``int`` (not a bool) or a string that spells one (``"7"``, ``" 12"``), as CSV files give."""
    if isinstance(label, bool):
        return False
    return isinstance(label, int) or (isinstance(label, str) and INTEGER.fullmatch(label.strip()) is not None)


def label_order(found: Iterable[Any]) -> list[str]:
    """The classifier's labels (output index -> name) for the labels found in the data.

    Integer and integer-looking labels keep their numbers: when they are ``0..n`` (gaps allowed) label ``k`` is
    output ``k``, the same from ``.jsonl`` (``7``) as from ``.csv`` (``"7"``); other integers are sorted
    numerically. Any other labels are sorted as strings.

    >>> label_order(["0", "1", "10", "11", "2"])
    ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11']
    >>> label_order([3, 1])
    ['0', '1', '2', '3']
    >>> label_order(["-5", "20", "3"])
    ['-5', '3', '20']
    >>> label_order(["positive", "negative"])
    ['negative', 'positive']
    """
    found = list(found)
    if found and all(is_integer_label(label) for label in found):
        numbers = {int(str(label).strip()) for label in found}
        canonical = all(str(label).strip() == str(int(str(label).strip())) for label in found)
        if canonical and min(numbers) >= 0:
            return [str(i) for i in range(max(numbers) + 1)]
        return [str(n) for n in sorted(numbers)]
    return sorted({str(label) for label in found})


def label_key(label: Any) -> str:
    """The name a row's label is looked up by: ``str(label)``, an integer-looking string without spaces."""
    return str(label).strip() if is_integer_label(label) else str(label)
