"""The pairwise reward model: a backbone (frozen, or LoRA-tuned) and a linear head giving one scalar per sequence.

Trained with the Bradley-Terry loss of InstructGPT (Ouyang et al., 2022), as TRL's ``RewardTrainer`` does:
``-log sigmoid(r(x, y_chosen) - r(x, y_rejected))`` averaged over pairs, plus TRL's optional
``center_rewards_coefficient * mean((r_chosen + r_rejected)^2)`` that keeps rewards near 0 (Eisenstein et al.,
2023). The loss is written here rather than taken from TRL's ``RewardTrainer`` because that trainer tokenizes its
own dataset columns; the SDK's formatters, checkpoints, feature cache and one-line errors need the data layer and
the transformers ``Trainer`` the run engine already builds.

The reward of a (prompt, completion) is the head applied to the pooled hidden state of the preference formatter's
rendering of prompt + completion (pooling ``last``, the final token, for decoder models).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from finetune_sdk.models.classifier_model import ClassifierModel
from finetune_sdk.data.encoding import Encoded, encode_segments

#: The label a reward model's (single) output is known by in a manifest's ``labels`` and ``predict``.
REWARD_LABEL = "reward"


class RewardModel(ClassifierModel):
    """A ``backbone`` (a transformers base model, or a PEFT model around one) and a ``head`` mapping its pooled
    hidden state ``[batch, hidden]`` to a reward ``[batch, 1]`` (float32 logits; higher = better).

    With ``train_backbone=False`` the backbone is frozen and runs without gradients (only the head trains); with
    ``True`` its trainable parameters (LoRA adapters) get gradients through the pooled features.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = RewardModel(transformers.LlamaModel(cfg), pooling="last", pad_token_id=0)
        >>> model.rewards(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])).shape
        torch.Size([2])
    """

    def __init__(self, backbone: Any, pooling: str, pad_token_id: int | None, train_backbone: bool = False) -> None:
        super().__init__(backbone, 1, pooling, pad_token_id)
        self.labels = [REWARD_LABEL]
        self.train_backbone = train_backbone

    def train(self, mode: bool = True) -> RewardModel:
        """Train mode for what trains: the whole model with a LoRA backbone, else the head only."""
        nn.Module.train(self, mode)
        if not self.train_backbone:
            self.backbone.eval()
        return self

    @property
    def activation_checkpointing_enable(self) -> Any:
        """Recompute the LoRA-tuned backbone's activations in the backward pass (the transformers ``Trainer`` calls
        it for ``gradient_checkpointing=True``). A frozen backbone has no such method: it runs without gradients,
        so there is nothing to recompute (the run logs that)."""
        if not self.train_backbone:
            raise AttributeError("activation_checkpointing_enable")
        return self._enable_backbone_checkpointing

    def _enable_backbone_checkpointing(self, activation_checkpointing_kwargs: Any = None, **kwargs: Any) -> None:
        base = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                             **kwargs)
        base.enable_input_require_grads()  # reentrant checkpointing passes gradients to the adapters only so

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[batch, hidden]`` (float32); with gradients only when the backbone trains."""
        if not self.train_backbone:
            return super().features(input_ids, attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.pool(out.last_hidden_state, attention_mask).float()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per row, ``[batch]`` float32."""
        return self(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.features(input_ids, attention_mask).to(self.head.weight.dtype))
        return SequenceClassifierOutput(logits=logits)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       center_rewards_coefficient: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Mean ``-log sigmoid(chosen - rejected)`` over ``[pairs]`` rewards, plus
    ``center_rewards_coefficient * mean((chosen + rejected)^2)`` when the coefficient is not 0; with
    ``reduction="sum"`` the sum over the pairs of the same per-pair terms (a step's share under accumulation).

    >>> round(float(bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0]))), 4)  # log 2
    0.6931
    """
    per_pair = -nn.functional.logsigmoid(chosen.float() - rejected.float())
    if center_rewards_coefficient:
        per_pair = per_pair + center_rewards_coefficient * (chosen.float() + rejected.float()) ** 2
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor,
                     center_rewards_coefficient: float = 0.0) -> dict[str, float]:
    """Held-out metrics of ``[pairs]`` rewards: ``eval_loss`` (the training loss), ``pairwise_accuracy`` (share of
    pairs whose chosen answer gets the higher reward by more than float tolerance), ``pairwise_ties`` (the number of
    pairs whose margin is within it: :func:`finetune_sdk.models.pairwise.is_tie`; a tie is never correct),
    ``reward_margin`` (mean chosen - rejected) and ``mean_reward`` (over every answer).

    >>> m = pairwise_metrics(torch.tensor([2.0, 0.0, 0.5]), torch.tensor([1.0, 1.0, 0.5 + 6e-8]))
    >>> m["pairwise_accuracy"], m["pairwise_ties"], round(m["mean_reward"], 4)
    (0.3333333333333333, 1, 0.8333)
    """
    from finetune_sdk.models.pairwise import pairwise_counts

    margin = chosen.float() - rejected.float()
    correct, ties, _ = pairwise_counts(margin.tolist(), zip(chosen.tolist(), rejected.tolist()))
    return {"eval_loss": float(bradley_terry_loss(chosen, rejected, center_rewards_coefficient)),
            "pairwise_accuracy": correct / len(margin), "pairwise_ties": ties,
            "reward_margin": float(margin.mean()),
            "mean_reward": float(torch.cat([chosen, rejected]).float().mean())}


