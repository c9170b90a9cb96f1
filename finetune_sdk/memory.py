"""How much memory a training run needs, estimated from the model's config before anything is loaded.

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

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from finetune_sdk.errors import ConfigError, FinetuneError, ModelNotFoundError

MiB = 1024**2
GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TECHNIQUES = ("lora", "qlora", "full", "classifier")
QUANTIZERS = (None, "nf4", "int8")
# The process before any model exists: Python + torch + transformers + peft + accelerate imported, then the
# threads, kernel caches and allocator arenas of a first training step. benchmarks/bench_memory.py measures it
# as the peak RSS of training a 1-layer, hidden-64 model on 16 tokens: 615 MiB (torch 2.13 CPU, Python 3.11).
CPU_FRAMEWORK_BYTES = 620 * MiB
# CUDA context + cuBLAS workspaces, which torch.cuda.max_memory_reserved does not count.
CUDA_CONTEXT_BYTES = 600 * MiB
# Memory the allocator holds beyond live tensors, as a fraction of the largest activations of a step: glibc's heap
# keeps freed activation buffers between live ones (measured 0.2-0.4 of the activations on CPU); CUDA's caching
# allocator rounds blocks up and keeps them cached.
ALLOCATOR_SLACK = {"cpu": 0.35, "cuda": 0.10}
# On CPU bitsandbytes dequantizes each 4/8-bit weight to the compute dtype in every forward and backward matmul;
# the heap keeps about this many times the dequantized weights of all quantized layers (measured 1.2-1.8 for
# 7M-250M parameter models). Buffers above glibc's largest mmap threshold (32 MiB) are mapped and unmapped
# instead, leaving nothing behind, so they don't count.
DEQUANT_SLACK_CPU = 1.25
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed 4-bit + uint8 absmax per 64 + fp32 absmax per 256 blocks
NF4_BYTES_NO_DQ = 0.5 + 4 / 64
LOGIT_COPIES = 3  # log-softmax output + its gradient + the gradient of the logits, all fp32, at backward start


ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "granite"})
PEFT_DEFAULT_TARGETS = {"decoder": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "encoder": ("query", "value")}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of an architecture that memory depends on, read from its config.

    ``family`` is ``decoder`` (Llama-style: gated MLP, RMSNorm; Llama, Mistral, Qwen2...), ``gpt2`` or ``encoder``
    (BERT-style). Configs of other decoders are read as Llama-style when they have the usual attribute names.
    """

    model_type: str
    family: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    positions: int = 0
    token_types: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention: str = "sdpa"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    gelu_new: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_config(cls, config: Any, attention: str | None = None) -> ModelShape:
        config = getattr(config, "text_config", None) or config
        model_type = getattr(config, "model_type", "") or ""
        attn = attention or getattr(config, "_attn_implementation", None) or "sdpa"
        if model_type == "gpt2":
            hidden, heads = config.n_embd, config.n_head
            return cls(model_type, "gpt2", config.vocab_size, hidden, config.n_layer, heads, heads, hidden // heads,
                       config.n_inner or 4 * hidden, bool(getattr(config, "tie_word_embeddings", True)),
                       positions=config.n_positions, qkv_bias=True, o_bias=True, mlp_bias=True, attention=attn,
                       attention_dropout=float(config.attn_pdrop or 0), hidden_dropout=float(config.resid_pdrop or 0),
                       gelu_new=config.activation_function == "gelu_new")
        missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                     "vocab_size") if getattr(config, name, None) is None]
        if missing:
            raise ConfigError(f"can't estimate memory for model type {model_type!r}: its config has no "
                              f"{', '.join(missing)}")
        hidden, heads = config.hidden_size, config.num_attention_heads
        common = dict(vocab_size=config.vocab_size, hidden=hidden, layers=config.num_hidden_layers, heads=heads,
                      intermediate=config.intermediate_size, attention=attn)
        if model_type in ENCODER_TYPES:
            return cls(model_type, "encoder", kv_heads=heads, head_dim=hidden // heads, tied=True,
                       positions=config.max_position_embeddings, token_types=getattr(config, "type_vocab_size", 0),
                       qkv_bias=True, o_bias=True, mlp_bias=True,
                       attention_dropout=float(getattr(config, "attention_probs_dropout_prob", 0) or 0),
                       hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0) or 0), **common)
        notes = []
        if model_type not in DECODER_TYPES:
            notes.append(f"{model_type or 'this model'} is read as a Llama-style decoder (gated MLP, RMSNorm)")
        if (getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 0) > 1:
            notes.append("mixture of experts: only one expert's MLP is counted, so the estimate is low")
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(model_type, "decoder", kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads,
                   tied=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=attention_bias or model_type.startswith("qwen2"), o_bias=attention_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=model_type.startswith("qwen3"),
                   attention_dropout=float(getattr(config, "attention_dropout", 0) or 0), notes=tuple(notes),
                   **common)

    # -- parameters ----------------------------------------------------------------------------------------
    def layer_linears(self) -> list[tuple[str, int, int]]:
        """``(name, in_features, out_features)`` of each linear layer in one block."""
        h, i = self.hidden, self.intermediate
        if self.family == "gpt2":
            return [("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, i), ("mlp.c_proj", i, h)]
        if self.family == "encoder":
            return [("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
                    ("attention.output.dense", h, h), ("intermediate.dense", h, i), ("output.dense", i, h)]
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
                ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i), ("mlp.down_proj", i, h)]

    def parameter_counts(self, lm_head: bool = True) -> dict[str, int]:
        """Parameters by storage group: ``linear`` (quantizable weights), ``linear_rows`` (their output rows),
        ``embeddings``, ``lm_head``, ``other`` (norms and biases) and ``total``."""
        h, i, v = self.hidden, self.intermediate, self.vocab_size
        linears = self.layer_linears()
        linear = sum(a * b for _, a, b in linears) * self.layers
        rows = sum(b for _, _, b in linears) * self.layers
        embeddings = v * h + self.positions * h + self.token_types * h
        if self.family == "decoder":
            q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            bias = ((q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
                    + (2 * i + h if self.mlp_bias else 0))
            other = self.layers * (bias + 2 * h + (2 * self.head_dim if self.qk_norm else 0)) + h
        elif self.family == "gpt2":
            other = self.layers * (3 * h + h + i + h + 4 * h) + 2 * h
        else:  # encoder: embedding LayerNorm, biases, two LayerNorms per layer, pooler (a linear)
            other = 2 * h + self.layers * (4 * h + i + h + 4 * h) + h
            linear, rows = linear + h * h, rows + h
        head = v * h if lm_head and not self.tied and self.family != "encoder" else 0
        return {"linear": linear, "linear_rows": rows, "embeddings": embeddings, "lm_head": head, "other": other,
                "total": linear + embeddings + head + other}

    def lora_targets(self, spec: str | list[str] | None) -> list[tuple[str, int, int]]:
        """The linears of one block that LoRA adapts: ``attention`` (PEFT's default), ``all-linear`` or names."""
        linears = self.layer_linears()
        if spec is None or spec == "attention":
            names: Any = PEFT_DEFAULT_TARGETS[self.family]
        elif spec == "all-linear":
            return linears
        else:
            names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
        found = [lin for lin in linears if any(lin[0] == n or lin[0].endswith("." + n) for n in names)]
        if not found:
            raise ConfigError(f"LoRA targets {', '.join(names)} match no layer of {self.model_type}; its linears are "
                              f"{', '.join(name.rsplit('.', 1)[-1] for name, _, _ in linears)}")
        return found

    # -- activations (elements per token) ------------------------------------------------------------------
    def math_attention(self, device: str) -> bool:
        """True when attention materialises ``heads x seq x seq`` probabilities: eager, or sdpa with dropout on
        CPU (no fused kernel there supports dropout)."""
        return self.attention == "eager" or (device == "cpu" and self.attention_dropout > 0)

    def saved_per_layer(self, technique: str, targets: list[str], seq_len: int, *, lora_r: int = 8,
                        lora_dropout: float = 0.0, device: str = "cpu", compute16: bool = False,
                        autocast32: bool = False) -> tuple[float, float]:
        """``(elements, fp32_elements)`` per token that one block saves for the backward pass.

        A frozen linear saves nothing (its weight suffices for the input gradient); a trained one saves its
        input; a LoRA target saves its input, or with dropout a mask and a dropped copy of it, plus its rank-r
        intermediate. ``fp32_elements`` are those kept in fp32 even when the model computes in 16 bits
        (``compute16``): RMSNorm's upcast input and the inputs of the fp32 LoRA adapters, which peft casts for
        each target. Under autocast over fp32 weights (``autocast32``) each trained linear saves its own 16-bit
        copy of its input, and the norms' outputs stay fp32.
        """
        full = technique == "full"
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        math = self.math_attention(device)
        probs = self.heads * seq_len * (3 if self.attention_dropout > 0 else 1)
        hit = set(targets)

        def lora_inputs(names: tuple[str, ...], size: int, saved_anyway: bool = False) -> float:
            count = len(hit.intersection(names))
            if not count or full:
                return 0
            if lora_dropout > 0:  # the dropped copy + the mask: fp32 on CPU, one byte (bool) on CUDA
                return (1 + (1 if device == "cpu" else 0.25)) * size * count
            return size * count if compute16 else (0 if saved_anyway else size)

        adapters = 0 if full else lora_r * len(targets)
        if self.family == "gpt2":  # LayerNorm saves input + mean + rstd; gelu_new saves four tensors
            attn = (3 * h + probs) if math else 4 * h + self.heads
            saved = h + 2 + attn + (2 * h if self.hidden_dropout > 0 else 0) + h + 2 + (4 * i if self.gelu_new else i)
            if full:
                return saved + 2 * h + i + (h if math else 0), 4 + self.heads
            lora = (adapters + lora_inputs(("attn.c_attn",), h) + lora_inputs(("attn.c_proj",), h, not math)
                    + lora_inputs(("mlp.c_fc",), h) + lora_inputs(("mlp.c_proj",), i))
            return saved + lora, 4 + self.heads + lora
        # Llama-style: residual + rsqrt, q/k/v after RoPE, attention output, residual + rsqrt, gate, up, silu(gate)
        attn = (3 * q + probs) if math else q + 2 * kv + q + self.heads
        saved = h + 1 + attn + h + 1 + 3 * i
        kept32 = 2 * h + 2 + self.heads
        if full and autocast32:  # q/k/v and gate/up each keep a 16-bit input copy; normalised outputs in fp32
            return saved + 7 * h + i + (q if math else 0), kept32 + 2 * h
        if full:  # + both norms' normalised and weighted outputs, silu(gate)*up, the attention output copy
            return saved + 4 * h + i + (q if math else 0), kept32
        lora = (adapters + lora_inputs(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), h)
                + lora_inputs(("self_attn.o_proj",), q, not math)
                + lora_inputs(("mlp.gate_proj", "mlp.up_proj"), h) + lora_inputs(("mlp.down_proj",), i))
        return saved + lora, kept32 + lora

    def activation_elements(self, technique: str, targets: list[str], seq_len: int, *, lora_r: int = 8,
                            lora_dropout: float = 0.0, checkpointing: bool = False, device: str = "cpu",
                            compute16: bool = False, autocast32: bool = False) -> tuple[float, float, float]:
        """``(saved, saved_fp32, transient)`` elements per token: what the forward pass leaves for the backward
        pass (and how much of it stays fp32 under 16-bit compute), and the most alive on top of it while one
        block is back-propagated (recomputed first when checkpointing)."""
        h, i = self.hidden, self.intermediate
        per_layer, per_layer32 = self.saved_per_layer(technique, targets, seq_len, lora_r=lora_r,
                                                      lora_dropout=lora_dropout, device=device, compute16=compute16,
                                                      autocast32=autocast32)
        full = technique == "full"
        final = h + 2 + (2 * h if full else 0) + (h if self.family == "gpt2" and self.hidden_dropout > 0 else 0)
        working = 3 * i + 3 * h  # gradients of one block's intermediates
        if checkpointing:
            return self.layers * h + final, h + 2, per_layer + working
        return self.layers * per_layer + final, self.layers * per_layer32 + h + 2, working

    def inference_per_token(self, seq_len: int, device: str) -> float:
        """Elements per token alive at once in a forward pass without gradients (the classifier's backbone)."""
        probs = 2 * self.heads * seq_len if self.math_attention(device) else 0
        return 3 * self.hidden + 3 * self.intermediate + probs


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

    def table(self, title: str = "memory at the training peak") -> Any:
        """A rich ``Table`` of the components, with what was estimated as its caption."""
        from rich.table import Table

        setup = [self.technique + (f" + {self.quantizer}" if self.quantizer else ""),
                 f"batch {self.batch_size} x {self.seq_len} tokens"]
        if self.gradient_checkpointing:
            setup.append("gradient checkpointing")
        setup.append(f"{self.device}, peak at the "
                     f"{'optimizer step' if self.peak == 'optimizer step' else 'start of the backward pass'}")
        caption = ", ".join(setup)
        table = Table(title=title, caption=caption, min_width=min(len(caption), 100))
        table.add_column("component")
        table.add_column("size", justify="right")
        for name in self.COMPONENTS:
            table.add_row(name, format_bytes(getattr(self, name)))
        table.add_row("total", format_bytes(self.total), style="bold")
        return table

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / MiB:,.0f}" for name in self.COMPONENTS)
        return f"{format_bytes(self.total)} ({parts} MiB)"


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``300 MiB``, ``4.2 MiB``, ``12 KiB``.

    >>> format_bytes(1.5 * 2**30), format_bytes(300 * 2**20), format_bytes(12 * 1024)
    ('1.5 GiB', '300 MiB', '12 KiB')
    """
    if n >= GiB:
        return f"{n / GiB:,.1f} GiB"
    if n >= 10 * MiB:
        return f"{n / MiB:,.0f} MiB"
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:,.0f} KiB"


def parse_memory(text: str | int) -> int:
    """Bytes from ``8GiB``, ``8 GB``, ``8000MB``, ``512MiB`` or a plain number of bytes.

    >>> parse_memory("8GiB"), parse_memory("1.5 GB"), parse_memory("2048")
    (8589934592, 1500000000, 2048)
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"can't read memory size {text!r}; write it like 8GiB, 16GB or 8000MB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit[0]]
    if "I" in unit:
        scale = 1024 ** ("BKMGT".index(unit[0]))
    return int(number * scale)


