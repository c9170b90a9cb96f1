"""Rewards for online reinforcement learning (GRPO): Python reward functions, named ones that plugins register, and
reward models.

A reward function has TRL's signature ``fn(prompts: list[str], completions: list[str], **columns) ->
list[float]``: ``prompts[i]`` is the row's prompt as written in the data (not the chat-rendered text),
``completions[i]`` the sampled answer (decoded, special tokens removed, stripped), and every other column of the
rows comes as a keyword argument holding one value per completion (e.g. ``answer=[...]`` for a verifiable task).
It returns one finite float per completion, higher is better. Functions that take no ``**kwargs`` get only the
columns they name.

Plugins register named functions through the ``register_reward_functions`` hook
(:mod:`finetune_sdk.hookspecs`); ``reward_funcs=["name", fn]`` (``--reward name`` in the CLI) mixes both.
A reward model given as ``reward_model=REF`` (a result folder or registry ref) is scored with
``finetune_sdk.load(REF).score(prompts, completions)``. With several rewards the total is their sum, weighted by
``reward_weights`` (TRL's name; 1.0 each by default).

Example:
    >>> def contains_cat(prompts, completions, **columns):
    ...     return [1.0 if "cat" in c else 0.0 for c in completions]
    >>> rewards = [Reward("contains_cat", contains_cat)]
    >>> score_completions(rewards, ["say cat", "say dog"], ["a cat", "a dog"], {})
    ([[1.0], [0.0]], ['contains_cat'])
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from finetune_sdk.errors import ConfigError, FinetuneError

if TYPE_CHECKING:
    from finetune_sdk.plugin_manager import PluginHost

RewardFunction = Callable[..., Sequence[float]]


class RewardError(FinetuneError):
    """A reward function (or reward model) failed or returned something that is not one finite float per
    completion; the message names the function."""


@dataclass(frozen=True)
class Reward:
    """A reward source: its name (in logs as ``rewards/<name>``) and the function that scores completions."""

    name: str
    function: RewardFunction


def callable_name(function: Any) -> str:
    """The name a Python reward function is logged under (its ``__name__``, or its class's name)."""
    return str(getattr(function, "__name__", None) or type(function).__name__)


def resolve_reward_functions(given: Sequence[Any] | None, host: PluginHost) -> list[Reward]:
    """``reward_funcs`` as :class:`Reward` s: names are looked up among the plugins' registered functions (an
    unknown name is a :class:`ConfigError` suggesting the closest), callables are used as they are."""
    rewards: list[Reward] = []
    for item in given or ():
        if isinstance(item, str):
            rewards.append(Reward(item, host.registration("reward", item).cls))
        elif callable(item):
            rewards.append(Reward(callable_name(item), item))
        else:
            raise ConfigError(f"reward_funcs: {item!r} is neither a registered reward function's name nor a "
                              "callable fn(prompts, completions, **columns) -> list[float]")
    names = [r.name for r in rewards]
    return [Reward(f"{r.name}_{names[:i].count(r.name) + 1}" if names.count(r.name) > 1 else r.name, r.function)
            for i, r in enumerate(rewards)]


def reward_weights(options: Mapping[str, Any]) -> list[float]:
    """``reward_weights`` as floats, one per reward (``reward_funcs`` in order, then ``reward_model``); 1.0 each when
    unset. A wrong count or a non-number is a :class:`ConfigError`.

    >>> reward_weights({"reward_funcs": ["a", "b"], "reward_model": None, "reward_weights": ["1", "0.5"]})
    [1.0, 0.5]
    """
    count = len(options.get("reward_funcs") or ()) + (1 if options.get("reward_model") else 0)
    given = options.get("reward_weights")
    if given is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in given]
    except (TypeError, ValueError):
        raise ConfigError(f"reward_weights must be numbers, got {list(given)!r}") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"reward_weights has {len(weights)} finite weight(s) for {count} reward(s) (reward_funcs "
                          "in order, then reward_model): give one number per reward")
    return weights


def check_reward_sources(options: Mapping[str, Any], host: PluginHost) -> None:
    """Before any model loads: GRPO has at least one reward, every name is registered, the weights fit and the
    reward model exists."""
    resolve_reward_functions(options.get("reward_funcs"), host)
    ref = options.get("reward_model")
    if not options.get("reward_funcs") and not ref:
        raise ConfigError("GRPO needs a reward: pass reward_funcs=[fn or registered name] (--reward NAME) and/or "
                          "reward_model=RESULT_OR_REF (--reward-model)")
    reward_weights(options)
    if ref and not str(ref).startswith("hf://"):
        from finetune_sdk.models.loading import result_folder
        from finetune_sdk.training.manifest import read_manifest

        try:
            read_manifest(result_folder(ref))
        except FinetuneError as exc:
            raise ConfigError(f"reward_model {ref!r}: {exc}") from None


def reward_model(ref: str | Path) -> Reward:
    """The reward model ``ref`` (a result folder or registry ref) as a reward: ``finetune_sdk.load(ref).score``."""
    from finetune_sdk.models.loading import load

    loaded = load(ref)
    score = getattr(loaded, "score", None)
    if score is None:
        raise ConfigError(f"reward_model {ref!r}: this finetune-sdk can't score with it (no score() on the "
                          "loaded result); train a pairwise reward model first")

    def score_completions(prompts: list[str], completions: list[str], **columns: Any) -> Sequence[float]:
        return score(prompts, completions)

    return Reward(f"reward_model:{Path(str(ref)).name or ref}", score_completions)


def _arguments(function: RewardFunction, columns: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
    """The columns ``function`` accepts: all of them when it takes ``**kwargs``, else only those it names."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(columns)
    named = {p.name for p in parameters}
    return {k: v for k, v in columns.items() if k in named}


def checked_rewards(name: str, values: Any, completions: Sequence[str]) -> list[float]:
    """``values`` as floats, or a :class:`RewardError` (one line naming the function) when it isn't one finite
    number per completion.

    >>> checked_rewards("f", [1, 0.5], ["a", "b"])
    [1.0, 0.5]
    >>> checked_rewards("f", [1.0], ["a", "b"])
    Traceback (most recent call last):
    finetune_sdk.objectives.reward_functions.RewardError: reward function 'f' returned 1 reward for 2 completions; it must return one float per completion
    """
    if hasattr(values, "tolist"):  # a tensor or array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, not a list of floats (one "
                          "per completion)")
    if len(values) != len(completions):
        raise RewardError(f"reward function {name!r} returned {len(values)} reward{'s' * (len(values) != 1)} for "
                          f"{len(completions)} completions; it must return one float per completion")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise RewardError(f"reward function {name!r} returned {value!r} for completion {i} "
                              f"({completions[i][:40]!r}); rewards must be finite numbers")
        out.append(float(value))
    return out


def score_completions(rewards: Sequence[Reward], prompts: list[str], completions: list[str],
                      columns: Mapping[str, list[Any]]) -> tuple[list[list[float]], list[str]]:
    """Each completion's reward from each source: ``[len(completions)][len(rewards)]`` floats and the names.

    Raises :class:`RewardError` naming the function when one raises or returns a bad value.
    """
    per_source = []
    for reward in rewards:
        try:
            values = reward.function(prompts=list(prompts), completions=list(completions),
                                     **_arguments(reward.function, columns))
        except RewardError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function: name it in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RewardError(f"reward function {reward.name!r} raised {type(exc).__name__}: {first}") from exc
        per_source.append(checked_rewards(reward.name, values, completions))
    return [list(row) for row in zip(*per_source)], [r.name for r in rewards]
