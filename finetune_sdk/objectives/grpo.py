"""``grpo``: online RL with Group Relative Policy Optimization (Shao et al., 2024) on prompt rows, against reward
functions and/or a reward model (see :mod:`finetune_sdk.objectives.grpo_training`). Its options are TRL ``GRPOConfig``'s names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.encoding import Encoded
from finetune_sdk.formatter import PROMPT, Formatter
from finetune_sdk.objectives.base import Objective, TrainingInputs
from finetune_sdk.options import Option

if TYPE_CHECKING:
    from finetune_sdk.models.inference import LoadedModel
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


GRPO_OPTIONS: tuple[Option, ...] = (
    Option("num_generations", int, 8, "GRPO: completions sampled per prompt (the group whose rewards are "
           "normalised together)", minimum=2),
    Option("max_completion_length", int, 256, "GRPO: most tokens sampled per completion", minimum=1),
    Option("beta", float, 0.04, "GRPO: weight of the KL penalty to the reference (the policy when GRPO starts; "
           "0: no reference)", minimum=0),
    Option("temperature", float, 1.0, "GRPO: sampling temperature of the completions", exclusive_minimum=0),
    Option("top_p", float, 1.0, "GRPO: nucleus sampling, keep the most likely tokens up to this probability "
           "(1: off; the loss scores the truncated distribution)", exclusive_minimum=0, maximum=1),
    Option("top_k", int, 0, "GRPO: sample from the k most likely tokens only (0: off; the loss scores the "
           "truncated distribution)", minimum=0),
    Option("min_p", float, None, "GRPO: drop tokens below min_p times the top token's probability (off unless "
           "set; the loss scores the truncated distribution)", minimum=0, maximum=1),
    Option("repetition_penalty", float, 1.0, "GRPO: penalty on tokens of the prompt and the completion so far (1: "
           "off; > 1 repeats less; the loss scores the penalised distribution)", exclusive_minimum=0),
    Option("epsilon", float, 0.2, "GRPO: clip range of the probability ratio (PPO's epsilon)", exclusive_minimum=0,
           exclusive_maximum=1),
    Option("num_iterations", int, 1, "GRPO: optimizer steps on each sampled group (PPO's mu); > 1 reuses the "
           "samples, the clip bounding how far the policy moves from the one that sampled them", minimum=1),
    Option("reward_funcs", list, None, "GRPO: reward functions, by name (registered by plugins) or, in Python, "
           "as callables fn(prompts, completions, **columns) -> list[float]", minimum=1),
    Option("reward_weights", list, None, "GRPO: weight of each reward in the total (reward_funcs in order, then "
           "reward_model); default 1 each", minimum=1),
    Option("reward_model", str, None, "GRPO: a reward model (result folder or registry ref) whose score(prompts, "
           "completions) is a reward"),
)


class GroupRelativePolicyOptimization(Objective):
    """``grpo``: sample ``num_generations`` completions per prompt from the policy, score them with the run's
    rewards, normalise within each group and take the clipped surrogate with a KL penalty (``beta``) to the policy
    as it stands when GRPO starts. Dropout is off while training; held-out prompts are scored by the mean reward
    of greedy completions (``eval_reward``), before training (``eval_reward_start``) and after."""

    name = "grpo"
    label = " + GRPO"
    description = "online RL: Group Relative Policy Optimization (Shao et al., 2024) on prompts and rewards"
    formatter_tasks = frozenset({PROMPT})
    default = True
    options = GRPO_OPTIONS
    metrics = ("eval_reward", "eval_reward_start")

    def reference_copies(self, options: Mapping[str, Any]) -> int:
        """The reference's copy of the trainable weights when the KL penalty is on (``beta > 0``)."""
        return 1 if float(options.get("beta", 0.04) or 0) > 0 else 0

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        from finetune_sdk.objectives.grpo_training import encode_prompts

        return encode_prompts(rows, formatter, tokenizer, options)

    def check_options(self, options: Mapping[str, Any], host: Any) -> None:
        from finetune_sdk.objectives.reward_functions import check_reward_sources

        check_reward_sources(options, host)

    def while_training(self, model: Any) -> Any:
        from finetune_sdk.objectives.dpo_training import dropout_disabled

        return dropout_disabled(model)

    def training_inputs(self, run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
        from finetune_sdk.objectives.grpo_training import grpo_training_inputs

        return grpo_training_inputs(run, plan, model, tokenizer, args)

    def evaluate(self, loaded: LoadedModel, plan: TrainingPlan, name: str, run: RunSpec) -> dict[str, Any]:
        from finetune_sdk.objectives.grpo_training import evaluate_prompts

        return evaluate_prompts(loaded.model, plan, name, loaded.tokenizer, run)
