"""What ORPO and SimPO share: preference objectives without a reference model, on length-normalised
log-probabilities (TRL's ``average_log_prob=True``): the mean log-probability of an answer's tokens.

Each objective gives a per-pair loss of the chosen and rejected answers' mean log-probabilities
(:func:`finetune_sdk.objectives.orpo.orpo_loss`, :func:`finetune_sdk.objectives.simpo.simpo_loss`) and the weight of
an NLL (SFT) term on the chosen answers. The trainer divides the pair losses by the optimizer step's pairs and the
NLL by the step's chosen tokens (TRL takes the token mean of each micro-batch), so gradient accumulation equals the
bigger batch (:mod:`finetune_sdk.training.accumulation`). Held-out pairs are scored each answer alone (batch-invariant, as
DPO's): ``reward_accuracy`` is the share of pairs whose chosen answer has the higher mean log-probability (TRL's
``rewards/accuracies``: ``beta * mean logp`` chosen above rejected), ties within float tolerance never correct.

Example:
    >>> import torch
    >>> sums, counts = average_logps(torch.tensor([-2.0, -6.0]), torch.tensor([2, 3]))
    >>> sums.tolist()
    [-1.0, -2.0]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.encoding import IGNORE_INDEX, Encoded
from finetune_sdk.objectives.pairs import PreferencePairs

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.objectives.base import Objective
    from finetune_sdk.training.plan import TrainingPlan
    from finetune_sdk.training.plan import RunSpec

#: ``(chosen mean logps [B], rejected mean logps [B]) -> (per-pair loss [B], per-pair reward margin [B])``
PairLoss = Callable[[Any, Any], tuple[Any, Any]]


def average_logps(sums: Any, counts: Any) -> tuple[Any, Any]:
    """Mean log-probability per answer token from summed log-probs ``[N]`` and answer-token counts ``[N]`` (a count
    of 0, an answer cut off entirely, counts as 1). Returns ``(means, counts)``."""
    counts = counts.clamp(min=1)
    return sums / counts, counts


def sequence_logps_and_counts(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> tuple[Any, Any]:
    """Summed log-probability ``[N]`` (float32) and the number ``[N]`` of labelled (answer) tokens of each row."""
    from finetune_sdk.objectives.dpo_training import sequence_logps

    return sequence_logps(model, input_ids, attention_mask, labels), (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def nll_term(chosen_sums: Any, chosen_tokens: Any) -> Any:
    """TRL's ``policy_nll_loss``: the cross-entropy of the chosen answers' tokens, ``-sum(logp) / tokens``."""
    return -chosen_sums.sum() / chosen_tokens


def reference_free_trainer_class(pair_loss: PairLoss, nll_weight: float) -> type:
    """A transformers ``Trainer`` training ``mean(pair_loss) + nll_weight * NLL(chosen)`` over the optimizer step
    (built lazily so importing this module stays light)."""
    from transformers import Trainer as HFTrainer

    from finetune_sdk.training.accumulation import step_batch_trainer_class
    from finetune_sdk.objectives.dpo_training import loss_only_prediction_step

    class ReferenceFreeTrainer(step_batch_trainer_class(HFTrainer)):  # type: ignore[misc]
        def examples_in(self, batch: Any) -> int:
            return batch["input_ids"].shape[0] // 2

        def step_chosen_tokens(self, model: Any, labels: Any) -> Any:
            """The chosen answers' tokens in the optimizer step (all micro-batches, all processes); this
            micro-batch's outside training."""
            step = self.current_step(model)
            if step is None:
                return _chosen_tokens(labels)

            def count() -> int:
                total = sum(int(_chosen_tokens(batch["labels"])) for batch in step.micro_batches)
                if self.args.world_size > 1:
                    import torch

                    gathered = self.accelerator.gather(torch.tensor([total], device=labels.device))
                    return int(gathered.sum())  # each process's share is multiplied by the processes below
                return total

            return step.once("chosen_tokens", count)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            sums, counts = sequence_logps_and_counts(model, inputs["input_ids"], inputs["attention_mask"],
                                                     inputs["labels"])
            half = sums.shape[0] // 2
            means, _ = average_logps(sums, counts)
            losses, margin = pair_loss(means[:half], means[half:])
            loss = self.step_mean(losses.sum(), half, num_items_in_batch)
            if nll_weight:
                tokens = self.step_chosen_tokens(model, inputs["labels"])
                scale = self.accelerator.num_processes if self.current_step(model) is not None else 1
                loss = loss + nll_weight * scale * nll_term(sums[:half], max(int(tokens), 1))
            return (loss, {"margin": margin}) if return_outputs else loss

        prediction_step = loss_only_prediction_step

    return ReferenceFreeTrainer


