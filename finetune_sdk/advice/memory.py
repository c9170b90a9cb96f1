"""How much memory a training run needs, estimated from the model's config before anything is loaded.

The model's shape is read by :mod:`finetune_sdk.advice.model_shape`, the machine by :mod:`finetune_sdk.advice.machine`; the
refuse-and-advise check before a run is :func:`finetune_sdk.advice.advisor.preflight`, the table ``finetune advise`` shows
is drawn by the CLI.

The estimate adds what is resident at the run's peak: weights in their storage format, LoRA adapters, gradients,
optimizer states, saved activations (plus the loss's logits copies) and the framework's own footprint. The
formulas are in ``docs/advisor.md``; ``benchmarks/bench_memory.py`` checks them against measured peaks.

Example:
    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    ...                      num_key_value_heads=4, vocab_size=8000)
    >>> estimate = estimate_training_memory(config, technique="lora", batch_size=4, seq_len=256)
    >>> estimate.total > estimate.weights > 0
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from finetune_sdk.speed.chunked_loss import CHUNKED_LOSS_MODEL_TYPES, chunk_tokens
from finetune_sdk.errors import ConfigError
from finetune_sdk.advice.machine import GiB, MiB, available_memory, format_bytes, parse_memory, resolve_device
from finetune_sdk.advice.model_shape import ModelShape, load_config

__all__ = ["GiB", "MemoryEstimate", "MiB", "ModelShape", "available_memory", "estimate_for_options",
           "estimate_training_memory", "estimated_technique", "format_bytes", "load_config", "parse_memory",
           "resolve_device"]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TECHNIQUES = ("lora", "qlora", "full", "classifier", "reward-model")
QUANTIZERS = (None, "nf4", "int8")
# The process before any model exists: Python + torch + transformers + peft + accelerate imported, then the
# threads, kernel caches and allocator arenas of a first training step. benchmarks/bench_memory.py measures it
# as the peak RSS of training a 1-layer, hidden-64 model on 16 tokens: 615 MiB (torch 2.13 CPU, Python 3.11).
CPU_FRAMEWORK_BYTES = 620 * MiB
# CUDA context + cuBLAS workspaces, which torch.cuda.max_memory_reserved does not count.
CUDA_CONTEXT_BYTES = 600 * MiB
# Memory the allocator holds beyond live tensors, as a fraction of the largest activations of a step. On CPU,
# training fixes glibc's mmap threshold (finetune_sdk.speed.heap), so tensors of 4 MiB or more are unmapped when freed and
# only smaller ones leave holes in the heap (SmolLM2-135M, LoRA all-linear, 8 x 512 tokens: 0.05-0.1 of the
# activations; it was 0.2-0.4 with glibc's rising threshold). CUDA's caching allocator rounds blocks up and keeps
# them cached.
ALLOCATOR_SLACK = {"cpu": 0.10, "cuda": 0.10}
# On CPU bitsandbytes dequantizes each 4/8-bit weight to the compute dtype in every forward and backward matmul;
# the heap keeps about this many times the dequantized weights of all quantized layers (measured 1.2-1.8 for
# 7M-250M parameter models). Buffers above glibc's largest mmap threshold (32 MiB) are mapped and unmapped
# instead, leaving nothing behind, so they don't count.
DEQUANT_SLACK_CPU = 1.25
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed 4-bit + uint8 absmax per 64 + fp32 absmax per 256 blocks
NF4_BYTES_NO_DQ = 0.5 + 4 / 64
LOGIT_COPIES = 3  # log-softmax output + its gradient + the gradient of the logits, all fp32, at backward start
def objective_spec(name: str) -> Any:
    """The registered objective ``name``: what the estimate reads from it (``sequences_per_example``, sequences per
    example that go through the model with gradient in a step: DPO's chosen and rejected, 2; ``chunked_loss``;
    ``memory_note``; ``reference_copies(options)``). DPO and KTO score sequences from full logits: the chunked loss
    is SFT's only. KTO's reference log-probs are precomputed (no second model) and its mismatched pairs run without
    gradient before the policy's forward pass: freed before the backward pass, never the peak. GRPO is estimated
    through ``num_generations``.

    Raises:
        ConfigError: no objective is registered as ``name``.

    Example:
        >>> objective_spec("orpo").sequences_per_example, objective_spec("sft").chunked_loss
        (2, True)
    """
    from finetune_sdk.objectives.choice import get_objective

    try:
        return get_objective(name)
    except ConfigError as exc:
        raise ConfigError(f"can't estimate objective {name!r}: {exc}") from None


@dataclass
class MemoryEstimate:
    """Bytes resident at the training peak, by component; ``total`` is their sum.

    ``gradients`` and ``activations`` are what is alive at the peak moment, ``peak``: ``backward`` (its start,
    when every saved activation and the loss's logits copies exist) or ``optimizer step`` (when the gradients of
    all trained weights outweigh the activations), not the largest each reaches on its own.
    ``saved_activations`` is what the forward pass keeps for the backward pass, without the logits.
    """

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    parameters: int = 0
    trainable_parameters: int = 0
    technique: str = "lora"
    quantizer: str | None = None
    device: str = "cpu"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    peak: str = "backward"
    saved_activations: int = 0
    notes: tuple[str, ...] = ()

    COMPONENTS = ("weights", "adapter", "gradients", "optimizer", "activations", "overhead")

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.COMPONENTS)

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["notes"] = list(self.notes)
        data["total"] = self.total
        return data

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / MiB:,.0f}" for name in self.COMPONENTS)
        return f"{format_bytes(self.total)} ({parts} MiB)"


def estimate_training_memory(
    config: Any, *, technique: str = "lora", quantizer: str | None = None, batch_size: int = 4, seq_len: int = 512,
    gradient_checkpointing: bool = False, dtype: str = "float32", lora_r: int = 8,
    lora_targets: str | list[str] | None = "attention", optimizer: str = "adamw", device: str = "cpu",
    lora_dropout: float = 0.05, mixed_precision: bool = False, double_quant: bool = True, num_labels: int = 2,
    attention: str | None = None, chunked_loss: bool = True, activation_dtype: str | None = None,
    saved_activation_dtype: str | None = None,
    num_generations: int = 0, reference_weights: bool = False, objective: str = "sft",
    reward_backbone: str = "frozen", fused_projections: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory of fine-tuning the model ``config`` describes.

    Args:
        config: a transformers ``PretrainedConfig``, a loaded model, or a model folder / cached Hub id / ``.gguf``.
        technique: ``lora``, ``qlora``, ``full``, ``classifier`` (frozen backbone without its LM head, a linear
            head trained) or ``reward-model`` (a scalar head on a backbone without its LM head: frozen as the
            classifier's, or with LoRA adapters as ``lora``; ``batch_size`` counts pairs, always trained with the
            ``reward-modeling`` objective: two sequences each).
        quantizer: ``None``, ``"nf4"`` or ``"int8"`` storage for the linear layers (qlora implies nf4).
        batch_size, seq_len: tokens per micro-batch are ``batch_size * seq_len``.
        gradient_checkpointing: keep only each layer's input; recompute one layer at a time in the backward pass.
        dtype: storage of the unquantized weights and of the activations: ``float32``, ``bfloat16``, ``float16``.
        lora_r, lora_targets, lora_dropout: LoRA rank, targets (``"attention"``: PEFT's default for the
            architecture, ``"all-linear"``, or module names) and dropout (which keeps a mask and a copy per target).
        optimizer: transformers ``optim`` name (``adamw_torch``, ``adamw_8bit``, ``sgd``...) or ``adamw``.
        device: ``cpu`` (peak RSS of the process) or ``cuda`` (peak GPU memory, CUDA context included).
        mixed_precision: ``bf16=True``/``fp16=True`` autocast over ``dtype`` weights.
        activation_dtype: ``float32`` for 16-bit frozen weights whose matmuls hand fp32 to the rest of the model
            (``dtype="auto"`` on a bf16 CPU); ``None``: the weights' dtype, or 16 bits under autocast.
        saved_activation_dtype: ``bfloat16`` when those fp32 activations are kept for the backward pass in bf16
            (:func:`finetune_sdk.speed.precision.bf16_saved_activations`, also ``dtype="auto"`` on a bf16 CPU).
        chunked_loss: the SDK's chunked cross-entropy (its default, for the model types it supports): the loss
            holds one chunk's logits and the hidden state's gradient instead of every token's fp32 logits.
        num_generations: GRPO's group size (0: not GRPO): each of the ``batch_size`` prompts is sampled that many
            completions, so a micro-batch trains ``batch_size * num_generations`` sequences of ``seq_len`` tokens
            (prompt + ``max_completion_length``), with full fp32 logits (GRPO's loss takes no chunked loss).
            Sampling's KV cache is freed before that forward pass, so it is not part of the peak.
        reference_weights: GRPO's reference (``beta > 0``): one more copy of the trainable weights, swapped in to
            score the samples; its forward pass runs without gradients, smaller than the training one.
        objective: a registered objective (:func:`objective_spec`): ``sft``; ``dpo``, ``orpo``, ``simpo``
            (chosen and rejected: twice the sequences); ``kto`` (the mismatched pairs' forward pass runs without
            gradient: no more peak memory); only ``sft`` takes the chunked loss, the others use full logits.
        reward_backbone: ``reward-model`` only: ``frozen`` or ``lora``.
    """
    if technique not in TECHNIQUES:
        raise ConfigError(f"can't estimate technique {technique!r}; known: {', '.join(TECHNIQUES)}")
    if technique == "qlora":
        quantizer = quantizer or "nf4"
    if quantizer not in QUANTIZERS:
        raise ConfigError(f"can't estimate quantizer {quantizer!r}; known: nf4, int8 or none")
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if technique == "full" and quantizer:
        raise ConfigError("technique 'full' can't train a quantized model; drop the quantizer or use lora/qlora")
    if technique == "reward-model":
        objective = "reward-modeling"
    spec = objective_spec(objective)
    device = resolve_device(device)
    shape = ModelShape.from_config(load_config(config), attention=attention)
    no_lm_head = technique in ("classifier", "reward-model")  # a backbone and a head (AutoModel)
    reward_lora = technique == "reward-model" and reward_backbone == "lora"
    classifier = no_lm_head and not reward_lora  # the backbone runs without gradients
    if shape.family == "encoder" and not no_lm_head:
        raise ConfigError(f"{shape.model_type} is an encoder: it can't be trained as a causal LM; "
                          "use technique 'classifier' (task classification)")
    adapters = technique in ("lora", "qlora") or reward_lora
    if technique == "reward-model":
        num_labels = 1
    counts = shape.parameter_counts(lm_head=not no_lm_head)
    targets = shape.lora_targets(lora_targets) if adapters else []
    # peft's prepare_model_for_kbit_training casts every unquantized weight of a quantized model to fp32
    plain = 4 if quantizer and adapters else DTYPE_BYTES[dtype]
    weights = (counts["linear"] * _quantized_bytes(quantizer, plain, double_quant)
               + (counts["total"] - counts["linear"]) * plain
               + (counts["linear_rows"] * 4 if quantizer == "int8" else 0))
    adapter_params = lora_r * sum(i + o for _, i, o in targets) * shape.layers
    head_params = shape.hidden * num_labels + num_labels if no_lm_head else 0
    trainable = counts["total"] if technique == "full" else adapter_params + head_params
    grad_bytes = DTYPE_BYTES[dtype] if technique == "full" else 4  # adapters and heads are fp32 (peft's default)
    # activations are in the compute dtype: the weights' dtype, or 16 bits under autocast. A quantized model
    # computes in fp32 whatever its compute dtype: prepare_model_for_kbit_training makes the embeddings fp32 and
    # bitsandbytes casts each matmul's output back to its input's dtype.
    compute16 = (mixed_precision or dtype != "float32") and not (quantizer and adapters) and \
        activation_dtype != "float32"
    act_bytes = 2 if compute16 else 4
    dequant_bytes = 2 if mixed_precision or dtype != "float32" else 4  # bitsandbytes' compute dtype
    # GRPO: the group is the effective batch; DPO: chosen and rejected
    sequences = batch_size * max(num_generations, 1) * spec.sequences_per_example
    tokens = sequences * seq_len
    if num_generations or not spec.chunked_loss:
        chunked_loss = False
    grads_all = trainable * grad_bytes
    states = trainable * _optimizer_state_bytes(optimizer, grad_bytes)
    step_extra = saved_bytes = transient = 0
    if classifier:  # the backbone runs without gradients: one layer's intermediates at a time
        activations = largest_activations = tokens * shape.inference_per_token(seq_len, device) * act_bytes
        gradients, peak = grads_all, "backward"
    else:
        saved, saved32, transient = shape.activation_elements(
            "lora" if reward_lora else technique, [name for name, _, _ in targets], seq_len, lora_r=lora_r,
            lora_dropout=lora_dropout,
            checkpointing=gradient_checkpointing, device=device, compute16=compute16,
            autocast32=mixed_precision and dtype == "float32")
        mask_bytes = act_bytes if shape.math_attention(device) else 1  # the attention mask, shared by all layers
        saved_bytes = (tokens * ((saved - saved32) * act_bytes + saved32 * 4)
                       + sequences * seq_len * seq_len * mask_bytes)
        if saved_activation_dtype == "bfloat16":  # fp32 activations kept for the backward pass in bf16
            saved_bytes = tokens * saved * 2 + sequences * seq_len * seq_len * mask_bytes
        linears = shape.layer_linears()
        if quantizer:  # a 4/8-bit weight is dequantized to the compute dtype for its matmul
            saved_bytes += max(i * o for _, i, o in linears) * dequant_bytes
        elif mixed_precision and dtype == "float32":  # autocast's 16-bit weight copies, saved by every matmul
            saved_bytes += (counts["linear"] + shape.vocab_size * shape.hidden) * 2
        logits = 0 if no_lm_head else tokens * shape.vocab_size * 4  # the loss works on fp32 logits
        head_grad = shape.vocab_size * shape.hidden * grad_bytes if technique == "full" else 0
        if chunked_loss and shape.model_type in CHUNKED_LOSS_MODEL_TYPES and not no_lm_head:
            # one chunk's logits copies, the hidden state's gradient (made in the forward pass) and, for full
            # fine-tuning, the head's fp32 weight gradient accumulated over the chunks
            loss_bytes = (LOGIT_COPIES * min(tokens, chunk_tokens(shape.vocab_size)) * shape.vocab_size * 4
                          + tokens * shape.hidden * act_bytes + (shape.vocab_size * shape.hidden * 4 if head_grad
                                                                 else 0))
            saved_bytes += loss_bytes
            logits = 0
        if technique == "full":
            largest = max(shape.vocab_size * shape.hidden, max(i * o for _, i, o in linears))
        else:
            largest = max((lora_r * max(i, o) for _, i, o in targets), default=0)
        # optimizer-step temporaries: torch's AdamW makes sqrt(exp_avg_sq) per tensor on CPU, for all tensors at
        # once (foreach) on CUDA
        step = (grads_all if device == "cuda" else 2 * largest * grad_bytes) if states else 0
        moments = {  # (activations, gradients, optimizer temporaries) alive on top of weights and optimizer states
            "backward": (saved_bytes + max(LOGIT_COPIES * logits, tokens * transient * act_bytes), 0, 0),
            "lm_head backward": (saved_bytes + logits, head_grad, 0),
            "optimizer step": (0, grads_all, step),
        }
        peak = max(moments, key=lambda k: sum(moments[k]))
        activations, gradients, step_extra = moments[peak]
        largest_activations = moments["backward"][0]
        peak = "optimizer step" if peak == "optimizer step" else "backward"
    # the heap grows to the step's largest activations, whichever moment is the peak
    slack = largest_activations * ALLOCATOR_SLACK[device]
    if gradient_checkpointing and device == "cpu" and not classifier:
        # glibc's heap keeps a recomputed layer's buffers as holes under the gradients allocated after them
        slack += tokens * transient * act_bytes
    if quantizer and device == "cpu":
        heap_dequant = sum(i * o * dequant_bytes for _, i, o in shape.layer_linears()
                           if i * o * dequant_bytes <= GLIBC_MMAP_THRESHOLD_MAX) * shape.layers
        slack += heap_dequant * DEQUANT_SLACK_CPU
    overhead = (CPU_FRAMEWORK_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES) + slack
    notes = shape.notes + ((spec.memory_note,) if spec.memory_note else ())
    if fused_projections and adapters:  # finetune_sdk.speed.fused_projections: a concatenated copy of q/k/v, gate/up
        from finetune_sdk.speed.fused_projections import GROUPS

        adapted = {name.rsplit(".", 1)[-1]: (i, o) for name, i, o in targets}
        fused = sum(sum(i * o for i, o in (adapted[n] for n in group)) for group in GROUPS
                    if all(n in adapted for n in group)) * shape.layers * DTYPE_BYTES[dtype]
        weights += fused
        notes += (f"fused frozen projections: {format_bytes(fused)} of concatenated weights",) if fused else ()
    if num_generations:
        reference = trainable * grad_bytes if reference_weights else 0
        weights += reference
        notes += (f"GRPO: {batch_size} prompt(s) x {num_generations} completions = {sequences} sequences of "
                  f"{seq_len} tokens per micro-batch" + (f", plus the reference's copy of the trainable weights "
                                                          f"({format_bytes(reference)})" if reference else ""),)
    return MemoryEstimate(
        weights=int(weights), adapter=(adapter_params + head_params) * 4, gradients=int(gradients),
        optimizer=int(states + step_extra), activations=int(activations), overhead=int(overhead),
        parameters=counts["total"] + adapter_params + head_params, trainable_parameters=trainable,
        technique=technique, quantizer=quantizer, device=device, batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing and not classifier, dtype=dtype, peak=peak,
        saved_activations=int(saved_bytes), notes=notes)


