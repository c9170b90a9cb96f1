"""Data that can't teach anything: refused (or warned about, with counts) before any model loads.

* a classifier whose training data has a single class;
* preference pairs whose chosen and rejected answers are the same (DPO learns nothing from them);
* rows whose answer is empty (``completion``, ``output``, ``response``, ``answer`` or every assistant message):
  a model trained on them learns to say nothing.

A few such rows are skipped or kept with a warning that counts them; when most rows are like that, it is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from finetune_sdk.errors import DataError

logger = logging.getLogger("finetune_sdk")
ANSWER_COLUMNS = ("completion", "output", "response", "answer")


def check_classes(label_ids: list[int], labels: list[str], source: str) -> None:
    """Refuse classifier training data that holds one class only."""
    present = sorted(set(label_ids))
    if len(present) < 2:
        only = repr(labels[present[0]]) if present else "none"
        raise DataError(f"{source}: every example has the label {only}; a classifier needs examples of at least two "
                        "classes")


def check_pairs(examples: list[Mapping[str, Any]], source: str) -> None:
    """Warn about preference pairs whose chosen and rejected answers are identical; refuse when most are."""
    same = sum(1 for ex in examples if ex["chosen"]["input_ids"] == ex["rejected"]["input_ids"])
    _report(same, len(examples), source, "pairs have the same chosen and rejected answer",
            "DPO learns nothing from them; give different answers")


def empty_answer(row: Mapping[str, Any]) -> bool:
    """True when the row's answer (its answer column, or all of its assistant messages) is blank."""
    messages = row.get("messages")
    if isinstance(messages, list):
        answers = [m.get("content") for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant"]
        return bool(answers) and all(isinstance(a, str) and not a.strip() for a in answers)
    for column in ANSWER_COLUMNS:
        if isinstance(row.get(column), str):
            return not row[column].strip()
    return False


def check_answers(rows: list[Mapping[str, Any]], source: str) -> None:
    """Warn about rows with an empty answer (with the count); refuse when most rows have one."""
    _report(sum(1 for row in rows if empty_answer(row)), len(rows), source, "rows have an empty answer",
            "the model would learn to answer nothing; fill in the answers or drop those rows")


def _report(count: int, total: int, source: str, what: str, advice: str) -> None:
    if not count:
        return
    message = f"{source}: {count} of {total} {what}"
    if count * 2 > total:
        raise DataError(f"{message}; {advice}")
    logger.warning("%s; %s", message, advice)