def _chosen_tokens(labels: Any) -> Any:
    return (labels[: labels.shape[0] // 2, 1:] != IGNORE_INDEX).sum()


def evaluate_reference_free(model: Any, encoded: Encoded, pair_loss: PairLoss, nll_weight: float, beta: float,
                            source: str = "eval_data") -> dict[str, float]:
    """The objective's loss, ``reward_accuracy``, ``reward_ties``, ``reward_margin`` (``beta`` times the mean
    log-prob margin), ``logp_margin`` (summed log-probs, chosen minus rejected) and ``nll_loss`` on held-out pairs,
    every answer computed alone (:func:`finetune_sdk.objectives.dpo_training.each_sequence_logps`).

    Raises:
        DataError: no pair left to score (every one cut off by ``max_length``), naming ``source``.
    """
    import torch

    from finetune_sdk.models.pairwise import pairwise_counts
    from finetune_sdk.objectives.dpo_training import each_sequence_logps
    from finetune_sdk.models.scoring import require_rows, scored_rows

    require_rows(len(encoded.examples), encoded.dropped, source,
                 "have a chosen or rejected answer cut off entirely by max_length")
    n = len(encoded.examples)
    sequences = [ex[side] for side in ("chosen", "rejected") for ex in encoded.examples]
    sums = torch.tensor(each_sequence_logps(model, sequences), dtype=torch.float64)
    counts = torch.tensor([sum(x != IGNORE_INDEX for x in s["labels"][1:]) for s in sequences], dtype=torch.float64)
    means, counts = average_logps(sums, counts)
    losses, margin = pair_loss(means[:n], means[n:])
    nll = nll_term(sums[:n], counts[:n].sum())
    scales = [[beta * float(v) for v in (means[i], means[n + i])] for i in range(n)]
    correct, ties, _ = pairwise_counts(margin.tolist(), scales)
    return {"eval_loss": float(losses.mean() + nll_weight * nll), "reward_accuracy": correct / n,
            "reward_ties": ties, "reward_margin": float(margin.mean()),
            "logp_margin": float((sums[:n] - sums[n:]).mean()), "nll_loss": float(nll),
            **scored_rows(n, encoded.dropped)}


def reference_free_evaluate(objective: Objective, loaded: LoadedModel, plan: TrainingPlan, name: str,
                            options: Mapping[str, Any]) -> dict[str, float]:
    """:meth:`Objective.evaluate` of a reference-free objective (``objective.pair_loss(options)``,
    ``objective.nll_weight(options)``) on ``plan.evals[name]``."""
    eval_set = plan.evals[name]
    return evaluate_reference_free(loaded.model, eval_set.encoded, objective.pair_loss(options),
                                   objective.nll_weight(options), float(options["beta"]),
                                   source=eval_set.rows.source)


class ReferenceFreePairs(PreferencePairs):
    """A preference objective without a reference model (ORPO, SimPO): a subclass gives :meth:`pair_loss` and,
    when its NLL term isn't weighted 1, :meth:`nll_weight`; training (dropout off, as TRL's trainers), the trainer
    class and the held-out metrics are shared."""

    def pair_loss(self, options: Mapping[str, Any]) -> PairLoss:
        """``(chosen mean logps [B], rejected mean logps [B]) -> (losses [B], reward margins [B])``."""
        raise NotImplementedError

    def nll_weight(self, options: Mapping[str, Any]) -> float:
        return 1.0

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.objectives.dpo_training import dropout_disabled

        return dropout_disabled(model)

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        return reference_free_trainer_class(self.pair_loss(options), self.nll_weight(options))

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        return reference_free_evaluate(self, loaded, plan, name, run.options)
