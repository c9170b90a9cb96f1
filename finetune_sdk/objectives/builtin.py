"""The SDK's own objectives, registered through the same ``register_objectives`` hook as a plugin's (as pytest's
own features use its hooks): ``sft``, ``dpo``, ``orpo``, ``simpo``, ``kto``, ``grpo``, ``classification-head``,
``reward-modeling``.

Example:
    >>> registered = []
    >>> register_objectives(registered.append)
    >>> [cls.name for cls in registered][:3]
    ['sft', 'dpo', 'orpo']
"""

from __future__ import annotations

from collections.abc import Callable

from finetune_sdk.hookspecs import hookimpl
from finetune_sdk.objectives.classification import ClassificationHead
from finetune_sdk.objectives.dpo import DirectPreferenceOptimization
from finetune_sdk.objectives.grpo import GroupRelativePolicyOptimization
from finetune_sdk.objectives.kto import KahnemanTverskyOptimization
from finetune_sdk.objectives.orpo import OddsRatioPreferenceOptimization
from finetune_sdk.objectives.reward_modeling import RewardModeling
from finetune_sdk.objectives.sft import SupervisedFineTuning
from finetune_sdk.objectives.simpo import SimplePreferenceOptimization

BUILTIN_OBJECTIVES = (SupervisedFineTuning, DirectPreferenceOptimization, OddsRatioPreferenceOptimization,
                      SimplePreferenceOptimization, KahnemanTverskyOptimization, GroupRelativePolicyOptimization,
                      ClassificationHead, RewardModeling)


@hookimpl
def register_objectives(register: Callable[[type], None]) -> None:
    """Register the builtin objectives."""
    for objective in BUILTIN_OBJECTIVES:
        register(objective)
