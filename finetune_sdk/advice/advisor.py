"""Which technique, quantizer and batch settings suit a model, a dataset and a machine, and why.

``advise`` reads only the model's config (no weights), estimates the training memory of each candidate with
:mod:`finetune_sdk.advice.memory`, and picks the first that fits in 85% of the memory: LoRA at the largest batch, then
LoRA with gradient checkpointing, then QLoRA (4-bit NF4 base), then QLoRA with gradient checkpointing. Full
fine-tuning is considered only for large datasets and when the base may change; classification tasks get the
classifier technique. Every choice comes with reasons in plain words.

Example:
    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    ...                      num_key_value_heads=4, vocab_size=8000)
    >>> advice = advise(config, dataset_rows=500, memory_bytes=8 * 2**30, device="cpu")
    >>> advice.technique, advice.options["per_device_train_batch_size"]
    ('lora', 16)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_sdk.speed.chunked_loss import CHUNKED_LOSS_MODEL_TYPES
from finetune_sdk.errors import ConfigError, FinetuneError
from finetune_sdk.formatter import CAUSAL_LM, CLASSIFICATION, REWARD
from finetune_sdk.advice.machine import available_memory, format_bytes, resolve_device
from finetune_sdk.advice.memory import (QUANTIZERS, MemoryEstimate, estimate_for_options,
                                 estimate_training_memory, estimated_technique, grpo_generations, known_objective)
from finetune_sdk.advice.model_shape import ModelShape, load_config
from finetune_sdk.speed.precision import cpu_bf16_native

BUDGET = 0.85  # of the memory, for the estimate (the rest absorbs what the estimate misses)
FULL_BUDGET = 0.70  # full fine-tuning must leave more headroom: it runs long and has no cheaper fallback
LARGE_ROWS = 50_000
LARGE_TOKENS = 20_000_000
SMALL_ROWS = 1_000
TARGET_EFFECTIVE_BATCH = 16
BATCHES = (16, 8, 4, 2, 1)
#: The tasks a technique trains (a formatter may also make preference data).
TECHNIQUE_TASKS = (CAUSAL_LM, CLASSIFICATION, REWARD)


@dataclass
class Candidate:
    """One configuration the advisor tried."""

    technique: str
    quantizer: str | None
    batch_size: int
    gradient_checkpointing: bool
    total: int
    fits: bool


@dataclass
class Advice:
    """The recommendation: what to train with, the memory it needs, and why."""

    technique: str
    quantizer: str | None
    options: dict[str, Any]
    estimate: MemoryEstimate
    reasons: list[str]
    memory_bytes: int = 0
    device: str = "cpu"
    fits: bool = True
    considered: list[Candidate] = field(default_factory=list)
    #: True when the data can't leave its owners: train with ``fit_federated`` / ``finetune federated``.
    federated: bool = False
    #: With ``eval_data``: the base model's zero- and few-shot scores and the verdict (``PromptingScores``).
    prompting: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, "quantizer": self.quantizer, "options": dict(self.options),
                "federated": self.federated,
                "fits": self.fits, "memory_bytes": self.memory_bytes, "device": self.device,
                "estimate": self.estimate.as_dict(), "reasons": list(self.reasons),
                "considered": [vars(c) for c in self.considered],
                "prompting": self.prompting.as_dict() if self.prompting is not None else None}

    def command(self, model: str = "MODEL", data: str = "train.jsonl") -> str:
        """The ``finetune train`` command line that applies this advice."""
        parts = [f"finetune federated server --model {model} --technique {self.technique} --output-dir fed"
                 if self.federated else f"finetune train --model {model} --data {data} --technique {self.technique}"]
        if self.quantizer:
            parts.append(f"--quantizer {self.quantizer}")
        for name, value in self.options.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                parts += [flag] if value else []
            elif not (name == "gradient_accumulation_steps" and value == 1):
                parts.append(f"{flag} {value}")
        if self.federated:
            parts.append(f"  (then on each owner's machine: finetune federated client --server SERVER:9092 --data {data})")
        return " ".join(parts)


def advise(model: Any, *, dataset_rows: int | None = None, dataset_tokens: int | None = None,
           memory_bytes: int | None = None, device: str = "auto", must_keep_base: bool = False,
           private_data: bool = False, seq_len: int = 512, task: str = "causal-lm",
           data_owners: int = 0, num_generations: int = 0, objective: str = "sft", eval_data: Any = None,
           data: Any = None, shots: int = 3, eval_budget_s: float = 60.0) -> Advice:
    """Recommend how to fine-tune ``model`` (a config, model folder, cached Hub id or ``.gguf`` file).

    Args:
        dataset_rows, dataset_tokens: the size of the training data, when known (either or both).
        memory_bytes: memory to plan for (default: what is free now on ``device``).
        device: ``cpu``, ``cuda`` or ``auto`` (a GPU when torch sees one).
        must_keep_base: the base model must stay as it is (rules out full fine-tuning).
        private_data: the data must not leave the organisation (adds what that means for the run).
        seq_len: tokens per example after truncation (``max_length``).
        task: ``causal-lm`` (text generation), ``classification`` or ``reward`` (a pairwise reward model from
            preference pairs: technique ``reward-model``, its batch counting pairs, two sequences each).
        data_owners: the data is split among this many owners who can't share it (hospitals, banks, devices):
            2 or more recommends federated fine-tuning (``Advice.federated``), with its reasons and costs.
        num_generations: online RL with GRPO: completions sampled per prompt (0: not GRPO). Each prompt in a batch
            then trains that many sequences of ``seq_len`` tokens (prompt + completion), and the reference keeps
            a copy of the trainable weights; the target is 16 completions per optimizer step.
        objective: what offline causal-lm training optimises: a registered objective (``sft``, ``dpo``, ``orpo``,
            ``simpo``, ``kto``...; see :func:`finetune_sdk.advice.memory.estimate_training_memory`: its sequences per
            example and memory note; its cost is among the reasons).
        eval_data, data, shots, eval_budget_s: held-out prompt/completion rows: the base model is loaded and
            scored on them zero-shot and with ``shots`` rows of ``data`` (the training rows; else other held-out
            rows) in the prompt, within ``eval_budget_s`` seconds; ``Advice.prompting`` holds the scores and its
            verdict (prompt it / too little data / fine-tune) leads the reasons
            (:mod:`finetune_sdk.advice.prompting`).
    """
    if task not in TECHNIQUE_TASKS:
        raise ConfigError(f"task must be one of {', '.join(TECHNIQUE_TASKS)}, got {task!r}")
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    if data is not None and eval_data is None:  # read only to score prompting: never silently ignored
        raise ConfigError("data (--data) is read with eval_data (--eval HELD_OUT.jsonl): the few-shot examples; for "
                          "advice on how to fine-tune give the data's size instead (dataset_rows, --rows)")
    config = load_config(model)
    shape = ModelShape.from_config(config)
    device = resolve_device(device)
    memory = int(memory_bytes) if memory_bytes else available_memory(device)
    rows = dataset_rows if dataset_rows is not None else (
        math.ceil(dataset_tokens / seq_len) if dataset_tokens is not None else None)
    tokens = dataset_tokens if dataset_tokens is not None else (rows * seq_len if rows is not None else None)
    reasons: list[str] = []
    considered: list[Candidate] = []
    # examples per optimizer step: 16, or fewer for tiny datasets so an epoch still has ~10 steps
    target = TARGET_EFFECTIVE_BATCH if rows is None else max(1, min(TARGET_EFFECTIVE_BATCH, rows // 10))
    if num_generations:  # GRPO: 16 completions (not prompts) per optimizer step
        target = max(1, min(target, TARGET_EFFECTIVE_BATCH // num_generations))

    bf16_cpu = device == "cpu" and cpu_bf16_native()

    def estimate(technique: str, quantizer: str | None, batch: int, checkpointing: bool) -> MemoryEstimate:
        # dtype="auto" as training resolves it: a bf16 frozen base on a GPU, and for LoRA on a bf16 CPU
        bf16 = (device == "cuda" and technique != "full") or (bf16_cpu and technique == "lora")
        return estimate_training_memory(
            config, technique=technique, quantizer=quantizer, batch_size=batch, seq_len=seq_len,
            gradient_checkpointing=checkpointing, lora_r=64 if technique == "qlora" else 8,
            lora_targets="all-linear" if technique == "qlora" else "attention", device=device,
            dtype="bfloat16" if bf16 else "float32", activation_dtype="float32" if bf16 and device == "cpu" else None,
            num_generations=num_generations, reference_weights=bool(num_generations),
            objective="sft" if technique == "classifier" else objective)

    def largest_batch(technique: str, quantizer: str | None, checkpointing: bool,
                      budget: float) -> MemoryEstimate | None:
        for batch in [b for b in BATCHES if b <= target]:
            est = estimate(technique, quantizer, batch, checkpointing)
            fits = est.total <= budget * memory
            considered.append(Candidate(technique, quantizer, batch, checkpointing, est.total, fits))
            if fits:
                return est
        return None

    classification = task == "classification" or (shape.family == "encoder" and task != REWARD)
    head = "reward-model" if task == REWARD else "classifier" if classification else None
    large = (rows is not None and rows > LARGE_ROWS) or (tokens is not None and tokens > LARGE_TOKENS)
    chosen: MemoryEstimate | None = None
    if head:  # a frozen backbone (a reward model's batch of pairs: two sequences each)
        chosen = largest_batch(head, None, False, BUDGET) or largest_batch(head, "nf4", False, BUDGET)
    else:
        ladder = [("lora", None, False), ("lora", None, True), ("qlora", "nf4", False), ("qlora", "nf4", True)]
        if large and not must_keep_base:
            ladder = [("full", None, False), ("full", None, True)] + ladder
        for technique, quantizer, checkpointing in ladder:
            budget = FULL_BUDGET if technique == "full" else BUDGET
            chosen = largest_batch(technique, quantizer, checkpointing, budget)
            if chosen is not None and not (technique == "full" and chosen.batch_size < 4):
                break  # full fine-tuning at batch 1-2 is not worth it: adapters train better there
            chosen = None
    fits = chosen is not None
    if chosen is None:
        technique = head or "qlora"
        chosen = estimate(technique, "nf4", 1, not head)
    gc = chosen.gradient_checkpointing
    options = _options(chosen, gc, target, seq_len)
    if num_generations and not classification:
        options["num_generations"] = num_generations
        reasons.append(f"GRPO samples {num_generations} completions per prompt and trains on all of them: batch "
                       f"{chosen.batch_size} is {chosen.batch_size * num_generations} sequences of up to {seq_len} "
                       "tokens (prompt + max_completion_length), plus one copy of the trainable weights for the "
                       "reference; sampling takes most of a step's time on a CPU")

    reasons += _task_reasons(task, shape)
    reasons += _data_reasons(chosen.technique, rows, tokens, large, must_keep_base)
    reasons += _memory_reasons(chosen, gc, memory, device, fits, considered, options)
    reasons += _speed_reasons(chosen, shape, bf16_cpu or None, chunked=not num_generations)
    reasons += _base_reasons(chosen.technique, must_keep_base, chosen)
    federated = data_owners >= 2
    if federated:
        from finetune_sdk.federated.advice import federated_reasons

        reasons += federated_reasons(data_owners, chosen, shape)
    else:
        reasons += _privacy_reasons(private_data, chosen)
    reasons += [f"note: {note}" for note in chosen.notes]
    prompting = None
    if eval_data is not None:  # when not to fine-tune: the base scored zero- and few-shot on held-out rows
        from finetune_sdk.models.loading import open_model
        from finetune_sdk.advice.prompting import check_rows, check_settings, score_prompting

        check_settings(shots, eval_budget_s)
        check_rows(eval_data, data)  # a bad row is one line before the model loads
        prompting = score_prompting(open_model(str(model)), eval_data, data, shots=shots, budget_s=eval_budget_s)
        reasons = prompting.advice + reasons
    return Advice(technique=chosen.technique, quantizer=chosen.quantizer, options=options, estimate=chosen,
                  reasons=reasons, memory_bytes=memory, device=device, fits=fits, considered=considered,
                  federated=federated, prompting=prompting)


def _options(est: MemoryEstimate, gc: bool, target: int, seq_len: int) -> dict[str, Any]:
    options: dict[str, Any] = {"per_device_train_batch_size": est.batch_size,
                               "gradient_accumulation_steps": max(1, math.ceil(target / est.batch_size)),
                               "max_length": seq_len}
    if est.technique == "reward-model":
        options["backbone"] = "frozen"
    elif est.technique != "classifier":
        options["gradient_checkpointing"] = gc
    return options


def _task_reasons(task: str, shape: ModelShape) -> list[str]:
    if task == REWARD:
        return ["the task is a reward model: reward-model trains a scalar head with the pairwise Bradley-Terry loss "
                "on a frozen backbone (its features computed once and cached), so each epoch is cheap; if its "
                "pairwise accuracy on held-out pairs is too low, backbone='lora' also trains adapters (more memory "
                "and time: the backbone then runs with gradients on both answers of every pair)"]
    if shape.family == "encoder" and task != "classification":
        return [f"{shape.model_type} is an encoder model: it can't generate text, so it is used as a classifier "
                "(a small head trained on its features)"]
    if task == "classification":
        return ["the task is classification: the classifier technique keeps the model frozen and trains only a small "
                "head on its features - fast, little memory, and the model stays as it was"]
    return []


def _data_reasons(technique: str, rows: int | None, tokens: int | None, large: bool, keep: bool) -> list[str]:
    if technique in ("classifier", "reward-model"):
        what = "pairs" if technique == "reward-model" else "labelled examples"
        return [f"{_size(rows, tokens)}: a head of a few thousand parameters learns from hundreds of {what} "
                "without overfitting"] if rows or tokens else []
    if rows is None and tokens is None:
        return ["no dataset size given: assuming a small dataset, where adapters are the safe choice (they learn "
                "the task without overwriting what the model knows)"]
    if technique == "full":
        return [f"{_size(rows, tokens)} is a lot of data: full fine-tuning can use it to change the model itself, "
                "which adapters (a few million parameters) can't fully absorb"]
    size = _size(rows, tokens)
    if large:
        why = "the base must stay untouched" if keep else "full fine-tuning doesn't fit in memory with headroom"
        return [f"{size} is enough data for full fine-tuning to pay off, but {why}: adapters with a higher rank "
                "(r=32-64) use more of it"]
    if rows is not None and rows < SMALL_ROWS:
        return [f"{size} is little data: adapters (LoRA) train well under 1% of the weights, so they learn the task "
                "without memorising the examples or forgetting what the model knows; full fine-tuning would overfit"]
    return [f"{size}: adapters learn this much data well; full fine-tuning pays off only past about "
            f"{LARGE_ROWS:,} examples or {LARGE_TOKENS // 1_000_000}M tokens"]


def _memory_reasons(est: MemoryEstimate, gc: bool, memory: int, device: str, fits: bool,
                    considered: list[Candidate], options: dict[str, Any]) -> list[str]:
    where = "RAM" if device == "cpu" else "GPU memory"
    out = []
    share = est.total / memory if memory else float("inf")
    at = ("at the optimizer step, when every trained weight has its gradient" if est.peak == "optimizer step"
          else "at the start of the backward pass")
    summary = (f"estimated peak {format_bytes(est.total)} of {format_bytes(memory)} {where} ({share:.0%}), {at}: "
               f"weights {format_bytes(est.weights)}, activations {format_bytes(est.activations)}, gradients and "
               f"optimizer {format_bytes(est.optimizer + est.adapter + est.gradients)}, framework and allocator "
               f"{format_bytes(est.overhead)}")
    if not fits:
        out.append(f"even QLoRA at batch 1 with gradient checkpointing needs about {format_bytes(est.total)}, more "
                   f"than {BUDGET:.0%} of the {format_bytes(memory)} {where}: use a smaller model, a shorter "
                   "max_length, or a machine with more memory")
        return out
    tried_lora = [c for c in considered if c.technique == "lora"]
    if est.technique == "qlora" and tried_lora:
        smallest = min(tried_lora, key=lambda c: c.total)
        bf16 = device == "cuda" or bool(cpu_bf16_native())
        dtype = "bf16" if bf16 else "fp32"
        out.append(f"LoRA on the {dtype} model needs at least {format_bytes(smallest.total)}: more than "
                   f"{BUDGET:.0%} of {format_bytes(memory)}; QLoRA stores the base's linear layers in 4 bits (NF4), "
                   f"an {'quarter' if bf16 else 'eighth'} of their {dtype} size, with little loss in "
                   "quality")
    if any(c.technique == "full" for c in considered) and est.technique != "full":
        out.append("full fine-tuning would need weights + gradients + AdamW states (16 bytes per parameter) plus "
                   f"activations: more than {FULL_BUDGET:.0%} of the memory")
    out.append(summary)
    if gc:
        out.append("gradient checkpointing is on: it keeps only each layer's input and recomputes the rest in the "
                   "backward pass (about 30% slower) so that the batch fits")
    batch, accumulation = options["per_device_train_batch_size"], options["gradient_accumulation_steps"]
    if accumulation > 1:
        out.append(f"batch {batch} x {accumulation} accumulation steps = {batch * accumulation} examples per "
                   "optimizer step, the same training as a larger batch at the memory of a small one")
    return out


def _speed_reasons(est: MemoryEstimate, shape: ModelShape, bf16_cpu: str | None, chunked: bool = True) -> list[str]:
    out = []
    if est.technique == "lora" and est.dtype == "bfloat16":
        where = f"this CPU has {bf16_cpu}" if bf16_cpu else "the GPU computes bf16 natively"
        kept = "the activations between its matmuls, " if bf16_cpu else ""
        out.append(f"precision: the frozen base is loaded in bf16 ({where}: half the weight memory and faster "
                   f"matmuls), while {kept}the LoRA weights, their gradients and the optimizer state stay fp32; "
                   "dtype='float32' keeps everything in fp32")
    if est.technique not in ("classifier", "reward-model") and shape.model_type in CHUNKED_LOSS_MODEL_TYPES and chunked:
        logits = est.batch_size * est.seq_len * shape.vocab_size * 4
        out.append(f"the loss is computed in chunks of tokens: the {format_bytes(logits)} of fp32 logits over the "
                   f"{shape.vocab_size:,}-token vocabulary never exist at once (chunked_loss=False turns it off)")
    return out


def _base_reasons(technique: str, keep: bool, est: MemoryEstimate) -> list[str]:
    adapter = format_bytes(max(est.adapter, 1))
    if technique == "full":
        return ["full fine-tuning writes a new copy of the whole model; the original stays on disk, but the result "
                "is as large as the base and can't be swapped in and out"]
    if technique in ("classifier", "reward-model"):
        return [f"the base model stays untouched: only the head ({adapter}) is saved"]
    if keep:
        return [f"the base model must stay untouched: adapters never change its weights; the adapter is a separate "
                f"file of about {adapter} you can swap, stack or remove (finetune merge makes a merged copy only "
                "when you ask)"]
    return [f"adapters keep the base model intact: the result is a {adapter} file next to it, swappable per task"]


def _privacy_reasons(private: bool, est: MemoryEstimate) -> list[str]:
    if not private:
        return ["training runs on this machine; nothing is uploaded unless you publish the result"]
    small = f"the {format_bytes(max(est.adapter, 1))} adapter" if est.technique != "full" else "the result"
    return [f"private data: training runs entirely on this machine and nothing leaves it (set HF_HUB_OFFLINE=1 "
            f"once the base model is downloaded, so not even the Hub is contacted); keep {small} on-premises - "
            "fine-tuned weights can reproduce training examples - and never publish it or push the data to a "
            "public Hub"]


def _size(rows: int | None, tokens: int | None) -> str:
    if rows is not None and tokens is not None:
        return f"{rows:,} examples (~{tokens:,} tokens)"
    return f"{rows:,} examples" if rows is not None else f"~{tokens:,} tokens"


def preflight(model: Any, technique: Any, quantizer_name: str | None, options: Mapping[str, Any], *,
              device: str = "auto", seq_len: int | None = None, objective: str | None = None) -> MemoryEstimate | None:
    """Estimate a run before its model is loaded and refuse one that can't fit in the memory free now.

    ``technique`` is a builtin's name or a technique (a plugin's is estimated by what it declares it ``trains``);
    ``objective`` is the plan's (a registered objective: its sequences per example, reference copies and GRPO's
    ``num_generations`` are counted; an unknown one is estimated as ``sft``).
    Returns the estimate (``None`` when the config can't be read locally or the technique is not known to the
    estimate), or raises :class:`ConfigError` naming settings that would fit, as ``finetune advise`` picks them.
    Set ``FINETUNE_SDK_SKIP_MEMORY_CHECK=1`` to only estimate.
    """
    technique_name = estimated_technique(technique)
    spec = known_objective(objective)
    if technique_name is None or quantizer_name not in (*QUANTIZERS, "none", ""):
        return None
    try:
        config = load_config(model)
        estimate = estimate_for_options(config, technique_name, quantizer_name, options, seq_len, device=device,
                                        objective=objective)
    except (FinetuneError, AttributeError, KeyError, TypeError, ValueError):  # an estimate never stops a run
        return None
    if os.environ.get("FINETUNE_SDK_SKIP_MEMORY_CHECK") == "1":
        return estimate
    free = available_memory(estimate.device)
    if estimate.total <= free:
        return estimate
    advice = advise(config, memory_bytes=free, device=estimate.device, seq_len=estimate.seq_len,
                    task={"classifier": CLASSIFICATION, "reward-model": REWARD}.get(technique_name, CAUSAL_LM),
                    num_generations=grpo_generations(spec, options),
                    objective=spec.name if spec is not None and spec.technique_tasks & {CAUSAL_LM, REWARD}
                    else "sft")
    settings = ", ".join([f"technique={advice.technique!r}"] + ([f"quantizer={advice.quantizer!r}"] if advice.quantizer
                         else []) + [f"{k}={v!r}" for k, v in advice.options.items() if k != "max_length"])
    where = "RAM" if estimate.device == "cpu" else "GPU memory"
    fix = f"{settings} would fit" if advice.fits else "even the smallest settings don't: use a smaller model"
    raise ConfigError(f"training needs about {format_bytes(estimate.total)} but only {format_bytes(free)} of {where} "
                      f"is free; {fix} (finetune advise MODEL explains; FINETUNE_SDK_SKIP_MEMORY_CHECK=1 skips this)")


def check_run_memory(model: Any, technique: Any, quantizer: Any, options: Any, examples: list[Any],
                     objective: str | None = None, refuse: bool = True) -> Any:
    """Before a run loads its model: log the training-memory estimate for the longest of ``examples`` (encoded,
    capped at ``max_length``; a DPO pair's or KTO row's longest sequence; GRPO: the longest prompt plus
    ``max_completion_length``) and stop with settings that would fit when it can't (see :func:`preflight`).
    With ``refuse=False`` (the model is already loaded: its weights are no longer free memory) a run that looks
    too big returns None instead of raising. Returns the estimate or None."""
    import logging

    def length(example: Any) -> int:
        nested = [len(v["input_ids"]) for v in example.values() if isinstance(v, Mapping) and "input_ids" in v]
        return max([len(example.get("input_ids") or example.get("prompt_ids") or ()), *nested])

    longest = max((length(ex) for ex in examples), default=0)
    if longest and "max_completion_length" in options:  # sampled completions (GRPO) follow the prompt
        longest += options["max_completion_length"]
    seq_len = min(options["max_length"], longest) if longest else options["max_length"]
    try:
        estimate = preflight(model, technique, quantizer.name if quantizer else None, options, seq_len=seq_len,
                             objective=objective)
    except ConfigError:
        if refuse:
            raise
        return None
    if estimate is not None:
        logging.getLogger("finetune_sdk").info("estimated training memory: %s", estimate)
    return estimate
