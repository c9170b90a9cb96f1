"""Preference tuning with DPO (Rafailov et al., 2023): the practical RLHF route, on lora, qlora or full.

The reference model's log-probabilities are computed once, before the first DPO step, from the policy as it stands
when DPO starts, for every technique: the base for a first run, the SFT result (adapter included) when DPO follows
SFT in ``fit([Stage(...), Stage(...)])``. Held-out pairs get theirs at the same moment, so evaluating them after
training compares with the same starting point. No second copy of the model is held.
The loss is ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over (prompt, chosen, rejected) pairs,
with ``pi`` the summed log-probability of the response tokens. Dropout is off while DPO trains (as in TRL).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from finetune_sdk.data.rows import Rows
from finetune_sdk.data.encoding import IGNORE_INDEX, Collator, Encoded, encode_segments
from finetune_sdk.formatter import PREFERENCE

__all__ = ["PREFERENCE", "PairCollator", "dpo_loss", "evaluate_preference", "precompute_reference", "sequence_logps"]


class PairCollator:
    """Stacks a batch of pairs as ``[chosen..., rejected...]`` rows, right-padded to one width."""

    def __init__(self, pad_token_id: int) -> None:
        self.inner = Collator(pad_token_id)

    def __call__(self, batch: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        sequences = [ex["chosen"] for ex in batch] + [ex["rejected"] for ex in batch]
        out = self.inner(sequences)
        if "ref_chosen" in batch[0]:
            out["ref_logps"] = torch.tensor([ex["ref_chosen"] for ex in batch] + [ex["ref_rejected"] for ex in batch],
                                            dtype=torch.float32)
        return out


def sequence_logps(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
    """Summed log-probability of the labelled (response) tokens of each row."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(policy: Any, reference: Any, beta: float) -> tuple[Any, Any]:
    """DPO loss and per-pair reward margin from ``[2B]`` summed log-probs (chosen first, then rejected)."""
    import torch

    half = policy.shape[0] // 2
    chosen_reward = beta * (policy[:half] - reference[:half])
    rejected_reward = beta * (policy[half:] - reference[half:])
    margin = chosen_reward - rejected_reward
    return -torch.nn.functional.logsigmoid(margin).mean(), margin


def reference_batches(model: Any, encoded: Encoded, collate: Any, batch_size: int) -> Iterator[tuple[list, dict]]:
    """``(examples, batch on the model's device)`` over ``encoded`` in eval mode and without gradients (training
    mode restored afterwards): the loop that stores a reference policy's log-probs (DPO, KTO)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(encoded.examples), batch_size):
                chunk = encoded.examples[start:start + batch_size]
                yield chunk, {k: v.to(device) for k, v in collate(chunk).items()}
    finally:
        model.train(was_training)


def each_sequence_logps(model: Any, sequences: list[Mapping[str, Any]]) -> list[float]:
    """Summed response log-probs of encoded sequences (``input_ids``, ``labels``), batch-invariant: each distinct
    sequence runs alone (one row, no padding; :func:`finetune_sdk.models.pairwise.each_distinct`), so the same answer gets
    bit-for-bit the same log-prob as chosen or as rejected, whatever else is evaluated with it. Eval mode, no
    gradients (training mode restored afterwards)."""
    import torch

    from finetune_sdk.models.pairwise import each_distinct

    device = next(model.parameters()).device
    was_training = model.training

    def logp(sequence: Mapping[str, Any]) -> float:
        input_ids = torch.tensor([sequence["input_ids"]], dtype=torch.long, device=device)
        labels = torch.tensor([sequence["labels"]], dtype=torch.long, device=device)
        return float(sequence_logps(model, input_ids, torch.ones_like(input_ids), labels)[0])

    model.eval()
    try:
        with torch.no_grad():
            return each_distinct(sequences, logp, key=lambda s: (tuple(s["input_ids"]), tuple(s["labels"])))
    finally:
        model.train(was_training)


def precompute_reference(model: Any, encoded: Encoded, pad_token_id: int, batch_size: int, *,
                         batch_invariant: bool = False) -> None:
    """Store ``model``'s summed log-probs in each pair (``ref_chosen``/``ref_rejected``): call it with the policy as
    it stands when DPO starts (adapters stay on: a trained adapter is part of the starting point). With
    ``batch_invariant`` (held-out pairs) each answer is computed alone, as :func:`evaluate_preference` computes the
    policy's (:func:`each_sequence_logps`)."""
    if batch_invariant:
        logps = each_sequence_logps(model, [ex[side] for side in ("chosen", "rejected") for ex in encoded.examples])
        for i, example in enumerate(encoded.examples):
            example["ref_chosen"], example["ref_rejected"] = logps[i], logps[len(encoded.examples) + i]
        return
    for chunk, batch in reference_batches(model, encoded, PairCollator(pad_token_id), batch_size):
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).cpu()
        for i, example in enumerate(chunk):
            example["ref_chosen"] = float(logps[i])
            example["ref_rejected"] = float(logps[len(chunk) + i])


