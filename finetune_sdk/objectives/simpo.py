"""``simpo``: SimPO, Simple Preference Optimization with a Reference-Free Reward (Meng et al., 2024), on
(prompt, chosen, rejected) pairs, as TRL's ``CPOTrainer`` computes it with ``loss_type="simpo"``.

The reward of an answer is ``beta`` times its mean token log-probability (length-normalised); the loss asks the
chosen answer's to beat the rejected one's by a target margin ``gamma``::

    loss = -log sigmoid(beta * (logP_c - logP_r) - gamma)  (+ cpo_alpha * NLL(chosen))

Options, by TRL's ``CPOConfig`` names: ``beta`` and ``simpo_gamma`` (the paper's gamma; TRL divides it by beta
inside the sigmoid's argument, which is the same thing), ``cpo_alpha`` (the NLL weight; 0 is pure SimPO). The
defaults are the paper's recommended ones (beta 2.0, gamma 1.0, so gamma/beta = 0.5), not CPOConfig's CPO
defaults (beta 0.1). No reference model.

Example:
    >>> import torch
    >>> losses, margin = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=1.0)
    >>> round(float(losses[0]), 4), round(float(margin[0]), 4)
    (0.6931, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_sdk.objectives.reference_free import ReferenceFreePairs
from finetune_sdk.options import Option


def simpo_loss(chosen_logps: Any, rejected_logps: Any, beta: float, gamma: float) -> tuple[Any, Any]:
    """SimPO's loss per pair, ``-log sigmoid(beta * (logP_c - logP_r) - gamma)`` ``[B]``, and the reward margin
    ``beta * (logP_c - logP_r)`` ``[B]``, from the answers' mean token log-probabilities ``[B]`` (TRL
    ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``, ``label_smoothing=0``)."""
    import torch

    logits = (chosen_logps - rejected_logps) - gamma / beta
    return -torch.nn.functional.logsigmoid(beta * logits), beta * (chosen_logps - rejected_logps)


class SimplePreferenceOptimization(ReferenceFreePairs):
    """``simpo``: SimPO's margin loss on length-normalised rewards (plus ``cpo_alpha`` times the chosen answers'
    NLL); no reference model."""

    name = "simpo"
    label = " + SimPO"
    description = "SimPO (Meng et al., 2024): length-normalised reward with a target margin, no reference model"
    options = (
        Option("beta", float, 2.0, "SimPO: scale of the length-normalised reward (TRL CPOConfig.beta; the paper's "
               "beta, 2.0-2.5 there)", exclusive_minimum=0),
        Option("simpo_gamma", float, 1.0, "SimPO: target reward margin gamma (TRL CPOConfig.simpo_gamma)", minimum=0),
        Option("cpo_alpha", float, 0.0, "SimPO: weight of the chosen answers' NLL (TRL CPOConfig.cpo_alpha; 0: pure "
               "SimPO)", minimum=0),
    )
    metrics = ("eval_loss", "reward_accuracy", "reward_ties", "reward_margin", "logp_margin", "nll_loss")
    memory_note = ("SimPO: chosen and rejected answers go through the model together (2 sequences per example); no "
                   "reference model")

    def pair_loss(self, options: Mapping[str, Any]) -> Any:
        beta, gamma = float(options["beta"]), float(options["simpo_gamma"])
        return lambda chosen, rejected: simpo_loss(chosen, rejected, beta, gamma)

    def nll_weight(self, options: Mapping[str, Any]) -> float:
        return float(options["cpo_alpha"])