def _quantized_bytes(quantizer: str | None, plain: int, double_quant: bool) -> float:
    if quantizer == "nf4":
        return NF4_BYTES if double_quant else NF4_BYTES_NO_DQ
    if quantizer == "int8":
        return 1.0
    return float(plain)


def _optimizer_state_bytes(name: str, weight_bytes: int) -> float:
    """Optimizer state bytes per trained parameter (transformers ``optim`` names)."""
    name = name.lower()
    if "8bit" in name:  # bitsandbytes: uint8 states + a float absmax per 256 values
        return (1 if "lion" in name else 2) * (1 + 4 / 256)
    if name.startswith("sgd") or name == "none":
        return 0.0
    if any(word in name for word in ("lion", "adagrad", "rmsprop")):
        return float(weight_bytes)
    if name.startswith("adafactor"):  # factored second moment: about a row and a column per matrix
        return 0.05 * weight_bytes
    return 2.0 * weight_bytes  # AdamW and friends: exp_avg and exp_avg_sq, in the weights' dtype


def estimate_for_options(model_config: Any, technique_name: str, quantizer_name: str | None,
                         options: Mapping[str, Any], seq_len: int | None = None, *,
                         device: str = "auto", objective: str | None = None) -> MemoryEstimate:
    """The estimate for a ``Trainer``'s resolved options (``r``, ``target_modules``, ``lora_dropout``,
    ``per_device_train_batch_size``, ``gradient_checkpointing``, ``bf16``/``fp16``, ``dtype``, ``optim``,
    ``max_length``); ``seq_len`` defaults to ``max_length``, the longest a batch can be.

    ``dtype="auto"`` resolves as training does (:func:`finetune_sdk.speed.precision.resolve_precision`): bfloat16 for the
    frozen base of LoRA on a bf16 GPU or an AVX512-BF16/AMX CPU, float32 otherwise. With a quantizer the
    activations follow its ``compute_dtype`` (``auto``: bfloat16 on a CUDA GPU, else float32).
    ``chunked_loss`` (default true) is the SDK's chunked cross-entropy. ``objective="grpo"`` counts
    ``num_generations`` sequences per prompt and, with ``beta > 0``, the reference's copy of the trainable weights;
    ``dpo`` and ``kto`` are estimated as :func:`estimate_training_memory` says, anything else as ``sft``.
    """
    device = resolve_device(device)
    spec = known_objective(objective)
    quantizer = None if quantizer_name in (None, "", "none") else quantizer_name
    dtype, activations, saved_as = options.get("dtype") or "auto", None, None
    reward_lora = technique_name == "reward-model" and options.get("backbone") == "lora"
    if quantizer and (technique_name not in ("classifier", "reward-model") or reward_lora):
        # activations follow bitsandbytes' compute dtype
        dtype = options.get("compute_dtype") or "auto"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
    if dtype == "auto":
        from finetune_sdk.speed.precision import resolve_precision

        precision = resolve_precision(options, adapter=technique_name in ("lora", "qlora"),
                                      full=technique_name == "full", quantized=quantizer is not None, device=device)
        dtype, activations = precision.dtype, precision.activations or None
        saved_as = precision.saved_activations or None
    targets = options.get("target_modules")
    if targets is None:
        targets = "all-linear" if technique_name == "qlora" else "attention"
    default_r = 64 if technique_name == "qlora" else 8
    return estimate_training_memory(
        model_config, technique=technique_name, quantizer=quantizer,
        batch_size=int(options.get("per_device_train_batch_size") or 4),
        seq_len=int(seq_len or options.get("max_length") or 512),
        gradient_checkpointing=bool(options.get("gradient_checkpointing")), dtype=dtype,
        lora_r=int(options.get("r") or default_r), lora_targets=targets,
        lora_dropout=float(options.get("lora_dropout", 0.05) or 0.0),
        optimizer=str(options.get("optim") or "adamw_torch"), device=device,
        mixed_precision=bool(options.get("bf16") or options.get("fp16")),
        double_quant=bool(options.get("double_quant", True)),
        num_labels=len(options.get("labels") or ()) or int(options.get("num_labels") or 2),
        chunked_loss=options.get("chunked_loss", True) is not False, activation_dtype=activations,
        saved_activation_dtype=saved_as, num_generations=grpo_generations(spec, options),
        reference_weights=spec.reference_copies(options) > 0 if spec is not None else False,
        objective=spec.name if spec is not None and "classification" not in spec.technique_tasks else "sft",
        reward_backbone=str(options.get("backbone") or "frozen"),
        fused_projections=device == "cpu" and dtype == "bfloat16" and activations == "float32")


