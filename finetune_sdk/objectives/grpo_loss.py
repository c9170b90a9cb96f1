"""GRPO's arithmetic (Shao et al., 2024): completion log-probabilities, group-normalised advantages, the clipped
surrogate with its KL penalty (and the sums a step of several micro-batches adds), the split of a step's sampled
groups into micro-batches, and the reference's weights. See :mod:`finetune_sdk.objectives.grpo_training` for the training loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from finetune_sdk.models.sampling import SamplingSettings

ADVANTAGE_EPS = 1e-4


def completion_logps(model: Any, group: Any, sampling: SamplingSettings | float) -> Any:
    """``[N, C]`` log-probabilities of the completion tokens of ``group`` (a :class:`~finetune_sdk.objectives.grpo_training.SampledGroup`)
    under ``model``, in the distribution they were sampled from: ``sampling``'s processors replayed on the logits
    (:meth:`~finetune_sdk.models.sampling.SamplingSettings.logps`; a float is a temperature alone); positions follow the
    attention mask, as in generation."""
    import torch

    if not isinstance(sampling, SamplingSettings):
        sampling = SamplingSettings(temperature=float(sampling))
    input_ids = torch.cat([group.prompt_ids, group.completion_ids], dim=1)
    attention = torch.cat([group.prompt_mask, group.completion_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = group.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    return sampling.logps(logits[:, -width - 1:-1], group.prompt_ids, group.prompt_mask, group.completion_ids)


def group_advantages(rewards: Any, group_size: int) -> tuple[Any, Any]:
    """Advantages normalised within each group of ``group_size`` consecutive completions, and each group's
    reward std: ``(r - mean) / (std + 1e-4)`` (std with Bessel's correction, as TRL).

    >>> import torch
    >>> advantages, std = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2)
    >>> [round(a, 3) for a in advantages.tolist()], [round(s, 3) for s in std.tolist()]
    ([0.707, -0.707, 0.0, 0.0], [0.707, 0.0])
    """
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + ADVANTAGE_EPS)).view(-1), std.view(-1)


def grpo_loss(logps: Any, old_logps: Any, ref_logps: Any, advantages: Any, mask: Any, beta: float,
              epsilon: float) -> tuple[Any, Any, Any]:
    """GRPO's clipped surrogate with its KL penalty (:mod:`finetune_sdk.objectives.grpo_training`'s formula), the mean token KL and the
    share of completion tokens whose ratio the clip holds (0 while ``old_logps`` is the current policy's).

    ``logps``, ``old_logps``, ``ref_logps`` (None when ``beta`` is 0) and ``mask`` are ``[N, C]``, ``advantages``
    ``[N]``; the loss is a scalar tensor: a masked mean over each completion's tokens, then a mean over completions
    (TRL's ``loss_type="grpo"``). See :func:`grpo_loss_terms` for the sums a step of several micro-batches adds.

    >>> import torch
    >>> logps = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    >>> old = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.5]]))  # the first token doubled its probability
    >>> loss, kl, held = grpo_loss(logps, old, None, torch.tensor([1.0, -1.0]), torch.ones(2, 2), 0.0, 0.2)
    >>> round(float(loss), 4), float(held)  # ratio 2 clipped to 1.2 for the positive advantage
    (-0.05, 0.25)
    """
    terms = grpo_loss_terms(logps, old_logps, ref_logps, advantages, mask, beta, epsilon)
    tokens = terms.tokens.clamp(min=1)
    return terms.per_completion.mean(), terms.kl_sum / tokens, terms.held_sum / tokens


@dataclass
class LossTerms:
    """GRPO's loss per completion ``[N]`` (its tokens' mean) and, over the completion tokens, the summed k3 KL, the
    number of tokens the clip holds and the number of tokens (detached scalars): the parts that add up over the
    micro-batches of an optimizer step to the bigger batch's loss (sum / completions), ``kl`` and ``clip_ratio``
    (sum / tokens)."""

    per_completion: Any
    kl_sum: Any
    held_sum: Any
    tokens: Any


def grpo_loss_terms(logps: Any, old_logps: Any, ref_logps: Any, advantages: Any, mask: Any, beta: float,
                    epsilon: float) -> LossTerms:
    """:class:`LossTerms` of :func:`grpo_loss`'s formula (same arguments and shapes)."""
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.min(ratio * adv, clipped)
    mask = mask.to(per_token.dtype)
    held = ((clipped < ratio * adv) * mask).sum()  # tokens where the clip is the min
    kl = torch.zeros_like(per_token)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    lengths = mask.sum(1).clamp(min=1)
    return LossTerms((per_token * mask).sum(1) / lengths, (kl * mask).sum().detach(), held.detach(),
                     mask.sum().detach())


