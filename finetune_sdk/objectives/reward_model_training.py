"""Training the pairwise reward model (:mod:`finetune_sdk.models.reward_model`) for the ``reward-modeling``
objective: the transformers ``Trainer`` whose loss is the Bradley-Terry loss, and on a frozen backbone the head
trained on cached features of both answers of every pair (:mod:`finetune_sdk.training.feature_cache`: the backbone
runs once per dataset).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from finetune_sdk.data.encoding import Encoded
from finetune_sdk.models.reward_model import RewardModel, bradley_terry_loss, evaluate_pairs
from finetune_sdk.objectives.base import TrainingInputs

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.training.plan import RunSpec, TrainingPlan

logger = logging.getLogger("finetune_sdk")


def reward_trainer_class(center_rewards_coefficient: float = 0.0) -> type:
    """A transformers ``Trainer`` whose loss is :func:`bradley_terry_loss` of a batch of ``[chosen..., rejected...]``
    rows (token ids, or cached ``features``), built when a run needs it."""
    from transformers import Trainer as HFTrainer

    from finetune_sdk.training.accumulation import step_batch_trainer_class
    from finetune_sdk.objectives.dpo_training import loss_only_prediction_step

    coefficient = center_rewards_coefficient

    class RewardTrainer(step_batch_trainer_class(HFTrainer)):  # type: ignore[misc]
        center_rewards_coefficient = coefficient

        def examples_in(self, batch):
            rows = batch["input_ids"] if "input_ids" in batch else batch["features"]
            return rows.shape[0] // 2

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rewards = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.squeeze(-1)
            half = rewards.shape[0] // 2
            total = bradley_terry_loss(rewards[:half], rewards[half:], self.center_rewards_coefficient,
                                       reduction="sum")
            loss = self.step_mean(total, half, num_items_in_batch)  # the mean over the step's pairs
            return (loss, {"rewards": rewards}) if return_outputs else loss

        prediction_step = loss_only_prediction_step

    return RewardTrainer


class PairFeatures:
    """Pooled features ``[pairs, hidden]`` of the chosen and the rejected answers, as a map-style dataset."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return self.chosen.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"chosen": self.chosen[index], "rejected": self.rejected[index]}


def collate_pair_features(batch: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A batch of :class:`PairFeatures` items as ``{"features": [chosen..., rejected...]}``."""
    return {"features": torch.stack([b["chosen"] for b in batch] + [b["rejected"] for b in batch])}


class RewardHead(nn.Module):
    """Trains a :class:`RewardModel`'s ``head`` (the same module) on cached features ``[rows, hidden]``."""

    accepts_loss_kwargs = False

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.head(features.to(self.head.weight.dtype)))


def head_training_inputs(run: RunSpec, plan: TrainingPlan, model: RewardModel, tokenizer: Any,
                         args: Any) -> TrainingInputs:
    """The ``reward-modeling`` objective's :class:`~finetune_sdk.objectives.TrainingInputs` on a frozen backbone:
    the head trained on cached features of both answers of every pair (the backbone runs once per dataset); each
    held-out set's features are kept in ``run.state.eval_features`` for the evaluations during training (the final
    metrics run the model: :func:`evaluate_reward_model`)."""
    def pair_features(encoded: Encoded, fingerprint: Any) -> PairFeatures:
        return PairFeatures(*(side_features(run, plan, model, tokenizer, encoded, fingerprint, side)
                              for side in ("chosen", "rejected")))

    train = pair_features(plan.train, plan.dataset.get("fingerprint"))
    evals = {name or "eval": run.state.eval_features.setdefault(name, pair_features(s.encoded, s.rows.fingerprint))
             for name, s in plan.evals.items()}
    args.include_num_input_tokens_seen = "no"  # feature batches have no input_ids to count
    eval_dataset = (evals if len(evals) > 1 else next(iter(evals.values()))) if evals else None
    center = float(run.options.get("center_rewards_coefficient") or 0.0)
    return TrainingInputs(RewardHead(model.head), train, eval_dataset, collate_pair_features,
                          reward_trainer_class(center))


def side_features(run: RunSpec, plan: TrainingPlan, model: RewardModel, tokenizer: Any, encoded: Encoded, fingerprint: Any,
                  side: str) -> torch.Tensor:
    """Cached pooled features ``[pairs, hidden]`` of the ``side`` (``chosen`` or ``rejected``) answers."""
    from finetune_sdk.fsutil import cache_root
    from finetune_sdk.training.feature_cache import cached_features, feature_key

    key = {**feature_key(run, model), "formatter": plan.formatter_name, "data": fingerprint, "side": side,
           "system_prompt": run.options.get("system_prompt")}
    sequences = Encoded(examples=[ex[side] for ex in encoded.examples])
    features, seconds, hit = cached_features(model, sequences, tokenizer.pad_token_id, key, cache_root() / "features",
                                             what=f"reward model features of the {side} answers")
    logger.info("reward model features of %d %s answers: %s in %.1f s",
                                           len(sequences.examples), side,
                                           "read from the cache" if hit else "computed once", seconds)
    return features


def evaluate_reward_model(loaded: LoadedModel, plan: TrainingPlan, name: str,
                          options: Mapping[str, Any]) -> dict[str, Any]:
    """Final metrics of a trained reward model (a LoadedModel) on the held-out set ``plan.evals[name]``, by running
    the model on every answer alone (:func:`evaluate_pairs`; the same numbers ``load(result).evaluate`` gives). The
    cached features a frozen backbone's head trained on serve the evaluations during training only: they were
    computed in batches, and a text's features changed in the last bits with its batch."""
    eval_set, center = plan.evals[name], float(options.get("center_rewards_coefficient") or 0.0)
    return evaluate_pairs(getattr(loaded.model, "module", loaded.model), eval_set.encoded,
                          loaded.tokenizer.pad_token_id, source=eval_set.rows.source, center_rewards_coefficient=center)
