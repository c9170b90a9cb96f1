"""Pairwise decisions that mean what they say: a score does not depend on the batch or row a text sits in, and a
margin within float tolerance is a tie, counted as such and never as a correct decision.

Why both: a transformer's output for one sequence changes in the last bits with the batch it is computed in (matrix
shapes, padding, kernel choice), so the two answers of a pair with the same text, scored in different rows, got
rewards ``6e-8`` apart and a reward model reported ``pairwise_accuracy`` 0.125 on pairs it could not tell apart.
:func:`each_distinct` computes every distinct sequence once, alone (one row, no padding): the same text always gets
bit-for-bit the same score, whatever else is scored with it. :func:`is_tie` then calls a margin a tie when it is
within :data:`TIE_RTOL` of the scores' magnitude, so float noise from any other source (another device, a plugin's
reward function) is not read as a preference either.

Used by the reward model's evaluation and scoring (:mod:`finetune_sdk.models.reward_model`), DPO's held-out reward accuracy
(:mod:`finetune_sdk.objectives.dpo_training`) and held to plugins' reward functions by
:class:`finetune_sdk.testing.RewardFunctionContract`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

#: Relative tolerance of a tie: ``|margin| <= TIE_RTOL * max(1, |scores|...)``. 1e-5 is ~84 float32 ulps of the
#: larger score: above the float noise of computing one text in different batches (margins of 6e-8 in the issue's
#: report; 8.5e-7 relative on a tiny Llama on CPU), far below any preference a model expresses on purpose.
TIE_RTOL = 1e-5
T = TypeVar("T")
__all__ = ["TIE_RTOL", "each_distinct", "is_tie", "pairwise_counts"]


def is_tie(margin: float, *scores: float) -> bool:
    """Whether ``margin`` (e.g. ``r_chosen - r_rejected``) is within float tolerance of 0 for scores of the
    magnitude of ``scores``: ``|margin| <= TIE_RTOL * max(1, |s| for s in scores)``. NaN is never a tie.

    Example:
        >>> is_tie(6e-8, 0.41, 0.41), is_tie(0.0), is_tie(1e-3, 0.41, 0.41), is_tie(2e-4, 50.0, 50.0)
        (True, True, False, True)
    """
    scale = max([1.0, *(abs(float(s)) for s in scores if math.isfinite(float(s)))])
    return abs(float(margin)) <= TIE_RTOL * scale


def pairwise_counts(margins: Iterable[float], scales: Iterable[Sequence[float]]) -> tuple[int, int, int]:
    """``(correct, ties, wrong)`` counts of pairwise decisions: a margin above 0 is correct, one within tolerance
    (:func:`is_tie` with that pair's ``scales``) a tie, the rest wrong.

    Example:
        >>> pairwise_counts([0.5, 6e-8, -6e-8, -0.2], [(1.0, 0.5), (0.4, 0.4), (0.4, 0.4), (0.0, 0.2)])
        (1, 2, 1)
    """
    correct = ties = wrong = 0
    for margin, scale in zip(margins, scales):
        if is_tie(margin, *scale):
            ties += 1
        elif margin > 0:
            correct += 1
        else:
            wrong += 1
    return correct, ties, wrong


def each_distinct(items: Sequence[T], run_one: Callable[[T], Any], key: Callable[[T], Hashable] = repr) -> list[Any]:
    """``[run_one(item) for item in items]``, with ``run_one`` called once per distinct ``key(item)`` (the result
    shared): the batch-invariant way to score sequences, each computed alone.

    Example:
        >>> calls = []
        >>> each_distinct([[1, 2], [3], [1, 2]], lambda ids: calls.append(ids) or sum(ids), key=tuple), len(calls)
        ([3, 3, 3], 2)
    """
    results: dict[Hashable, Any] = {}
    out = []
    for item in items:
        k = key(item)
        if k not in results:
            results[k] = run_one(item)
        out.append(results[k])
    return out