def split_rows(scored: Any, sizes: Sequence[int], group_size: int) -> list[Any]:
    """A step's scored completions (a :class:`~finetune_sdk.objectives.grpo_training.ScoredGroup` over all its prompts, each prompt's
    ``group_size`` completions next to each other) cut into consecutive micro-batches of ``sizes`` completions
    (multiples of ``group_size``: a group never straddles two micro-batches). Tensors keep the step's widths, so
    each completion is scored exactly as in one big batch."""
    parts, start = [], 0
    for n in sizes:
        rows, groups = slice(start, start + n), slice(start // group_size, (start + n) // group_size)
        group = replace(scored.group, prompt_ids=scored.group.prompt_ids[rows],
                        prompt_mask=scored.group.prompt_mask[rows], completion_ids=scored.group.completion_ids[rows],
                        completion_mask=scored.group.completion_mask[rows], texts=scored.group.texts[rows])
        parts.append(replace(scored, group=group, per_source=scored.per_source[rows], total=scored.total[rows],
                             advantages=scored.advantages[rows], group_std=scored.group_std[groups],
                             ref_logps=None if scored.ref_logps is None else scored.ref_logps[rows],
                             old_logps=None))
        start += n
    return parts


def score_step(policy: Any, micro_batches: Sequence[Any], settings: Any, reference: Any,
               score_prompts: Callable[[dict[str, list[Any]]], Any]) -> list[Any]:
    """The groups of one optimizer step, one :class:`~finetune_sdk.objectives.grpo_training.ScoredGroup` per micro-batch: the prompts of
    every collated micro-batch (``prompt_ids``, ``prompts``, ``columns`` lists) are sampled and scored in one call
    of ``score_prompts`` (TRL's generation batch: ``per_device_train_batch_size x gradient_accumulation_steps``
    prompts; it normalises within each group), then cut back into the micro-batches by :func:`split_rows`; with a
    ``reference`` and ``settings.beta`` > 0 the reference's log-probs are computed a micro-batch at a time. Batch
    ``b`` with ``k`` accumulation steps thus samples, scores and trains exactly as batch ``k*b``."""
    import torch

    prompts = {key: [value for batch in micro_batches for value in batch[key]]
               for key in ("prompt_ids", "prompts", "columns")}
    sizes = [len(batch["prompt_ids"]) * settings.num_generations for batch in micro_batches]
    parts = split_rows(score_prompts(prompts), sizes, settings.num_generations)
    if reference is not None and settings.beta:
        with reference.active(policy), torch.no_grad():
            for part in parts:
                part.ref_logps = completion_logps(policy, part.group, settings.sampling)
    return parts


class ReferenceWeights:
    """The trainable weights of ``model`` as they stand now (the policy when GRPO starts), swapped in by
    :meth:`active` to compute the reference's log-probabilities; memory: one copy of the trainable weights."""

    def __init__(self, model: Any) -> None:
        self.saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @contextmanager
    def active(self, model: Any) -> Iterator[None]:
        import torch

        params = dict(model.named_parameters())
        current = {}
        with torch.no_grad():
            for name, weight in self.saved.items():
                current[name], params[name].data = params[name].data, weight
            try:
                yield
            finally:
                for name, data in current.items():
                    params[name].data = data

class RepeatedStepSampler:
    """GRPO with ``num_iterations`` > 1: the prompts of each optimizer step (``step_size`` indices of ``base`` in its
    order) come ``repeats`` times in a row, so the same sampled groups are optimised on ``repeats`` consecutive
    steps (TRL's ``RepeatSampler``). An incomplete last step of an epoch is dropped, so steps and repeats align."""

    def __init__(self, base: Any, step_size: int, repeats: int) -> None:
        self.base, self.step_size, self.repeats = base, step_size, repeats

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        for start in range(0, len(order) - self.step_size + 1, self.step_size):
            for _ in range(self.repeats):
                yield from order[start:start + self.step_size]

    def __len__(self) -> int:
        return len(self.base) // self.step_size * self.step_size * self.repeats


class GRPOSpeed:
    """Generated and trained tokens per second between two logs: sampling (generation, rewards, the reference's
    log-probs) timed apart from the rest of the steps (the policy's forward and backward passes, the optimizer)."""

    def __init__(self) -> None:
        self.since, self.sampling, self.generated, self.trained = time.perf_counter(), 0.0, 0, 0

    def timed_sampling(self, sample: Any) -> Any:
        start = time.perf_counter()
        groups = sample()
        self.sampling += time.perf_counter() - start
        self.generated += int(sum(int(g.group.completion_mask.sum()) for g in groups))
        return groups

    def rates(self) -> dict[str, float]:
        """``generated_tokens_per_second`` (completion tokens / sampling seconds) and ``trained_tokens_per_second``
        (prompt and completion tokens through the loss / the other seconds) since the last call."""
        now = time.perf_counter()
        training = max(now - self.since - self.sampling, 1e-9)
        rates = {"generated_tokens_per_second": self.generated / max(self.sampling, 1e-9),
                 "trained_tokens_per_second": self.trained / training}
        self.__init__()  # type: ignore[misc]
        return rates
