"""``classification-head``: the cross-entropy of a classifier head (the ``classifier`` technique; preference pairs
become pointwise chosen/rejected rows in the planner).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.encoding import Encoded, encode_classification
from finetune_sdk.formatter import CLASSIFICATION, PREFERENCE, Formatter
from finetune_sdk.objectives.base import Objective, TrainingInputs

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


class ClassificationHead(Objective):
    """``classification-head``: cross-entropy of the classifier's head over the ``labels`` option's classes.

    With ``cache_features`` the frozen backbone runs once per dataset (see :mod:`finetune_sdk.training.feature_cache`) and the
    head trains, and is scored, on the cached features.
    """

    name = "classification-head"
    description = "cross-entropy of a classifier head (technique classifier)"
    formatter_tasks = frozenset({CLASSIFICATION, PREFERENCE})  # pairs: pointwise chosen/rejected rows
    technique_tasks = frozenset({CLASSIFICATION})
    default = True
    metrics = ("eval_loss", "accuracy", "macro_f1")

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        label_ids = {label: i for i, label in enumerate(options["labels"])}
        return encode_classification(rows, formatter, tokenizer, options, label_ids)

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        from finetune_sdk.data.checks import check_classes

        check_classes([ex["labels"] for ex in encoded.examples], options["labels"], source)

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
        if not (run.options["cache_features"] and hasattr(model, "features")):
            return super().training_inputs(run, plan, model, tokenizer, args)
        from transformers import Trainer as HFTrainer

        from finetune_sdk.training.feature_cache import classifier_feature_datasets, collate_features, head_model

        train, evals = classifier_feature_datasets(run, plan, model, tokenizer)
        args.include_num_input_tokens_seen = "no"  # feature batches have no input_ids to count
        eval_dataset = (evals if len(evals) > 1 else next(iter(evals.values()))) if evals else None
        return TrainingInputs(head_model(model), train, eval_dataset, collate_features, HFTrainer)

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        if name in run.state.eval_features:  # scored from the cached features by the trained head
            from finetune_sdk.training.feature_cache import evaluate_head
            from finetune_sdk.models.scoring import require_rows, scored_rows

            encoded, model = plan.evals[name].encoded, loaded.model
            require_rows(len(encoded.examples), encoded.dropped, plan.evals[name].rows.source,
                         "have no tokens to classify")
            return {**evaluate_head(getattr(model, "module", model).head, run.state.eval_features[name]),
                    **scored_rows(len(encoded.examples), encoded.dropped)}
        return super().evaluate(loaded, plan, name, run)
