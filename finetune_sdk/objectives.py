"""Training objectives as small strategies: what a run optimises, chosen in one place (:func:`objective_for`).

An objective decides how rows are encoded, what happens to the model before training (the DPO reference), which
transformers ``Trainer`` class and collator train it, whether packing applies, and how a held-out set is scored.
The run engine (:mod:`finetune_sdk.run_engine`) asks the plan's objective and never branches on its name, so a new
objective (KTO, an RL objective, a federated round's local step) is a new class registered in :data:`OBJECTIVES`.

* ``sft``: causal-LM cross-entropy on the response tokens (supervised and text formatters; multi-task mixtures).
* ``dpo``: Direct Preference Optimization (Rafailov et al., 2023) on (prompt, chosen, rejected) pairs.
* ``kto``: KTO (Ethayarajh et al., 2024) on unpaired (prompt, completion, label) rows (see :mod:`finetune_sdk.kto`).
* ``grpo``: online RL with Group Relative Policy Optimization (Shao et al., 2024) on prompt rows, against reward
  functions and/or a reward model (see :mod:`finetune_sdk.grpo`).
* ``classification-head``: cross-entropy of a classifier head (the ``classifier`` technique; preference pairs
  become pointwise chosen/rejected rows).
* ``reward-modeling``: the Bradley-Terry loss of a pairwise reward model (the ``reward-model`` technique) on
  (prompt, chosen, rejected) pairs.

Example:
    >>> objective_for("preference", "causal-lm").name, objective_for("supervised", "causal-lm").name
    ('dpo', 'sft')
    >>> objective_for("preference", "classification").name, objective_for("kto", "causal-lm").name
    ('classification-head', 'kto')
    >>> objective_for("prompt", "causal-lm").name, objective_for("preference", "reward").name
    ('grpo', 'reward-modeling')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from finetune_sdk.encoding import Collator, Encoded, encode_causal, encode_classification
from finetune_sdk.errors import unknown_name_error
from finetune_sdk.formatter import CLASSIFICATION, KTO, PREFERENCE, PROMPT, REWARD, Formatter

if TYPE_CHECKING:
    from finetune_sdk.data import Rows
    from finetune_sdk.planning import TrainingPlan
    from finetune_sdk.run_engine import RunSpec

logger = logging.getLogger("finetune_sdk")


class ListDataset:
    """A list of encoded examples as a map-style dataset."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


@dataclass
class TrainingInputs:
    """What the transformers ``Trainer`` is built from: the module to train, the datasets, the collator, the class.

    ``eval_dataset`` is one dataset, a ``{name: dataset}`` dict (multi-task: ``eval_<name>_loss`` logs) or None.
    """

    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    trainer_class: type


