"""Online reinforcement learning with GRPO, Group Relative Policy Optimization (Shao et al., 2024, "DeepSeekMath",
arXiv:2402.03300, section 4.1).

Each optimizer step takes ``per_device_train_batch_size x gradient_accumulation_steps`` prompts (TRL's generation
batch, sampled in one call and cut back into micro-batches, so accumulation trains as the bigger batch) and, for
each, samples a group of ``num_generations`` completions from the current policy (at most
``max_completion_length`` tokens, ending at the model's end of turn: :func:`~finetune_sdk.models.stop_tokens.stop_token_ids`),
from the distribution the run's sampling options state and nothing else (TRL's ``temperature``, ``top_p``,
``top_k``, ``min_p``, ``repetition_penalty``; all off by default; the base's ``generation_config.json`` is not merged
in: :mod:`finetune_sdk.models.sampling`). The rewards (:mod:`finetune_sdk.objectives.reward_functions`) are summed per completion (weighted by
``reward_weights``) and normalised within the group, ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)``, and the policy
minimises, per completion token,

    -min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon) * A_i) + beta * KL_t,
    rho = pi(o_t) / pi_old(o_t),   KL_t = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1

(the unbiased k3 estimator of KL(pi || pi_ref)), averaged over each completion's tokens, then over the step's
completions. Log-probabilities are those of the sampling distribution: logits divided by ``temperature``, as in TRL,
and, when stated, the repetition penalty and the top-k/top-p/min-p truncation replayed (TRL leaves the truncation out).
``num_iterations`` optimizer steps (PPO's mu, TRL's name; default 1) are taken on each sampled group: the sampler
repeats each step's prompts that many times and the groups are kept between them. ``pi_old`` is the policy that
sampled, so at the first step ``rho`` is 1 and the clip does nothing; at the later ones ``rho`` measures how far the
policy has moved since it sampled and the clip bounds it (the ``clip_ratio`` log: the share of tokens it holds).

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
restored on resume; with ``num_iterations`` > 1, a ``save_steps`` that is a multiple of it keeps every checkpoint at
the start of a sampled group), atomic results, registry and one-line errors unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.rows import Rows
from finetune_sdk.data.encoding import Encoded, encode_segments
from finetune_sdk.errors import ConfigError, DataError
from finetune_sdk.objectives.grpo_loss import (ADVANTAGE_EPS, GRPOSpeed, ReferenceWeights, RepeatedStepSampler,
                                    completion_logps, group_advantages, grpo_loss, grpo_loss_terms, score_step)
from finetune_sdk.objectives.reward_functions import Reward, score_completions
from finetune_sdk.models.sampling import SamplingSettings, only_these_settings
from finetune_sdk.models.stop_tokens import stop_token_ids

if TYPE_CHECKING:
    from finetune_sdk.formatter import Formatter
    from finetune_sdk.objectives import TrainingInputs
    from finetune_sdk.training.plan import RunSpec, TrainingPlan

__all__ = ["ADVANTAGE_EPS", "GRPOSettings", "PromptCollator", "ReferenceWeights", "SampledGroup", "ScoredGroup",
           "completion_logps", "encode_prompts", "group_advantages", "grpo_loss", "sample_completions"]
logger = logging.getLogger("finetune_sdk")


@dataclass(frozen=True)
class GRPOSettings:
    """GRPO's options (TRL's ``GRPOConfig`` names); ``sampling`` holds the sampling options (temperature, top_p,
    top_k, min_p, repetition_penalty) and ``stop_ids`` the ids a completion ends at (empty: the tokenizer's and
    model's, :func:`~finetune_sdk.models.stop_tokens.stop_token_ids`)."""

    num_generations: int = 8
    max_completion_length: int = 256
    beta: float = 0.04
    epsilon: float = 0.2
    num_iterations: int = 1
    sampling: SamplingSettings = SamplingSettings()
    stop_ids: tuple[int, ...] = ()

    @property
    def temperature(self) -> float:
        return self.sampling.temperature

    @classmethod
    def from_options(cls, options: Mapping[str, Any], stop_ids: Sequence[int] = ()) -> GRPOSettings:
        return cls(num_generations=int(options["num_generations"]),
                   max_completion_length=int(options["max_completion_length"]), beta=float(options["beta"]),
                   epsilon=float(options["epsilon"]), num_iterations=int(options.get("num_iterations") or 1),
                   sampling=SamplingSettings.from_options(options), stop_ids=tuple(stop_ids))


def encode_prompts(rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
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
    step = options["per_device_train_batch_size"] * options["gradient_accumulation_steps"]
    if options.get("num_iterations", 1) > 1 and len(out.examples) < step:
        raise DataError(f"{rows.source}: {len(out.examples)} prompts, fewer than one optimizer step's "
                        f"per_device_train_batch_size x gradient_accumulation_steps = {step}: with num_iterations > 1 "
                        "an incomplete step is dropped; give more prompts or a smaller batch")
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
    """One completion per prompt in ``prompt_ids`` (repeat a prompt to get a group): sampled from the distribution
    ``settings.sampling`` states and nothing else (the model's ``generation_config.json`` is not merged in:
    :func:`~finetune_sdk.models.sampling.only_these_settings`), or greedy; each ends at the first of ``settings.stop_ids``.
    Draws from torch's global RNG (saved in every checkpoint)."""
    import torch

    device = next(model.parameters()).device
    ids, mask = left_padded(prompt_ids, tokenizer.pad_token_id, device)
    stop = list(settings.stop_ids) or stop_token_ids(tokenizer, model)
    config = settings.sampling.generation_config(max_new_tokens=settings.max_completion_length, stop_ids=stop,
                                                 pad_token_id=tokenizer.pad_token_id, greedy=greedy)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), only_these_settings(model, config):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
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


@dataclass
class ScoredGroup:
    """A micro-batch's sampled group with its rewards (``per_source`` ``[N, R]``, weighted ``total`` ``[N]``),
    advantages, each group's reward std, and the log-probs of the reference and of the policy that sampled it
    (``old_logps``: set by the first optimisation step on it)."""

    group: SampledGroup
    per_source: Any
    total: Any
    advantages: Any
    group_std: Any
    names: list[str]
    ref_logps: Any = None
    old_logps: Any = None


def score_group(policy: Any, inputs: Mapping[str, Any], tokenizer: Any, settings: GRPOSettings,
                rewards: Sequence[Reward], weights: Sequence[float] | None,
                reference: ReferenceWeights | None) -> ScoredGroup:
    """Sample ``num_generations`` completions per prompt of a collated micro-batch, score them and normalise the
    rewards within each group; the reference's log-probs too (without gradients) when ``beta`` > 0."""
    import torch

    g = settings.num_generations
    group = sample_completions(policy, [ids for ids in inputs["prompt_ids"] for _ in range(g)], tokenizer, settings)
    prompts = [p for p in inputs["prompts"] for _ in range(g)]
    scores, names = score_completions(rewards, prompts, group.texts, group_columns(inputs["columns"], g))
    per_source = torch.tensor(scores, dtype=torch.float32, device=group.completion_ids.device)
    total = (per_source * per_source.new_tensor(weights or [1.0] * len(names))).sum(1)
    advantages, group_std = group_advantages(total, g)
    scored = ScoredGroup(group, per_source, total, advantages, group_std, names)
    if reference is not None and settings.beta:
        with reference.active(policy), torch.no_grad():
            scored.ref_logps = completion_logps(policy, group, settings.sampling)
    return scored


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


def run_rewards(run: RunSpec) -> list[Reward]:
    """The run's rewards: ``reward_funcs`` resolved, then the reward model (loaded once per run)."""
    options = run.options
    if "rewards" not in run.state.objective_state:
        from finetune_sdk.plugin_manager import get_plugin_host
        from finetune_sdk.objectives.reward_functions import resolve_reward_functions, reward_model

        rewards = resolve_reward_functions(options.get("reward_funcs"), get_plugin_host())
        if options.get("reward_model"):
            rewards.append(reward_model(options["reward_model"]))
        run.state.objective_state["rewards"] = rewards
    return run.state.objective_state["rewards"]


def evaluate_prompts(model: Any, plan: TrainingPlan, name: str, tokenizer: Any, run: RunSpec) -> dict[str, float]:
    """``eval_reward`` and ``eval_completion_length`` of ``model``'s greedy completions to the held-out prompts
    ``plan.evals[name]``, with the counts of scored and skipped rows."""
    from finetune_sdk.models.scoring import require_rows, scored_rows

    encoded, options = plan.evals[name].encoded, run.options
    require_rows(len(encoded.examples), encoded.dropped, plan.evals[name].rows.source,
                 "have prompts longer than max_length - max_completion_length")
    from finetune_sdk.objectives.reward_functions import reward_weights

    return {**greedy_rewards(model, encoded.examples, tokenizer, run_rewards(run),
                             GRPOSettings.from_options(options, stop_token_ids(tokenizer, model, plan.formatter)),
                             options["per_device_eval_batch_size"],
                             reward_weights(options)),
            **scored_rows(len(encoded.examples), encoded.dropped)}


def grpo_training_inputs(run: RunSpec, plan: TrainingPlan, model: Any, tokenizer: Any, args: Any) -> TrainingInputs:
    """What the run engine builds GRPO's ``Trainer`` from; the reference weights are copied here, before a resumed
    run loads its checkpoint, and the held-out prompts' greedy reward of the starting policy is recorded as
    ``eval_reward_start``."""
    from finetune_sdk.objectives import ListDataset, TrainingInputs
    from finetune_sdk.objectives.reward_functions import reward_weights

    settings = GRPOSettings.from_options(run.options, stop_token_ids(tokenizer, model, plan.formatter))
    rewards = run_rewards(run)
    reference = ReferenceWeights(model) if settings.beta else None
    if settings.num_iterations > 1 and run.options["save_steps"] % settings.num_iterations:
        logger.warning("save_steps=%d is not a multiple of num_iterations=%d: a run resumed from a checkpoint "
                       "between the iterations of one sampled group samples that group afresh",
                       run.options["save_steps"], settings.num_iterations)
    args.include_num_input_tokens_seen = "no"  # prompt batches have no input_ids to count
    for name in plan.evals:
        run.state.metrics[f"eval{'_' + name if name else ''}_reward_start"] = \
            evaluate_prompts(model, plan, name, tokenizer, run)["eval_reward"]
    evals = [ListDataset(s.encoded.examples) for s in plan.evals.values()]
    return TrainingInputs(model, ListDataset(plan.train.examples), evals[0] if evals else None, PromptCollator(),
                          grpo_trainer_class(settings, rewards, reference, tokenizer, reward_weights(run.options)))


def grpo_trainer_class(settings: GRPOSettings, rewards: Sequence[Reward], reference: ReferenceWeights | None,
                       tokenizer: Any, weights: Sequence[float] | None = None) -> type:
    """A transformers ``Trainer`` whose training step samples groups and takes the GRPO loss (built lazily so
    importing this module stays light)."""
    from transformers import Trainer as HFTrainer

    from finetune_sdk.training.accumulation import StepBatch, step_batch_trainer_class

    class GRPOTrainer(step_batch_trainer_class(HFTrainer)):  # type: ignore[misc]
        def examples_in(self, batch):
            return len(batch["prompt_ids"]) * settings.num_generations  # completions: the loss's unit

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step = self.current_step(model) or StepBatch([inputs], self.examples_in(inputs))
            scored = self._scored_step(self.accelerator.unwrap_model(model), step)[step.current]
            logps = completion_logps(model, scored.group, settings.sampling)
            if scored.old_logps is None:  # the first step on these samples: the policy is the one that sampled
                scored.old_logps = logps.detach()
            terms = grpo_loss_terms(logps, scored.old_logps, scored.ref_logps, scored.advantages,
                                    scored.group.completion_mask, settings.beta, settings.epsilon)
            loss = self.step_mean(terms.per_completion.sum(), len(terms.per_completion), num_items_in_batch)
            self._speed.trained += int(scored.group.prompt_mask.sum() + scored.group.completion_mask.sum())
            sums = step.once("grpo_token_sums", lambda: self._pending_step_sums())
            for i, value in enumerate((terms.kl_sum, terms.held_sum, terms.tokens)):
                sums[i] += float(value)
            return (loss, {"advantages": scored.advantages}) if return_outputs else loss

        def _scored_step(self, policy: Any, step: StepBatch) -> list[ScoredGroup]:
            """The step's groups, one per micro-batch: sampled at the first of ``num_iterations`` optimizer steps,
            kept for the others (the sampler repeats the step's prompts)."""
            iteration = self.state.global_step % settings.num_iterations

            def sample() -> list[ScoredGroup]:
                if iteration:
                    logger.warning("step %d: no samples kept for iteration %d of num_iterations=%d (resumed between "
                                   "them): sampling afresh", self.state.global_step + 1, iteration + 1,
                                   settings.num_iterations)
                return score_step(policy, step.micro_batches, settings, reference, lambda prompts: score_group(
                    policy, prompts, tokenizer, settings, rewards, weights, None))

            if iteration == 0 or self.__dict__.get("_grpo_kept") is None:
                self._grpo_kept = step.once("grpo", lambda: self._speed.timed_sampling(sample))
            groups = self._grpo_kept
            step.once("grpo_logged", lambda: self._record(groups))
            return groups

        @property
        def _speed(self) -> GRPOSpeed:
            return self.__dict__.setdefault("_grpo_speed", GRPOSpeed())

        def _pending_step_sums(self) -> list[float]:
            """This step's [summed token KL, clipped tokens, tokens], added up over its micro-batches."""
            sums = [0.0, 0.0, 0.0]
            self.__dict__.setdefault("_grpo_step_sums", []).append(sums)
            return sums

        def _record(self, groups: list[ScoredGroup]) -> None:
            """The step's sampling statistics (over all its micro-batches' completions, as one batch)."""
            import torch

            per_source = torch.cat([g.per_source for g in groups])
            metrics = self.__dict__.setdefault("_grpo_metrics", {})
            values = {"reward": torch.cat([g.total for g in groups]).mean(),
                      "reward_std": torch.cat([g.group_std for g in groups]).mean(),
                      "completion_length": torch.cat([g.group.completion_mask.sum(1) for g in groups]).float().mean(),
                      **{f"rewards/{name}": per_source[:, i].mean() for i, name in enumerate(groups[0].names)}}
            for key, value in values.items():
                metrics.setdefault(key, []).append(float(value))

        def _get_train_sampler(self, train_dataset=None):
            base = super()._get_train_sampler(train_dataset)
            if settings.num_iterations == 1 or base is None:
                return base
            step = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return RepeatedStepSampler(base, step, settings.num_iterations)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            metrics = self.__dict__.get("_grpo_metrics")
            if metrics and "loss" in logs:  # means over the optimizer steps since the last log
                step_sums = self.__dict__.pop("_grpo_step_sums", [])
                metrics["kl"] = [kl / max(tokens, 1) for kl, _, tokens in step_sums]
                metrics["clip_ratio"] = [held / max(tokens, 1) for _, held, tokens in step_sums]
                logs.update({key: sum(values) / len(values) for key, values in metrics.items() if values})
                logs.update(self._speed.rates())
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