def pair_rewards(model: Any, encoded: Encoded, pad_token_id: int, batch_size: int = 1) -> tuple[Any, Any]:
    """(chosen, rejected) rewards ``[pairs]`` float32 of encoded pairs (``{"chosen": ..., "rejected": ...}``
    examples), batch-invariant (:func:`sequence_rewards`: the same answer text gets the same reward in either
    column)."""
    sequences = [ex[side]["input_ids"] for side in ("chosen", "rejected") for ex in encoded.examples]
    rewards = torch.tensor(sequence_rewards(model, sequences, pad_token_id, batch_size), dtype=torch.float32)
    return rewards[:len(encoded.examples)], rewards[len(encoded.examples):]


def evaluate_pairs(model: Any, encoded: Encoded, pad_token_id: int, batch_size: int = 8, *,
                   source: str = "eval_data", center_rewards_coefficient: float = 0.0) -> dict[str, float]:
    """:func:`pairwise_metrics` of ``model`` on held-out pairs, with ``eval_rows_scored``/``eval_rows_skipped``;
    :class:`~finetune_sdk.errors.DataError` naming ``source`` when no pair is left to score. Every answer is
    scored on its own (batch-invariant: :func:`sequence_rewards`); ``batch_size`` is accepted and not used."""
    from finetune_sdk.models.scoring import require_rows, scored_rows

    require_rows(len(encoded.examples), encoded.dropped, source,
                 "have a chosen or rejected answer cut off entirely by max_length")
    chosen, rejected = pair_rewards(model, encoded, pad_token_id)
    return {**pairwise_metrics(chosen, rejected, center_rewards_coefficient),
            **scored_rows(len(encoded.examples), encoded.dropped)}


def sequence_rewards(model: Any, sequences: Sequence[list[int]], pad_token_id: int,
                     batch_size: int = 1) -> list[float]:
    """One reward per token-id list, in order, batch-invariant: each distinct sequence runs alone (one row, no
    padding; :func:`finetune_sdk.models.pairwise.each_distinct`), so a text's reward is bit-for-bit the same whichever
    texts are scored with it and in whichever row. ``batch_size`` (and ``pad_token_id``: nothing is padded) are
    accepted for callers and not used: in padded batches a reward changed in its last bits with the batch."""
    from finetune_sdk.models.pairwise import each_distinct

    device = next(model.parameters()).device
    model.eval()

    def reward(ids: Sequence[int]) -> float:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        return float(model.rewards(input_ids, torch.ones_like(input_ids))[0])

    with torch.no_grad():
        return each_distinct(list(sequences), reward, key=tuple)


def completion_ids(formatter: Any, prompt: str, completion: str, tokenizer: Any,
                   options: Mapping[str, Any]) -> list[int]:
    """Token ids of (prompt, completion) rendered as the preference formatter renders a training pair's answer
    (its ``pair_segments`` with the completion as both answers), cut to ``max_length``."""
    row = {"prompt": prompt, "chosen": completion, "rejected": completion}
    segments = formatter.pair_segments(row, tokenizer, options)[0]
    return encode_segments(segments, tokenizer, options.get("max_length"))["input_ids"]