class Objective:
    """Base class of objectives; the defaults are those of supervised causal-LM training."""

    name: ClassVar[str]
    #: Shown after the technique in the run's first log line (``lora + DPO on ...``).
    label: ClassVar[str] = ""
    #: Examples may be packed into rows (finetune_sdk.packing) and batches grouped by length.
    packs: ClassVar[bool] = False

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        """Rows as encoded examples (``input_ids``/``labels`` lists, or what :meth:`collator` stacks)."""
        return encode_causal(rows, formatter, tokenizer, options)

    def check_options(self, options: Mapping[str, Any], host: Any) -> None:
        """Refuse options this objective can't train with, before any model loads (e.g. GRPO without a reward)."""

    def check_rows(self, rows: Rows) -> None:
        """Warn about (or refuse) training rows that can't teach this objective, before they are encoded."""

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        """Warn about (or refuse) encoded training examples that can't teach this objective."""

    def before_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        """Run on the loaded model before the technique prepares it."""

    def after_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        """Run on the prepared model, as it stands before the first step (e.g. a reference model's scores)."""

    def while_training(self, model: Any) -> Any:
        """A context manager the training loop runs in (e.g. dropout off); by default nothing changes."""
        import contextlib

        return contextlib.nullcontext()

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        """The transformers ``Trainer`` class to train with (``base`` is ``transformers.Trainer``)."""
        return base

    def collator(self, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        """The data collator that stacks a batch of encoded examples."""
        return Collator(tokenizer.pad_token_id)

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
        """The model, datasets, collator and ``Trainer`` class a run of this objective trains with."""
        from transformers import Trainer as HFTrainer

        evals = {name or "eval": ListDataset(s.encoded.examples) for name, s in plan.evals.items()}
        eval_dataset: Any = None
        if evals:
            eval_dataset = evals if len(evals) > 1 or "" not in plan.evals else next(iter(evals.values()))
        return TrainingInputs(model, ListDataset(plan.train.examples), eval_dataset,
                              self.collator(plan, tokenizer, run.options), self.trainer_class(HFTrainer, run.options))

    def evaluate(self, loaded: Any, plan: TrainingPlan, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Final metrics of the trained model (a LoadedModel) on the held-out set ``plan.evals[name]``."""
        eval_set = plan.evals[name]
        previous, loaded.formatter = loaded.formatter, eval_set.formatter
        try:
            return loaded.evaluate(eval_set.rows, batch_size=options["per_device_eval_batch_size"])
        finally:
            loaded.formatter = previous


class SupervisedFineTuning(Objective):
    """``sft``: next-token cross-entropy on response tokens; packing and length grouping apply."""

    name = "sft"
    packs = True

    def check_rows(self, rows: Rows) -> None:
        from finetune_sdk.data_checks import check_answers

        check_answers(rows.rows, rows.source)

    def collator(self, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        if plan.packed:
            from finetune_sdk.packing import PackingCollator

            row_length = None if plan.varlen else options["max_length"]  # per-example attention: one row, no pad
            return PackingCollator(row_length, tokenizer.pad_token_id, varlen_kwargs=plan.varlen)
        return Collator(tokenizer.pad_token_id)


class PreferencePairs(Objective):
    """Base of the objectives on (prompt, chosen, rejected) pairs: encoded, checked and batched as pairs."""

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        from finetune_sdk.preference import encode_preference

        return encode_preference(rows, formatter, tokenizer, options)

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        from finetune_sdk.data_checks import check_pairs

        check_pairs(encoded.examples, source)

    def collator(self, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        from finetune_sdk.preference import PairCollator

        return PairCollator(tokenizer.pad_token_id)


class DirectPreferenceOptimization(PreferencePairs):
    """``dpo``: the DPO loss against the log-probabilities of the policy as it stands when DPO starts (after the
    technique has prepared it, trained adapters included), computed once before the first step; dropout off while
    training, as TRL's ``disable_dropout``."""

    name = "dpo"
    label = " + DPO"

    def after_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        from finetune_sdk.preference import precompute_reference

        batch = options["per_device_eval_batch_size"]
        precompute_reference(model, plan.train, tokenizer.pad_token_id, batch)
        for eval_set in plan.evals.values():  # alone per answer, as the final evaluation computes the policy's
            precompute_reference(model, eval_set.encoded, tokenizer.pad_token_id, batch, batch_invariant=True)

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.preference import dropout_disabled

        return dropout_disabled(model)

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.preference import dpo_trainer_class

        cls = dpo_trainer_class()
        cls.beta = options["dpo_beta"]
        return cls

    def evaluate(self, loaded: Any, plan: TrainingPlan, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        from finetune_sdk.preference import evaluate_preference

        eval_set = plan.evals[name]
        return evaluate_preference(loaded.model, eval_set.encoded, loaded.tokenizer.pad_token_id,
                                   options["dpo_beta"], options["per_device_eval_batch_size"],
                                   source=eval_set.rows.source)


class KahnemanTverskyOptimization(Objective):
    """``kto``: the KTO loss on unpaired desirable/undesirable completions, against the log-probabilities of the
    policy as it stands when KTO starts, computed once before the first step (as for DPO); the KL reference point
    from mismatched (prompt, completion) pairs. Dropout off while training. See :mod:`finetune_sdk.kto`."""

    name = "kto"
    label = " + KTO"

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        from finetune_sdk.kto import encode_kto

        return encode_kto(rows, formatter, tokenizer, options)

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        from finetune_sdk.kto import check_label_balance

        check_label_balance(encoded.examples, options["desirable_weight"], options["undesirable_weight"], source)

    def after_prepare(self, model: Any, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> None:
        from finetune_sdk.kto import precompute_kto_reference

        batch = options["per_device_eval_batch_size"]
        for encoded in (plan.train, *(s.encoded for s in plan.evals.values())):
            precompute_kto_reference(model, encoded, tokenizer.pad_token_id, batch)

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.preference import dropout_disabled

        return dropout_disabled(model)

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.kto import kto_trainer_class

        cls = kto_trainer_class()
        cls.beta, cls.desirable_weight = options["kto_beta"], options["desirable_weight"]
        cls.undesirable_weight = options["undesirable_weight"]
        return cls

    def collator(self, plan: TrainingPlan, tokenizer: Any, options: Mapping[str, Any]) -> Any:
        from finetune_sdk.kto import KTOCollator

        return KTOCollator(tokenizer.pad_token_id)

    def evaluate(self, loaded: Any, plan: TrainingPlan, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        from finetune_sdk.kto import evaluate_kto

        eval_set = plan.evals[name]
        return evaluate_kto(loaded.model, eval_set.encoded, loaded.tokenizer.pad_token_id, options,
                            source=eval_set.rows.source)


class GroupRelativePolicyOptimization(Objective):
    """``grpo``: sample ``num_generations`` completions per prompt from the policy, score them with the run's
    rewards, normalise within each group and take the clipped surrogate with a KL penalty (``beta``) to the policy
    as it stands when GRPO starts. Dropout is off while training; held-out prompts are scored by the mean reward
    of greedy completions (``eval_reward``), before training (``eval_reward_start``) and after."""

    name = "grpo"
    label = " + GRPO"

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        from finetune_sdk.grpo import encode_prompts

        return encode_prompts(rows, formatter, tokenizer, options)

    def check_options(self, options: Mapping[str, Any], host: Any) -> None:
        from finetune_sdk.rewards import check_reward_sources

        check_reward_sources(options, host)

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.preference import dropout_disabled

        return dropout_disabled(model)

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
        from finetune_sdk.grpo import grpo_training_inputs

        return grpo_training_inputs(run, plan, model, tokenizer, args)

    def evaluate(self, loaded: Any, plan: TrainingPlan, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        from finetune_sdk.grpo import evaluate_prompts

        return evaluate_prompts(loaded.model, plan, name, loaded.tokenizer, options)


class ClassificationHead(Objective):
    """``classification-head``: cross-entropy of the classifier's head over the ``labels`` option's classes.

    With ``cache_features`` the frozen backbone runs once per dataset (see :mod:`finetune_sdk.feature_cache`) and the
    head trains, and is scored, on the cached features.
    """

    name = "classification-head"

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        label_ids = {label: i for i, label in enumerate(options["labels"])}
        return encode_classification(rows, formatter, tokenizer, options, label_ids)

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        from finetune_sdk.data_checks import check_classes

        check_classes([ex["labels"] for ex in encoded.examples], options["labels"], source)

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
        if not (run.options["cache_features"] and hasattr(model, "features")):
            return super().training_inputs(run, plan, model, tokenizer, args)
        from transformers import Trainer as HFTrainer

        from finetune_sdk.feature_cache import classifier_feature_datasets, collate_features, head_model

        train, evals = classifier_feature_datasets(run, plan, model, tokenizer)
        args.include_num_input_tokens_seen = "no"  # feature batches have no input_ids to count
        eval_dataset = (evals if len(evals) > 1 else next(iter(evals.values()))) if evals else None
        return TrainingInputs(head_model(model), train, eval_dataset, collate_features, HFTrainer)

    def evaluate(self, loaded: Any, plan: TrainingPlan, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        if name in plan.eval_features:  # scored from the cached features by the trained head
            from finetune_sdk.feature_cache import evaluate_head
            from finetune_sdk.scoring import require_rows, scored_rows

            encoded, model = plan.evals[name].encoded, loaded.model
            require_rows(len(encoded.examples), encoded.dropped, plan.evals[name].rows.source,
                         "have no tokens to classify")
            return {**evaluate_head(getattr(model, "module", model).head, plan.eval_features[name]),
                    **scored_rows(len(encoded.examples), encoded.dropped)}
        return super().evaluate(loaded, plan, name, options)


class RewardModeling(PreferencePairs):
    """``reward-modeling``: a pairwise reward model (Ouyang et al., 2022), the Bradley-Terry loss
    ``-log sigmoid(r(prompt, chosen) - r(prompt, rejected))`` (:mod:`finetune_sdk.reward_model`). On a frozen
    backbone with ``cache_features`` the head trains, and is scored, on cached features of both answers."""

    name = "reward-modeling"
    label = " + Bradley-Terry reward modeling"

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.reward_model import reward_trainer_class

        return reward_trainer_class(float(options.get("center_rewards_coefficient") or 0.0))

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any,
                        args: Any) -> TrainingInputs:
        if not run.options["cache_features"] or getattr(model, "train_backbone", True):
            return super().training_inputs(run, plan, model, tokenizer, args)
        from finetune_sdk.reward_model import head_training_inputs

        return head_training_inputs(run, plan, model, tokenizer, args)

    def evaluate(self, loaded: Any, plan: TrainingPlan, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        from finetune_sdk.reward_model import evaluate_reward_model

        return evaluate_reward_model(loaded, plan, name, options)


#: Every objective by name: the one place an objective is chosen from.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (SupervisedFineTuning(), DirectPreferenceOptimization(),
                                                        KahnemanTverskyOptimization(), ClassificationHead(),
                                                        GroupRelativePolicyOptimization(), RewardModeling())}


def objective_for(formatter_task: str, technique_task: str) -> Objective:
    """The objective that trains ``technique_task`` on data a ``formatter_task`` formatter makes."""
    if technique_task == CLASSIFICATION:
        return OBJECTIVES["classification-head"]
    if technique_task == REWARD:
        return OBJECTIVES["reward-modeling"]
    if formatter_task == PREFERENCE:
        return OBJECTIVES["dpo"]
    if formatter_task == KTO:
        return OBJECTIVES["kto"]
    if formatter_task == PROMPT:
        return OBJECTIVES["grpo"]
    return OBJECTIVES["sft"]


def get_objective(name: str) -> Objective:
    """The objective registered as ``name`` (``sft``, ``dpo``, ``kto``, ``grpo``, ``classification-head``,
    ``reward-modeling``)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise unknown_name_error("objective", name, OBJECTIVES) from None
