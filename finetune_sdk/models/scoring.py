"""No metric over nothing: every evaluator counts the rows it scored and skipped, and refuses an empty set.

Example:
    >>> scored_rows(3, 1)
    {'eval_rows_scored': 3, 'eval_rows_skipped': 1}
    >>> require_rows(0, 2, "eval.jsonl", "have no answer tokens left after truncation to max_length=64")
    Traceback (most recent call last):
    ...
    finetune_sdk.errors.DataError: eval.jsonl: nothing left to score: all 2 rows have no answer tokens left after truncation to max_length=64; raise max_length or give rows that fit
"""

from __future__ import annotations

from finetune_sdk.errors import DataError


def scored_rows(scored: int, skipped: int) -> dict[str, int]:
    """The two counts every evaluation reports: ``eval_rows_scored`` and ``eval_rows_skipped``."""
    return {"eval_rows_scored": int(scored), "eval_rows_skipped": int(skipped)}


def require_rows(scored: int, skipped: int, source: str, why: str,
                 fix: str = "raise max_length or give rows that fit") -> None:
    """Raise :class:`DataError` naming ``source`` when no row is left to score (a loss over nothing would read as a
    perfect 0.0)."""
    if scored > 0:
        return
    if skipped:
        raise DataError(f"{source}: nothing left to score: all {skipped} rows {why}; {fix}")
    raise DataError(f"{source}: nothing to score: the evaluation set is empty")