def load_config(model: Any) -> Any:
    """A ``PretrainedConfig`` from a config, a loaded model, a model folder, a ``.gguf`` file or a cached Hub id."""
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        return model
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        return model.config
    from transformers import AutoConfig

    from finetune_sdk.models import resolve_source

    source = resolve_source(os.fspath(model))
    folder = source.path or source.id
    if source.kind == "gguf":
        from pathlib import Path

        from finetune_sdk.gguf import converted_folder

        folder = str(converted_folder(Path(source.id)))
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"can't read the config of {model}: {str(exc).splitlines()[0]} (the estimate reads "
                                 "local files only: download the model first or give its folder)") from None


def estimate_training_memory(
    config: Any, *, technique: str = "lora", quantizer: str | None = None, batch_size: int = 4, seq_len: int = 512,
    gradient_checkpointing: bool = False, dtype: str = "float32", lora_r: int = 8,
    lora_targets: str | list[str] | None = "attention", optimizer: str = "adamw", device: str = "cpu",
    lora_dropout: float = 0.05, mixed_precision: bool = False, double_quant: bool = True, num_labels: int = 2,
    attention: str | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of fine-tuning the model ``config`` describes.

    Args:
        config: a transformers ``PretrainedConfig``, a loaded model, or a model folder / cached Hub id / ``.gguf``.
        technique: ``lora``, ``qlora``, ``full`` or ``classifier`` (frozen backbone without its LM head, a linear
            head trained).
        quantizer: ``None``, ``"nf4"`` or ``"int8"`` storage for the linear layers (qlora implies nf4).
        batch_size, seq_len: tokens per micro-batch are ``batch_size * seq_len``.
        gradient_checkpointing: keep only each layer's input; recompute one layer at a time in the backward pass.
        dtype: storage of the unquantized weights and of the activations: ``float32``, ``bfloat16``, ``float16``.
        lora_r, lora_targets, lora_dropout: LoRA rank, targets (``"attention"``: PEFT's default for the
            architecture, ``"all-linear"``, or module names) and dropout (which keeps a mask and a copy per target).
        optimizer: transformers ``optim`` name (``adamw_torch``, ``adamw_8bit``, ``sgd``...) or ``adamw``.
        device: ``cpu`` (peak RSS of the process) or ``cuda`` (peak GPU memory, CUDA context included).
        mixed_precision: ``bf16=True``/``fp16=True`` autocast over ``dtype`` weights.
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
    device = resolve_device(device)
    shape = ModelShape.from_config(load_config(config), attention=attention)
    classifier = technique == "classifier"
    if shape.family == "encoder" and not classifier:
        raise ConfigError(f"{shape.model_type} is an encoder: it can't be trained as a causal LM; "
                          "use technique 'classifier' (task classification)")
    adapters = technique in ("lora", "qlora")
    counts = shape.parameter_counts(lm_head=not classifier)
    targets = shape.lora_targets(lora_targets) if adapters else []
    # peft's prepare_model_for_kbit_training casts every unquantized weight of a quantized model to fp32
    plain = 4 if quantizer and adapters else DTYPE_BYTES[dtype]
    weights = (counts["linear"] * _quantized_bytes(quantizer, plain, double_quant)
               + (counts["total"] - counts["linear"]) * plain
               + (counts["linear_rows"] * 4 if quantizer == "int8" else 0))
    adapter_params = lora_r * sum(i + o for _, i, o in targets) * shape.layers
    head_params = shape.hidden * num_labels + num_labels if classifier else 0
    trainable = counts["total"] if technique == "full" else adapter_params + head_params
    grad_bytes = DTYPE_BYTES[dtype] if technique == "full" else 4  # adapters and heads are fp32 (peft's default)
    # activations are in the compute dtype: the weights' dtype, or 16 bits under autocast. A quantized model
    # computes in fp32 whatever its compute dtype: prepare_model_for_kbit_training makes the embeddings fp32 and
    # bitsandbytes casts each matmul's output back to its input's dtype.
    compute16 = (mixed_precision or dtype != "float32") and not (quantizer and adapters)
    act_bytes = 2 if compute16 else 4
    dequant_bytes = 2 if mixed_precision or dtype != "float32" else 4  # bitsandbytes' compute dtype
    tokens = batch_size * seq_len
    grads_all = trainable * grad_bytes
    states = trainable * _optimizer_state_bytes(optimizer, grad_bytes)
    step_extra = saved_bytes = transient = 0
    if classifier:  # the backbone runs without gradients: one layer's intermediates at a time
        activations = largest_activations = tokens * shape.inference_per_token(seq_len, device) * act_bytes
        gradients, peak = grads_all, "backward"
    else:
        saved, saved32, transient = shape.activation_elements(
            technique, [name for name, _, _ in targets], seq_len, lora_r=lora_r, lora_dropout=lora_dropout,
            checkpointing=gradient_checkpointing, device=device, compute16=compute16,
            autocast32=mixed_precision and dtype == "float32")
        mask_bytes = act_bytes if shape.math_attention(device) else 1  # the attention mask, shared by all layers
        saved_bytes = (tokens * ((saved - saved32) * act_bytes + saved32 * 4)
                       + batch_size * seq_len * seq_len * mask_bytes)
        linears = shape.layer_linears()
        if quantizer:  # a 4/8-bit weight is dequantized to the compute dtype for its matmul
            saved_bytes += max(i * o for _, i, o in linears) * dequant_bytes
        elif mixed_precision and dtype == "float32":  # autocast's 16-bit weight copies, saved by every matmul
            saved_bytes += (counts["linear"] + shape.vocab_size * shape.hidden) * 2
        logits = tokens * shape.vocab_size * 4  # the loss works on fp32 logits
        head_grad = shape.vocab_size * shape.hidden * grad_bytes if technique == "full" else 0
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
    return MemoryEstimate(
        weights=int(weights), adapter=(adapter_params + head_params) * 4, gradients=int(gradients),
        optimizer=int(states + step_extra), activations=int(activations), overhead=int(overhead),
        parameters=counts["total"] + adapter_params + head_params, trainable_parameters=trainable,
        technique=technique, quantizer=quantizer, device=device, batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing and not classifier, dtype=dtype, peak=peak,
        saved_activations=int(saved_bytes), notes=shape.notes)


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
                         device: str = "auto") -> MemoryEstimate:
    """The estimate for a ``Trainer``'s resolved options (``r``, ``target_modules``, ``lora_dropout``,
    ``per_device_train_batch_size``, ``gradient_checkpointing``, ``bf16``/``fp16``, ``dtype``, ``optim``,
    ``max_length``); ``seq_len`` defaults to ``max_length``, the longest a batch can be.

    ``dtype="auto"`` resolves as the loader does: float32 on CPU and for full fine-tuning, bfloat16 for a frozen
    base on a CUDA GPU. With a quantizer the activations follow its ``compute_dtype`` (``auto`` resolves alike).
    """
    device = resolve_device(device)
    quantizer = None if quantizer_name in (None, "", "none") else quantizer_name
    dtype = options.get("dtype") or "auto"
    if quantizer and technique_name != "classifier":  # activations follow bitsandbytes' compute dtype
        dtype = options.get("compute_dtype") or "auto"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and technique_name != "full" else "float32"
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
        num_labels=len(options.get("labels") or ()) or int(options.get("num_labels") or 2))


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu`` (torch is imported only for ``auto``)."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {device!r}")
    return "cuda" if device.startswith("cuda") else "cpu"


