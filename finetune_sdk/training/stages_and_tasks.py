"""Beyond one dataset: sequential stages and multi-task mixtures, as ``Trainer.fit`` inputs.

Example:
    >>> from finetune_sdk import Stage, Task
    >>> stages = [Stage("general.jsonl", formatter="alpaca"), Stage("domain.jsonl", num_train_epochs=1)]
    >>> tasks = [Task("qa", "qa.jsonl", weight=3), Task("chat", "chat.jsonl", formatter="chatml", weight=1)]
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_sdk.errors import ConfigError


class Stage:
    """One stage of sequential fine-tuning: a dataset, its formatter and options for this stage only.

    ``Trainer.fit([Stage(...), Stage(...)])`` trains the stages in order, continuing the same adapter (or weights).
    """

    def __init__(self, data: Any, *, formatter: str | None = None, eval_data: Any = None, name: str | None = None,
                 **options: Any) -> None:
        self.data = data
        self.formatter = formatter
        self.eval_data = eval_data
        self.name = name
        self.options = options

    def __repr__(self) -> str:
        return f"Stage({self.data!r}, formatter={self.formatter!r}, options={self.options!r})"


@dataclass
class Task:
    """One task of a multi-task mixture: ``name``, its data and formatter, an optional explicit ``weight``."""

    name: str
    data: Any
    formatter: str | None = None
    eval_data: Any = None
    weight: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


MIXING = ("proportional", "explicit", "temperature")


def mixing_probabilities(sizes: Mapping[str, int], weights: Mapping[str, float | None], mixing: str,
                         temperature: float) -> dict[str, float]:
    """Sampling probability of each task.

    ``proportional``: n_i / N. ``explicit``: the given weights, normalised. ``temperature``: n_i^(1/T),
    normalised (T=1 is proportional, larger T flattens towards uniform).

    >>> mixing_probabilities({"a": 300, "b": 100}, {}, "proportional", 1.0)
    {'a': 0.75, 'b': 0.25}
    >>> round(mixing_probabilities({"a": 300, "b": 100}, {}, "temperature", 2.0)["a"], 3)
    0.634
    """
    if mixing not in MIXING:
        raise ConfigError(f"unknown task_mixing {mixing!r}; use one of {', '.join(MIXING)}")
    if mixing == "explicit":
        missing = [name for name in sizes if not weights.get(name)]
        if missing:
            raise ConfigError(f"task_mixing='explicit' needs a weight > 0 on every task; missing for {missing}")
        raw = {name: float(weights[name]) for name in sizes}
    elif mixing == "temperature":
        if temperature <= 0:
            raise ConfigError("mixing_temperature must be > 0")
        raw = {name: math.pow(n, 1.0 / temperature) for name, n in sizes.items()}
    else:
        raw = {name: float(n) for name, n in sizes.items()}
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def mix(examples: Mapping[str, Sequence[Any]], probabilities: Mapping[str, float], total: int,
        seed: int) -> tuple[list[Any], dict[str, int]]:
    """Draw ``total`` examples: a task per draw by its probability, then an example of it (cycling through a
    shuffled copy, so a task's examples are all seen before any repeats). Returns the mixture and the counts."""
    rng = random.Random(seed)
    names = list(examples)
    pools = {name: list(examples[name]) for name in names}
    cursors = dict.fromkeys(names, 0)
    for pool in pools.values():
        rng.shuffle(pool)
    mixture, counts = [], dict.fromkeys(names, 0)
    for name in rng.choices(names, weights=[probabilities[n] for n in names], k=total):
        pool = pools[name]
        mixture.append(pool[cursors[name] % len(pool)])
        cursors[name] += 1
        counts[name] += 1
    return mixture, counts


def is_stage_list(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(s, Stage) for s in data)


def is_task_list(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(t, Task) for t in data)
