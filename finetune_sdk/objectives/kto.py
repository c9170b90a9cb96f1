"""``kto``: KTO (Ethayarajh et al., 2024) on unpaired (prompt, completion, label) rows; the loss is in
:mod:`finetune_sdk.objectives.kto_training`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.encoding import Encoded
from finetune_sdk.formatter import KTO, Formatter
from finetune_sdk.objectives.base import Objective
from finetune_sdk.options import Option

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


class KahnemanTverskyOptimization(Objective):
    """``kto``: the KTO loss on unpaired desirable/undesirable completions, against the log-probabilities of the
    policy as it stands when KTO starts, computed once before the first step (as for DPO); the KL reference point
    from mismatched (prompt, completion) pairs. Dropout off while training. See :mod:`finetune_sdk.objectives.kto_training`."""

    name = "kto"
    label = " + KTO"
    description = "KTO (Ethayarajh et al., 2024) on rated answers (prompt, completion, label)"
    formatter_tasks = frozenset({KTO})
    default = True
    options = (
        Option("beta", float, 0.1, "KTO: how far the policy may move from the reference (TRL KTOConfig.beta)",
               exclusive_minimum=0),
        Option("desirable_weight", float, 1.0, "KTO: weight of the desirable (label true) rows' loss",
               exclusive_minimum=0),
        Option("undesirable_weight", float, 1.0, "KTO: weight of the undesirable (label false) rows' loss",
               exclusive_minimum=0),
    )
    renamed_options = {"kto_beta": "beta"}
    metrics = ("eval_loss", "kto_kl", "desirable_accuracy")
    memory_note = ("KTO: the reference log-probs are computed once before training (no second model is held); each "
                   "step adds a forward pass without gradient over the batch's mismatched pairs (about 1.3x the "
                   "compute of SFT on the same rows, no more peak memory)")

    def loss_at_reference(self, options: Mapping[str, Any]) -> float | None:
        """``1 - sigmoid(0) = 0.5`` per row while the policy is its reference (rewards and z0 are 0), with both
        weights 1 (other weights: depends on the label balance, None)."""
        return 0.5 if options["desirable_weight"] == options["undesirable_weight"] == 1.0 else None

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        from finetune_sdk.objectives.kto_training import encode_kto

        return encode_kto(rows, formatter, tokenizer, options)

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        from finetune_sdk.objectives.kto_training import check_label_balance

        check_label_balance(encoded.examples, options["desirable_weight"], options["undesirable_weight"], source)

    def after_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        from finetune_sdk.objectives.kto_training import precompute_kto_reference

        batch = options["per_device_eval_batch_size"]
        for encoded in (plan.train, *(s.encoded for s in plan.evals.values())):
            precompute_kto_reference(model, encoded, tokenizer.pad_token_id, batch)

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.objectives.dpo_training import dropout_disabled

        return dropout_disabled(model)

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.objectives.kto_training import kto_trainer_class

        cls = kto_trainer_class()
        cls.beta, cls.desirable_weight = options["beta"], options["desirable_weight"]
        cls.undesirable_weight = options["undesirable_weight"]
        return cls

    def collator(self, run: RunSpec, plan: TrainingPlan, tokenizer: Any) -> Any:
        from finetune_sdk.objectives.kto_training import KTOCollator

        return KTOCollator(tokenizer.pad_token_id)

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        from finetune_sdk.objectives.kto_training import evaluate_kto

        eval_set = plan.evals[name]
        return evaluate_kto(loaded.model, eval_set.encoded, loaded.tokenizer.pad_token_id, run.options,
                            source=eval_set.rows.source)
