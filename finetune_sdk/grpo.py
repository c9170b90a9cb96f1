"""Online reinforcement learning with GRPO, Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath",
arXiv:2402.03300, section 4.1).

Each training step takes ``per_device_train_batch_size`` prompts and, for each, samples a group of
``num_generations`` completions from the current policy (``temperature``, at most ``max_completion_length`` tokens,
no top-k/top-p truncation). The rewards (:mod:`finetune_sdk.rewards`) are summed per completion and normalised
within the group, ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)``, and the policy minimises, per completion token,

    -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon) * A_i) + beta * KL_t,
    rho = pi(o_t) / pi_old(o_t),   KL_t = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1

(the unbiased k3 estimator of KL(pi || pi_ref)), averaged over each completion's tokens, then over completions.
Log-probabilities are those of the sampling distribution (logits divided by ``temperature``), as in TRL. One
optimisation step is taken per generation batch, so ``pi_old`` is the policy that sampled and ``rho`` is 1 at the
step (the clip bounds later steps on the same samples, which this implementation doesn't take, as TRL with
``num_iterations=1``).

The reference ``pi_ref`` is the policy as it stands when GRPO starts, for every technique: the trainable weights
(a LoRA adapter, trained adapters of an earlier stage included, or every weight for ``full``) are copied once
before the first step and swapped in, without gradients, to score the sampled completions. A fresh LoRA adapter
thus gives the base model, a stage after SFT gives the SFT model (disabling the adapter, TRL's shortcut, would
give the base there), and no second model is loaded. ``beta=0`` skips the reference. Dropout is off while GRPO
trains, as in DPO.

Why not TRL's ``GRPOTrainer``: it tokenizes prompts itself (``apply_chat_template`` or ``tokenizer(text)``),
bypassing the SDK's formatter plugins and their guarantee that prompt text never becomes control tokens; it takes
its reference from disabled adapters (PEFT) or reloads the base by its config's path (full), neither of which is
the starting policy of a stage that follows SFT, and the reload needs the model's files or the Hub; it keeps its
generations in a buffer that a resumed run loses (its code regenerates when ``_buffered_inputs`` is None), so
resume after SIGKILL would not continue the same run; and it needs its own ``GRPOConfig`` in place of the run
engine's ``TrainingArguments``. Written on transformers' ``Trainer`` (as the SDK's DPO), GRPO gets the SDK's
checkpoints (sampling RNG state included: the torch RNG the sampler draws from is saved with every checkpoint and
restored on resume), atomic results, registry and one-line errors unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune_sdk.data import Rows
from finetune_sdk.encoding import Encoded, encode_segments
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.rewards import Reward, score_completions

if TYPE_CHECKING:
    from finetune_sdk.objectives import TrainingInputs
    from finetune_sdk.planning import TrainingPlan
    from finetune_sdk.run_engine import RunSpec

ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class GRPOSettings:
    """GRPO's options (TRL's ``GRPOConfig`` names)."""

    num_generations: int = 8
    max_completion_length: int = 256
    beta: float = 0.04
    temperature: float = 1.0
    epsilon: float = 0.2

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GRPOSettings:
        return cls(int(options["num_generations"]), int(options["max_completion_length"]), float(options["beta"]),
                   float(options["temperature"]), float(options["epsilon"]))


def encode_prompts(rows: Rows, formatter: Any, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
    """Prompt rows as ``{"prompt_ids", "prompt", "columns"}`` examples; ``columns`` holds the row's other columns
    (handed to reward functions). A prompt longer than ``max_length - max_completion_length`` tokens is dropped;
    more than half dropped is a :class:`DataError`."""
    budget = options["max_length"] - options["max_completion_length"]
    if budget < 1:
        raise ConfigError(f"max_length ({options['max_length']}) must exceed max_completion_length "
                          f"({options['max_completion_length']}): a prompt and its completion share max_length")
    out = Encoded()
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        ids = encode_segments(formatter.segments(row, tokenizer, options), tokenizer, None)["input_ids"]
        if not ids or len(ids) > budget:
            out.dropped += 1
            continue
        out.tokens += len(ids)
        out.examples.append({"prompt_ids": ids, "prompt": row["prompt"],
                             "columns": {k: v for k, v in row.items() if k != "prompt"}})
    if out.dropped * 2 > len(rows):
        raise DataError(f"{rows.source}: {out.dropped} of {len(rows)} prompts are longer than max_length - "
                        f"max_completion_length = {budget} tokens; raise max_length or lower max_completion_length")
    return out


class PromptCollator:
    """A batch of prompt examples as lists (the completions are sampled in the training step)."""

    def __call__(self, batch: list[Mapping[str, Any]]) -> dict[str, Any]:
        return {"prompt_ids": [ex["prompt_ids"] for ex in batch], "prompts": [ex["prompt"] for ex in batch],
                "columns": [ex["columns"] for ex in batch]}


@dataclass
class SampledGroup:
    """Prompts (left-padded, ``[N, P]``) and their sampled completions (``[N, C]``, ``completion_mask`` 1 up to and
    including the first stop token), with the decoded completion texts."""

    prompt_ids: Any
    prompt_mask: Any
    completion_ids: Any
    completion_mask: Any
    texts: list[str]


def left_padded(sequences: Sequence[Sequence[int]], pad_token_id: int, device: Any) -> tuple[Any, Any]:
    """``[N, max_len]`` long tensors of ids and attention mask, padded on the left (for generation)."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def sample_completions(model: Any, prompt_ids: Sequence[Sequence[int]], tokenizer: Any, settings: GRPOSettings,
                       *, greedy: bool = False) -> SampledGroup:
    """One completion per prompt in ``prompt_ids`` (repeat a prompt to get a group): sampled at ``temperature``
    from the full distribution, or greedy. Draws from torch's global RNG (saved in every checkpoint)."""
    import torch

    from finetune_sdk.inference import _stop_ids

    device = next(model.parameters()).device
    ids, mask = left_padded(prompt_ids, tokenizer.pad_token_id, device)
    stop = _stop_ids(tokenizer)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": settings.temperature,
                                                     "top_k": 0, "top_p": 1.0}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_completion_length,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop, **sampling)
    finally:
        model.train(was_training)
    completion = out[:, ids.shape[1]:]
    is_stop = torch.isin(completion, torch.tensor(stop, device=completion.device))
    ends = torch.where(is_stop.any(1), is_stop.float().argmax(1), torch.full_like(is_stop[:, 0], completion.shape[1],
                                                                                  dtype=torch.long))
    completion_mask = (torch.arange(completion.shape[1], device=completion.device)[None, :] <= ends[:, None]).long()
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
             for row, m in zip(completion.cpu(), completion_mask.cpu())]
    return SampledGroup(ids, mask, completion, completion_mask, texts)