def grpo_generations(spec: Any, options: Mapping[str, Any]) -> int:
    """Completions sampled per prompt of an objective that samples groups (GRPO's ``num_generations``); else 0."""
    if spec is None or "num_generations" not in spec.option_specs():
        return 0
    return int(options.get("num_generations") or spec.option_specs()["num_generations"].default)


def known_objective(name: str | None) -> Any:
    """The registered objective ``name``, or None (not given, or unknown: estimated as ``sft``)."""
    from finetune_sdk.objectives.choice import get_objective

    try:
        return get_objective(name) if name else None
    except ConfigError:
        return None


#: What a technique trains (``Technique.trains``) -> the builtin technique whose estimate covers it.
TRAINS = {"adapter": "lora", "all weights": "full", "head": "classifier"}


def estimated_technique(technique: Any) -> str | None:
    """The name the estimate knows ``technique`` by: a builtin's name, or for a plugin's technique (an instance
    or class) what it declares it trains (``trains = "adapter"``, ``"all weights"`` or ``"head"``); ``None`` when
    neither tells (a plugin technique name given as a string, or one that declares nothing).

    >>> from finetune_sdk.technique import Technique
    >>> class Dora(Technique):
    ...     name, trains = "dora", "adapter"
    >>> estimated_technique("qlora"), estimated_technique(Dora()), estimated_technique("dora")
    ('qlora', 'lora', None)
    """
    name = technique if isinstance(technique, str) else getattr(technique, "name", None)
    if name in TECHNIQUES:
        return name
    return None if isinstance(technique, str) else TRAINS.get(getattr(technique, "trains", None) or "")
