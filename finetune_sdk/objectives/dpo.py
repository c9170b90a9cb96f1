"""``dpo``: Direct Preference Optimization (Rafailov et al., 2023) on (prompt, chosen, rejected) pairs; the loss
and the reference are in :mod:`finetune_sdk.objectives.dpo_training`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.objectives.pairs import PreferencePairs
from finetune_sdk.options import Option

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


class DirectPreferenceOptimization(PreferencePairs):
    """``dpo``: the DPO loss against the log-probabilities of the policy as it stands when DPO starts (after the
    technique has prepared it, trained adapters included), computed once before the first step; dropout off while
    training, as TRL's ``disable_dropout``."""

    name = "dpo"
    label = " + DPO"
    description = "Direct Preference Optimization (Rafailov et al., 2023) on preference pairs"
    default = True
    options = (Option("beta", float, 0.1, "DPO: how far the policy may move from the reference (TRL DPOConfig.beta)",
                      exclusive_minimum=0),)
    renamed_options = {"dpo_beta": "beta"}
    memory_note = ("DPO: chosen and rejected answers go through the model together (2 sequences per example); the "
                   "reference log-probs are computed once before training, no second model is held")

    def loss_at_reference(self, options: Mapping[str, Any]) -> float | None:
        """``-log sigmoid(0) = log 2``: every margin is 0 while the policy is its reference."""
        return math.log(2)

    def after_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        from finetune_sdk.objectives.dpo_training import precompute_reference

        batch = options["per_device_eval_batch_size"]
        precompute_reference(model, plan.train, tokenizer.pad_token_id, batch)
        for eval_set in plan.evals.values():  # alone per answer, as the final evaluation computes the policy's
            precompute_reference(model, eval_set.encoded, tokenizer.pad_token_id, batch, batch_invariant=True)

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.objectives.dpo_training import dropout_disabled

        return dropout_disabled(model)

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.objectives.dpo_training import dpo_trainer_class

        cls = dpo_trainer_class()
        cls.beta = options["beta"]
        return cls

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        from finetune_sdk.objectives.dpo_training import evaluate_preference

        eval_set = plan.evals[name]
        return evaluate_preference(loaded.model, eval_set.encoded, loaded.tokenizer.pad_token_id,
                                   run.options["beta"], run.options["per_device_eval_batch_size"],
                                   source=eval_set.rows.source)
