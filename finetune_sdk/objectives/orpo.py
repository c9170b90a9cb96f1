"""``orpo``: ORPO, Monolithic Preference Optimization without Reference Model (Hong et al., 2024), on
(prompt, chosen, rejected) pairs, as TRL's ``ORPOTrainer`` computes it.

With ``P`` an answer's mean token log-probability (length-normalised) and ``odds(y) = P(y) / (1 - P(y))``::

    log_odds = (logP_c - logP_r) - (log(1 - exp(logP_c)) - log(1 - exp(logP_r)))
    loss     = NLL(chosen) - beta * mean(log sigmoid(log_odds))

``beta`` is the paper's lambda (TRL ``ORPOConfig.beta``, default 0.1). No reference model: nothing is computed
before training and no copy is held. The rewards TRL logs are ``beta * logP``; a held-out pair is right when the
chosen answer's is higher.

Example:
    >>> import torch
    >>> losses, margin = orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=0.1)
    >>> round(float(losses[0]), 4), round(float(margin[0]), 4)
    (0.032, 0.05)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_sdk.objectives.reference_free import ReferenceFreePairs
from finetune_sdk.options import Option


def orpo_loss(chosen_logps: Any, rejected_logps: Any, beta: float) -> tuple[Any, Any]:
    """ORPO's odds-ratio term per pair, ``-beta * log sigmoid(log_odds)`` ``[B]``, and the reward margin
    ``beta * (logP_c - logP_r)`` ``[B]``, from the answers' mean token log-probabilities ``[B]`` (TRL
    ``ORPOTrainer.odds_ratio_loss``, sign flipped to a loss). The whole loss adds the NLL of the chosen answers."""
    import torch

    log_odds = (chosen_logps - rejected_logps) - (
        torch.log1p(-torch.exp(chosen_logps)) - torch.log1p(-torch.exp(rejected_logps)))
    return -beta * torch.nn.functional.logsigmoid(log_odds), beta * (chosen_logps - rejected_logps)


class OddsRatioPreferenceOptimization(ReferenceFreePairs):
    """``orpo``: the NLL of the chosen answer plus ``beta`` times ORPO's odds-ratio loss; no reference model."""

    name = "orpo"
    label = " + ORPO"
    description = "ORPO (Hong et al., 2024): SFT plus an odds-ratio preference term, no reference model"
    options = (Option("beta", float, 0.1, "ORPO: weight (the paper's lambda) of the odds-ratio term against the "
                      "chosen answers' NLL (TRL ORPOConfig.beta)", exclusive_minimum=0),)
    metrics = ("eval_loss", "reward_accuracy", "reward_ties", "reward_margin", "logp_margin", "nll_loss")
    memory_note = ("ORPO: chosen and rejected answers go through the model together (2 sequences per example); no "
                   "reference model")

    def pair_loss(self, options: Mapping[str, Any]) -> Any:
        beta = float(options["beta"])
        return lambda chosen, rejected: orpo_loss(chosen, rejected, beta)