def completion_logps(model: Any, group: SampledGroup, temperature: float) -> Any:
    """``[N, C]`` log-probabilities of the completion tokens under ``model`` (logits divided by ``temperature``:
    the distribution they were sampled from); positions follow the attention mask, as in generation."""
    import torch

    input_ids = torch.cat([group.prompt_ids, group.completion_ids], dim=1)
    attention = torch.cat([group.prompt_mask, group.completion_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    width = group.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    logits = logits[:, -width - 1:-1].float() / temperature
    targets = group.completion_ids.unsqueeze(-1)
    return torch.gather(logits, 2, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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
              epsilon: float) -> tuple[Any, Any]:
    """GRPO's clipped surrogate with its KL penalty (the module docstring's formula) and the mean token KL.

    ``logps``, ``old_logps``, ``ref_logps`` (None when ``beta`` is 0) and ``mask`` are ``[N, C]``, ``advantages``
    ``[N]``; the loss is a scalar tensor: a masked mean over each completion's tokens, then a mean over completions.
    """
    import torch

    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    mask = mask.to(per_token.dtype)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    lengths = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    return loss, ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()


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


def group_columns(columns: Sequence[Mapping[str, Any]], repeat: int) -> dict[str, list[Any]]:
    """Per-row columns as ``{column: [value per completion]}``, each row's values repeated ``repeat`` times."""
    names = sorted({k for row in columns for k in row})
    return {name: [row.get(name) for row in columns for _ in range(repeat)] for name in names}


def greedy_rewards(model: Any, examples: Sequence[Mapping[str, Any]], tokenizer: Any, rewards: Sequence[Reward],
                   settings: GRPOSettings, batch_size: int, weights: Sequence[float] | None = None) -> dict[str, float]:
    """Mean (weighted) total reward (``eval_reward``) and completion length of ``model``'s greedy completions to
    ``examples``."""
    totals: list[float] = []
    lengths: list[int] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        group = sample_completions(model, [ex["prompt_ids"] for ex in chunk], tokenizer, settings, greedy=True)
        scores, _ = score_completions(rewards, [ex["prompt"] for ex in chunk], group.texts,
                                      group_columns([ex["columns"] for ex in chunk], 1))
        totals += [sum(w * r for w, r in zip(weights or [1.0] * len(row), row)) for row in scores]
        lengths += group.completion_mask.sum(1).tolist()
    n = max(len(totals), 1)
    return {"eval_reward": sum(totals) / n, "eval_completion_length": sum(lengths) / n}


def run_rewards(plan: TrainingPlan, options: Mapping[str, Any]) -> list[Reward]:
    """The run's rewards: ``reward_funcs`` resolved, then the reward model (loaded once per plan)."""
    if "rewards" not in plan.objective_state:
        from finetune_sdk.plugin_manager import get_plugin_host
        from finetune_sdk.rewards import resolve_reward_functions, reward_model

        rewards = resolve_reward_functions(options.get("reward_funcs"), get_plugin_host())
        if options.get("reward_model"):
            rewards.append(reward_model(options["reward_model"]))
        plan.objective_state["rewards"] = rewards
    return plan.objective_state["rewards"]


def evaluate_prompts(model: Any, plan: TrainingPlan, name: str, tokenizer: Any,
                     options: Mapping[str, Any]) -> dict[str, float]:
    """``eval_reward`` and ``eval_completion_length`` of ``model``'s greedy completions to the held-out prompts
    ``plan.evals[name]``, with the counts of scored and skipped rows."""
    from finetune_sdk.scoring import require_rows, scored_rows

    encoded = plan.evals[name].encoded
    require_rows(len(encoded.examples), encoded.dropped, plan.evals[name].rows.source,
                 "have prompts longer than max_length - max_completion_length")
    from finetune_sdk.rewards import reward_weights

    return {**greedy_rewards(model, encoded.examples, tokenizer, run_rewards(plan, options),
                             GRPOSettings.from_options(options), options["per_device_eval_batch_size"],
                             reward_weights(options)),
            **scored_rows(len(encoded.examples), encoded.dropped)}


def grpo_training_inputs(run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
    """What the run engine builds GRPO's ``Trainer`` from; the reference weights are copied here, before a resumed
    run loads its checkpoint, and the held-out prompts' greedy reward of the starting policy is recorded as
    ``eval_reward_start``."""
    from finetune_sdk.objectives import ListDataset, TrainingInputs
    from finetune_sdk.rewards import reward_weights

    settings = GRPOSettings.from_options(run.options)
    rewards = run_rewards(plan, run.options)
    reference = ReferenceWeights(model) if settings.beta else None
    args.include_num_input_tokens_seen = "no"  # prompt batches have no input_ids to count
    for name in plan.evals:
        plan.extra_metrics[f"eval{'_' + name if name else ''}_reward_start"] = \
            evaluate_prompts(model, plan, name, tokenizer, run.options)["eval_reward"]
    evals = [ListDataset(s.encoded.examples) for s in plan.evals.values()]
    return TrainingInputs(model, ListDataset(plan.train.examples), evals[0] if evals else None, PromptCollator(),
                          grpo_trainer_class(settings, rewards, reference, tokenizer, reward_weights(run.options)))


def grpo_trainer_class(settings: GRPOSettings, rewards: Sequence[Reward], reference: ReferenceWeights | None,
                       tokenizer: Any, weights: Sequence[float] | None = None) -> type:
    """A transformers ``Trainer`` whose training step samples groups and takes the GRPO loss (built lazily so
    importing this module stays light)."""
    from transformers import Trainer as HFTrainer

    class GRPOTrainer(HFTrainer):
        # the loss is a mean over the micro-batch's completions: transformers divides it by the accumulation steps
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            policy = self.accelerator.unwrap_model(model)
            g = settings.num_generations
            prompt_ids = [ids for ids in inputs["prompt_ids"] for _ in range(g)]
            group = sample_completions(policy, prompt_ids, tokenizer, settings)
            prompts = [p for p in inputs["prompts"] for _ in range(g)]
            scores, names = score_completions(rewards, prompts, group.texts, group_columns(inputs["columns"], g))
            per_source = torch.tensor(scores, dtype=torch.float32, device=group.completion_ids.device)
            total = (per_source * per_source.new_tensor(weights or [1.0] * len(names))).sum(1)
            advantages, group_std = group_advantages(total, g)
            logps = completion_logps(model, group, settings.temperature)
            ref_logps = None
            if reference is not None and settings.beta:
                with reference.active(policy), torch.no_grad():
                    ref_logps = completion_logps(policy, group, settings.temperature)
            loss, kl = grpo_loss(logps, logps.detach(), ref_logps, advantages, group.completion_mask,
                                 settings.beta, settings.epsilon)
            self._record(total, group_std, kl, group.completion_mask, per_source, names)
            return (loss, {"advantages": advantages}) if return_outputs else loss

        def _record(self, total, group_std, kl, mask, per_source, names) -> None:
            metrics = self.__dict__.setdefault("_grpo_metrics", {})
            values = {"reward": total.mean(), "reward_std": group_std.mean(), "kl": kl,
                      "completion_length": mask.sum(1).float().mean(),
                      **{f"rewards/{name}": per_source[:, i].mean() for i, name in enumerate(names)}}
            for key, value in values.items():
                metrics.setdefault(key, []).append(float(value))

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            metrics = self.__dict__.get("_grpo_metrics")
            if metrics and "loss" in logs:  # means over the micro-batches since the last log
                logs.update({key: sum(values) / len(values) for key, values in metrics.items()})
                metrics.clear()
            super().log(logs, *args, **kwargs)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            model = self.accelerator.unwrap_model(self.model)
            result = greedy_rewards(model, dataset.examples, tokenizer, rewards, settings,
                                    self.args.per_device_eval_batch_size, weights)
            metrics = {f"{metric_key_prefix}_{k.removeprefix('eval_')}": v for k, v in result.items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return GRPOTrainer
