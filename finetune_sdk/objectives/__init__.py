"""Training objectives, a plugin type: what a run optimises, one module per objective.

* ``sft`` (:mod:`.sft`): causal-LM cross-entropy on the response tokens (supervised and text formatters).
* ``dpo`` (:mod:`.dpo`): Direct Preference Optimization (Rafailov et al., 2023) on (prompt, chosen, rejected) pairs,
  the default for ``preference`` rows.
* ``orpo`` (:mod:`.orpo`): ORPO (Hong et al., 2024), odds-ratio preference optimisation without a reference model.
* ``simpo`` (:mod:`.simpo`): SimPO (Meng et al., 2024), a length-normalised reward with a target margin, no
  reference model.
* ``kto`` (:mod:`.kto`): KTO (Ethayarajh et al., 2024) on unpaired (prompt, completion, label) rows.
* ``grpo`` (:mod:`.grpo`): online RL with GRPO (Shao et al., 2024) on prompt rows against rewards.
* ``classification-head`` (:mod:`.classification`): a classifier head's cross-entropy.
* ``reward-modeling`` (:mod:`.reward_modeling`): a pairwise Bradley-Terry reward model.

They register through the ``register_objectives`` hook (:mod:`.builtin`), and a plugin's objective subclasses
:class:`Objective` (``finetune_sdk.plugin_api.Objective``) the same way. :func:`objective_for` chooses one.

Example:
    >>> objective_for("preference", "causal-lm").name, objective_for("causal-lm", "causal-lm").name
    ('dpo', 'sft')
    >>> objective_for("preference", "classification").name, objective_for("kto", "causal-lm").name
    ('classification-head', 'kto')
    >>> objective_for("prompt", "causal-lm").name, objective_for("preference", "reward").name
    ('grpo', 'reward-modeling')
"""

from __future__ import annotations

from finetune_sdk.objectives.base import ListDataset, Objective, TrainingInputs
from finetune_sdk.objectives.choice import (get_objective, objective_for, registered_objectives,
                                            resolve_objective_options, run_options)
from finetune_sdk.objectives.pairs import PreferencePairs

__all__ = ["ListDataset", "Objective", "PreferencePairs", "TrainingInputs", "get_objective", "objective_for",
           "registered_objectives", "resolve_objective_options", "run_options"]
