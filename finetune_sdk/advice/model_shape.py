"""The shape of a model as memory depends on it (sizes, layers, attention), read from its config alone.

Example:
    >>> from transformers import LlamaConfig
    >>> shape = ModelShape.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                            num_attention_heads=4, vocab_size=100))
    >>> shape.family, shape.layers, shape.head_dim
    ('decoder', 2, 16)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from finetune_sdk.errors import ConfigError, ModelNotFoundError

#: Encoder-only model types (pooled on their first token by the classifier).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                           "albert", "mpnet", "camembert", "modernbert"})
#: The encoders whose blocks have BERT's layout (``attention.self.query``...), which the estimate can count.
BERT_LAYOUT_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
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
        if model_type in BERT_LAYOUT_TYPES:
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
        input (once for targets that share it), with dropout also a one-byte mask (the run engine's fused LoRA
        layers: finetune_sdk.speed.fused_lora), plus its rank-r intermediate. ``fp32_elements`` are those kept in fp32 even when the model computes in 16 bits
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
            if lora_dropout > 0:  # fused LoRA layers (finetune_sdk.speed.fused_lora): the input + a 1-byte mask
                mask = 0.5 if compute16 else 0.25  # elements of the activations' dtype
                return mask * size * count + (size if compute16 or not saved_anyway else 0)
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


def load_config(model: Any) -> Any:
    """A ``PretrainedConfig`` from a config, a loaded model, a model folder, a ``.gguf`` file or a cached Hub id."""
    if hasattr(model, "model_type") and hasattr(model, "to_dict"):
        return model
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        return model.config
    from transformers import AutoConfig

    from finetune_sdk.models.sources import resolve_source

    source = resolve_source(os.fspath(model))
    folder = source.path or source.id
    if source.kind == "gguf":
        from pathlib import Path

        from finetune_sdk.models.gguf_import import converted_folder

        folder = str(converted_folder(Path(source.id)))
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"can't read the config of {model}: {str(exc).splitlines()[0]} (the estimate reads "
                                 "local files only: download the model first or give its folder)") from None