def evaluate_preference(model: Any, encoded: Encoded, pad_token_id: int, beta: float,
                        batch_size: int = 8, source: str = "eval_data") -> dict[str, float]:
    """DPO loss, reward accuracy and the chosen-over-rejected log-probability margin on held-out pairs.

    ``reward_accuracy`` is the share of pairs whose implicit reward margin ``beta * ((pi_c - ref_c) - (pi_r -
    ref_r))`` is above float tolerance; ``reward_ties`` counts the pairs within it (:func:`finetune_sdk.models.pairwise.
    is_tie` against the log-probs' magnitude), never correct. Every answer is computed alone
    (:func:`each_sequence_logps`), so a pair of identical answers has a margin of exactly 0.

    References stored by :func:`precompute_reference` at the start of DPO are used; pairs without them get
    ``model`` itself as the reference (so the margin is 0: call this on a model before training to get a baseline).
    ``batch_size`` is accepted and not used.
    """
    import torch

    from finetune_sdk.models.pairwise import pairwise_counts
    from finetune_sdk.models.scoring import require_rows, scored_rows

    require_rows(len(encoded.examples), encoded.dropped, source,
                 "have a chosen or rejected answer cut off entirely by max_length")
    if "ref_chosen" not in encoded.examples[0]:
        precompute_reference(model, encoded, pad_token_id, batch_size, batch_invariant=True)
    n = len(encoded.examples)
    policy = torch.tensor(each_sequence_logps(model, [ex[side] for side in ("chosen", "rejected")
                                                      for ex in encoded.examples]), dtype=torch.float64)
    reference = torch.tensor([ex["ref_chosen"] for ex in encoded.examples] +
                             [ex["ref_rejected"] for ex in encoded.examples], dtype=torch.float64)
    loss, margin = dpo_loss(policy, reference, beta)
    scales = [[beta * v for v in (policy[i], policy[n + i], reference[i], reference[n + i])] for i in range(n)]
    correct, ties, _ = pairwise_counts(margin.tolist(), scales)
    return {"eval_loss": float(loss), "reward_accuracy": correct / n, "reward_ties": ties,
            "reward_margin": float(margin.mean()), "logp_margin": float((policy[:n] - policy[n:]).mean()),
            **scored_rows(n, encoded.dropped)}


@contextmanager
def dropout_disabled(model: Any) -> Iterator[None]:
    """Dropout off in ``model`` for the duration (restored afterwards), as TRL's ``DPOConfig(disable_dropout=True)``
    does: the reference was computed without dropout, so a policy that hasn't moved has the same log-probs and a
    loss of exactly log 2."""
    import torch

    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]  # fused LoRA layers read theirs
    saved = [m.p for m in dropouts]
    for module in dropouts:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in zip(dropouts, saved):
            module.p = p


def dpo_trainer_class() -> type:
    """A transformers ``Trainer`` whose loss is DPO's (built lazily so importing this module stays light): the mean
    over the optimizer step's pairs, so gradient accumulation trains as the bigger batch
    (:mod:`finetune_sdk.training.accumulation`), a shorter last micro-batch included."""
    from transformers import Trainer as HFTrainer

    from finetune_sdk.training.accumulation import step_batch_trainer_class

    class DPOTrainer(step_batch_trainer_class(HFTrainer)):  # type: ignore[misc]
        beta = 0.1

        def examples_in(self, batch):
            return batch["input_ids"].shape[0] // 2

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            policy = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            _, margin = dpo_loss(policy, inputs["ref_logps"], self.beta)
            loss = self.step_mean(-torch.nn.functional.logsigmoid(margin).sum(), len(margin), num_items_in_batch)
            return (loss, {"margin": margin}) if return_outputs else loss

        prediction_step = loss_only_prediction_step

    return DPOTrainer


def loss_only_prediction_step(self: Any, model: Any, inputs: Any, prediction_loss_only: bool,
                              ignore_keys: Any = None) -> tuple[Any, None, None]:
    """A transformers ``Trainer.prediction_step`` for objectives whose batches have no logits to return (DPO, KTO,
    the reward model): the batch's loss without gradients, and nothing else."""
    import torch

    inputs = self._prepare_inputs(inputs)
    with torch.no_grad():
        loss = self.compute_loss(model, inputs)
    return loss.detach(), None, None

