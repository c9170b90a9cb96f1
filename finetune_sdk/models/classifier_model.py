"""The model the classifier technique trains: a frozen backbone and a linear head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ClassifierModel(nn.Module):
    """Frozen ``backbone`` (a transformers base model) + trainable ``head`` on pooled hidden states.

    Example:
        >>> import torch, transformers
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> model = ClassifierModel(transformers.LlamaModel(cfg), num_labels=3, pooling="last", pad_token_id=0)
        >>> model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3)).logits.shape
        torch.Size([1, 3])
    """

    #: transformers passes ``num_items_in_batch`` (the labelled examples of the whole optimizer step): the loss is
    #: the micro-batch's summed cross-entropy divided by it, so gradient accumulation trains as the bigger batch.
    accepts_loss_kwargs = True

    def __init__(self, backbone: Any, num_labels: int, pooling: str, pad_token_id: int | None) -> None:
        super().__init__()
        self.backbone = backbone
        for param in backbone.parameters():
            param.requires_grad_(False)
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)
        self.pooling = pooling
        self.pad_token_id = pad_token_id
        self.labels: list[str] = [str(i) for i in range(num_labels)]
        self.config = backbone.config

    def train(self, mode: bool = True) -> ClassifierModel:
        """Train mode for the head only: the frozen backbone stays in eval mode (no dropout in its features)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pool ``[batch, seq, hidden]`` states to ``[batch, hidden]`` (batches are right-padded)."""
        if self.pooling == "first":
            return hidden[:, 0]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (no gradient: the backbone is frozen)."""
        with torch.no_grad():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.pool(out.last_hidden_state, attention_mask).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                num_items_in_batch: Any = None, **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.features(input_ids, attention_mask).to(self.head.weight.dtype))
        return SequenceClassifierOutput(loss=classification_loss(logits, labels, num_items_in_batch), logits=logits)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> Any:
    """Cross-entropy of ``[batch, classes]`` logits against ``[batch]`` class ids: the mean over the batch, or the sum
    divided by ``num_items_in_batch`` (the optimizer step's labelled examples, under gradient accumulation) when
    given, as transformers' causal-LM loss does with tokens; None without labels.

    >>> import torch
    >>> float(classification_loss(torch.zeros(2, 2), torch.tensor([0, 1]), num_items_in_batch=4))  # 2 log 2 / 4
    0.3465735912322998
    """
    if labels is None:
        return None
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, labels)
    total = nn.functional.cross_entropy(logits, labels, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
