"""finetune-sdk-ipo: the ``ipo`` training objective, IPO (Identity Preference Optimisation; Azar et al., 2023,
"A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17), on preference pairs.

With ``h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))`` (summed answer
log-probabilities, the reference being the policy as it stands when IPO starts, as for the SDK's DPO) the loss is
``(h - 1 / (2 * beta))^2``: a squared loss that pulls the margin to ``1 / (2 * beta)`` instead of pushing it to
infinity. ``beta`` is the paper's tau (TRL ``DPOConfig(loss_type="ipo").beta``; TRL averages the log-probabilities
over the answer's tokens, this plugin sums them as the paper writes it).

It subclasses the SDK's DPO objective (reference, batching and metrics) and changes the loss only; nothing here
imports torch at import time.

Example:
    >>> ipo_loss_value(h=0.0, beta=0.5)
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from finetune_sdk.objectives.dpo import DirectPreferenceOptimization
from finetune_sdk.plugin_api import Option, hookimpl

FINETUNE_SDK_PLUGIN_API = (1, 1)


def ipo_loss_value(h: float, beta: float) -> float:
    """IPO's loss of one pair with log-ratio margin ``h``: ``(h - 1 / (2 * beta))^2``."""
    return (h - 1 / (2 * beta)) ** 2


class IdentityPreferenceOptimization(DirectPreferenceOptimization):
    """``ipo``: the squared loss ``(h - 1/(2 beta))^2`` on DPO's log-ratio margin ``h``."""

    name = "ipo"
    label = " + IPO"
    description = "IPO (Azar et al., 2023): a squared loss on DPO's log-ratio margin"
    default = False  # preference pairs still train with dpo unless objective="ipo"
    options = (Option("beta", float, 0.1, "IPO: the paper's tau; the margin is pulled to 1 / (2 beta)",
                      exclusive_minimum=0),)
    renamed_options: Mapping[str, str] = {}

    def loss_at_reference(self, options: Mapping[str, Any]) -> float | None:
        return ipo_loss_value(0.0, float(options["beta"]))

    def trainer_class(self, base: type, options: Mapping[str, Any]) -> type:
        from finetune_sdk.objectives.dpo_training import dpo_trainer_class, sequence_logps

        class IPOTrainer(dpo_trainer_class()):  # type: ignore[misc]
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                policy = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
                h = log_ratio_margin(policy, inputs["ref_logps"])
                losses = (h - 1 / (2 * self.beta)) ** 2
                loss = self.step_mean(losses.sum(), len(h), num_items_in_batch)
                return (loss, {"margin": h}) if return_outputs else loss

        IPOTrainer.beta = float(options["beta"])
        return IPOTrainer

    def evaluate(self, loaded: Any, plan: Any, name: str, run: Any) -> dict[str, Any]:
        """DPO's held-out metrics (reward accuracy, margins), with ``eval_loss`` IPO's."""
        import torch

        from finetune_sdk.objectives.dpo_training import each_sequence_logps

        metrics = super().evaluate(loaded, plan, name, run)
        examples = plan.evals[name].encoded.examples
        policy = torch.tensor(each_sequence_logps(loaded.model, [ex[side] for side in ("chosen", "rejected")
                                                                   for ex in examples]), dtype=torch.float64)
        reference = torch.tensor([ex["ref_chosen"] for ex in examples] + [ex["ref_rejected"] for ex in examples],
                                 dtype=torch.float64)
        h = log_ratio_margin(policy, reference)
        metrics["eval_loss"] = float(((h - 1 / (2 * float(run.options["beta"]))) ** 2).mean())
        return metrics


def log_ratio_margin(policy: Any, reference: Any) -> Any:
    """``h`` per pair from ``[2B]`` summed log-probs (chosen first, then rejected) of the policy and reference."""
    half = policy.shape[0] // 2
    return (policy[:half] - reference[:half]) - (policy[half:] - reference[half:])


@hookimpl
def register_objectives(register: Callable[[type], None]) -> None:
    register(IdentityPreferenceOptimization)
