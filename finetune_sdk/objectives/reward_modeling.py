"""``reward-modeling``: the Bradley-Terry loss of a pairwise reward model (the ``reward-model`` technique) on
(prompt, chosen, rejected) pairs; see :mod:`finetune_sdk.models.reward_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.formatter import REWARD
from finetune_sdk.objectives.base import TrainingInputs
from finetune_sdk.objectives.pairs import PreferencePairs

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


class RewardModeling(PreferencePairs):
    """``reward-modeling``: a pairwise reward model (Ouyang et al., 2022), the Bradley-Terry loss
    ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))`` (:mod:`finetune_sdk.models.reward_model`). On a frozen
    backbone with ``cache_features`` the head trains, and is scored, on cached features of both answers."""

    name = "reward-modeling"
    label = " + Bradley-Terry reward modeling"
    description = "a pairwise Bradley-Terry reward model (technique reward-model) on preference pairs"
    technique_tasks = frozenset({REWARD})
    default = True
    metrics = ("eval_loss", "reward_accuracy", "reward_ties", "reward_margin")

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.objectives.reward_model_training import reward_trainer_class

        return reward_trainer_class(float(options.get("center_rewards_coefficient") or 0.0))

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any,
                        args: Any) -> TrainingInputs:
        if not run.options["cache_features"] or getattr(model, "train_backbone", True):
            return super().training_inputs(run, plan, model, tokenizer, args)
        from finetune_sdk.objectives.reward_model_training import head_training_inputs

        return head_training_inputs(run, plan, model, tokenizer, args)

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        from finetune_sdk.objectives.reward_model_training import evaluate_reward_model

        return evaluate_reward_model(loaded, plan, name, run.options)