def available_memory(device: str = "auto") -> int:
    """Bytes free for a training run: ``MemAvailable`` (or psutil) on CPU, free GPU memory on CUDA."""
    if resolve_device(device) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        raise ConfigError("can't tell how much memory is free here; pass the size explicitly") from None


def preflight(model: Any, technique_name: str, quantizer_name: str | None, options: Mapping[str, Any], *,
              device: str = "auto", seq_len: int | None = None) -> MemoryEstimate | None:
    """Estimate a run before its model is loaded and refuse one that can't fit in the memory free now.

    Returns the estimate (``None`` when the config can't be read locally or a plugin's technique is not
    estimated), or raises :class:`ConfigError` naming settings that would fit, as ``finetune advise`` picks them.
    Set ``FINETUNE_SDK_SKIP_MEMORY_CHECK=1`` to only estimate.
    """
    if technique_name not in TECHNIQUES or quantizer_name not in (*QUANTIZERS, "none", ""):
        return None
    try:
        config = load_config(model)
        estimate = estimate_for_options(config, technique_name, quantizer_name, options, seq_len, device=device)
    except (FinetuneError, AttributeError, KeyError, TypeError, ValueError):  # an estimate never stops a run
        return None
    if os.environ.get("FINETUNE_SDK_SKIP_MEMORY_CHECK") == "1":
        return estimate
    free = available_memory(estimate.device)
    if estimate.total <= free:
        return estimate
    from finetune_sdk.advisor import advise

    advice = advise(config, memory_bytes=free, device=estimate.device, seq_len=estimate.seq_len,
                    task="classification" if technique_name == "classifier" else "causal-lm")
    settings = ", ".join([f"technique={advice.technique!r}"] + ([f"quantizer={advice.quantizer!r}"] if advice.quantizer
                         else []) + [f"{k}={v!r}" for k, v in advice.options.items() if k != "max_length"])
    where = "RAM" if estimate.device == "cpu" else "GPU memory"
    fix = f"{settings} would fit" if advice.fits else "even the smallest settings don't: use a smaller model"
    raise ConfigError(f"training needs about {format_bytes(estimate.total)} but only {format_bytes(free)} of {where} "
                      f"is free; {fix} (finetune advise MODEL explains; FINETUNE_SDK_SKIP_MEMORY_CHECK=1 skips this)")
