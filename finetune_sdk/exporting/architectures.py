"""How each supported model family becomes GGUF: llama.cpp's architecture name, hyperparameters and tensor layout.

Tensor names come from the ``gguf`` package's :class:`gguf.TensorNameMap` (llama.cpp's own table of Hugging Face
names); what this module adds is llama.cpp's per-family reshaping, following ``convert_hf_to_gguf.py``:

* Llama and Mistral: the query and key projections are permuted from Hugging Face's rotate-half RoPE layout to the
  interleaved layout llama.cpp's ``llama`` architecture uses (``LlamaModel.permute``). Mistral is written as
  ``llama``, as llama.cpp does.
* Qwen2: written as is (NeoX RoPE), with the q/k/v biases. Qwen3: the same plus the per-head RMS norms of queries
  and keys (``attn_q_norm``/``attn_k_norm``) and its own ``head_dim`` (``key_length``/``value_length``).
* Gemma 2 and Gemma 3: every RMS norm weight is stored plus one (Hugging Face's Gemma norms multiply by
  ``1 + weight``, llama.cpp's by ``weight``; ``Gemma2Model``/``Gemma3Model.modify_tensors``); the output matrix is
  the tied embedding; attention and final-logit soft-capping and the sliding window go into the metadata. The
  ``sqrt(hidden_size)`` embedding scale is part of llama.cpp's Gemma graphs, nothing to write.
* Phi-3: the fused ``qkv_proj`` and ``gate_up_proj`` are written fused, as llama.cpp names them (``attn_qkv``,
  ``ffn_up``), with ``rope.dimension_count`` from ``partial_rotary_factor`` (``Phi3MiniModel``).
* GPT-2: the ``Conv1D`` weights are transposed to ``(out, in)``; the tied output matrix is written as ``output``
  (llama.cpp's ``gpt2`` expects it).

RoPE scaling (``linear``, ``yarn``, and Llama 3's ``llama3`` as a ``rope_freqs`` tensor) is in
:mod:`finetune_sdk.exporting.rope`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.exporting.rope import LLAMA3, add_rope_scaling, check_rope, llama3_rope_factors, rope_parameters

Tensor = Any  # a numpy array


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type`` and how to write it."""

    model_type: str
    gguf_arch: str
    write_hparams: Callable[[Any, Any], None]
    transform: Callable[[str, Tensor, Any], Iterator[tuple[str, Tensor]]]
    skip: tuple[str, ...] = ()
    extra_tensors: Callable[[Any], Iterator[tuple[str, Tensor]]] | None = None


def _rope_theta(config: Any) -> float | None:
    theta = rope_parameters(config).get("rope_theta")
    return theta if theta is not None else getattr(config, "rope_theta", None)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _decoder_hparams(config: Any, writer: Any, *, rope_dimension: bool, llama_arch: bool = False) -> None:
    check_rope(config, llama_arch=llama_arch)
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if rope_dimension:
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta = _rope_theta(config)
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    add_rope_scaling(config, writer)


def _llama_rope_freqs(config: Any) -> Iterator[tuple[str, Tensor]]:
    """Llama 3.1+'s ``llama3`` RoPE as llama.cpp's ``rope_freqs`` tensor (see :mod:`~finetune_sdk.exporting.rope`)."""
    from finetune_sdk.exporting.rope import rope_type

    if rope_type(config) == LLAMA3:
        yield "rope_freqs.weight", llama3_rope_factors(config)


def _gemma_hparams(config: Any, writer: Any) -> None:
    """``Gemma2Model``/``Gemma3Model.set_gguf_parameters``: head_dim, soft-capping, sliding window."""
    _decoder_hparams(config, writer, rope_dimension=False)
    if _head_dim(config) == config.hidden_size // config.num_attention_heads:  # always written for Gemma
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))


def _gemma3_hparams(config: Any, writer: Any) -> None:
    """Gemma 3 also: llama.cpp hard-codes the local layers' RoPE (base 10000, every 6th layer global)."""
    params = getattr(config, "rope_parameters", None) or {}
    local = params.get("sliding_attention", {}) if isinstance(params, dict) else {}
    local_theta = local.get("rope_theta", getattr(config, "rope_local_base_freq", 10000.0))
    types = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(types))]
    if float(local_theta) != 10000.0 or (types and types != expected) or local.get("rope_type", "default") != "default":
        raise ConfigError("GGUF export: this Gemma 3 variant's local attention (RoPE base "
                          f"{local_theta}, layer types) differs from what llama.cpp assumes (base 10000, every "
                          "6th layer global); export it with llama.cpp's convert_hf_to_gguf.py")
    _gemma_hparams(config, writer)


def _gemma_tensors(name: str, data: Tensor, config: Any) -> Iterator[tuple[str, Tensor]]:
    if name.endswith("norm.weight"):
        data = data + 1
    yield name, data


def _phi3_hparams(config: Any, writer: Any) -> None:
    """``Phi3MiniModel.set_gguf_parameters`` (a ``longrope`` Phi-3 is refused by the RoPE check)."""
    check_rope(config, llama_arch=False)
    heads = config.num_attention_heads
    rotary = getattr(config, "partial_rotary_factor", None) or rope_parameters(config).get("partial_rotary_factor", 1.0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(int(rotary * config.hidden_size) // heads)
    writer.add_rope_freq_base(float(_rope_theta(config) or 10000.0))
    writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
    writer.add_vocab_size(config.vocab_size)
    add_rope_scaling(config, writer)


def _llama_permute(weights: Tensor, n_head: int, n_head_kv: int | None) -> Tensor:
    """llama.cpp's ``LlamaModel.permute``: rotate-half rows to interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _llama_tensors(name: str, data: Tensor, config: Any) -> Iterator[tuple[str, Tensor]]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        data = _llama_permute(data, heads, heads)
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        data = _llama_permute(data, heads, kv_heads)
    yield name, data


def _as_is(name: str, data: Tensor, config: Any) -> Iterator[tuple[str, Tensor]]:
    yield name, data


GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_tensors(name: str, data: Tensor, config: Any) -> Iterator[tuple[str, Tensor]]:
    if name.endswith(GPT2_CONV1D):
        data = data.T.copy()
    yield name, data


def _gpt2_hparams(config: Any, writer: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def _llama_hparams(config: Any, writer: Any) -> None:
    _decoder_hparams(config, writer, rope_dimension=True, llama_arch=True)


def _neox_hparams(config: Any, writer: Any) -> None:
    _decoder_hparams(config, writer, rope_dimension=False)


ROTARY = ("rotary_emb.inv_freq",)
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", _llama_hparams, _llama_tensors, skip=ROTARY, extra_tensors=_llama_rope_freqs),
    "mistral": Family("mistral", "llama", _llama_hparams, _llama_tensors, skip=ROTARY,
                      extra_tensors=_llama_rope_freqs),
    "qwen2": Family("qwen2", "qwen2", _neox_hparams, _as_is, skip=ROTARY),
    "qwen3": Family("qwen3", "qwen3", _neox_hparams, _as_is, skip=ROTARY),
    "gemma2": Family("gemma2", "gemma2", _gemma_hparams, _gemma_tensors, skip=ROTARY),
    "gemma3_text": Family("gemma3_text", "gemma3", _gemma3_hparams, _gemma_tensors, skip=ROTARY),
    "phi3": Family("phi3", "phi3", _phi3_hparams, _as_is, skip=ROTARY),
    "gpt2": Family("gpt2", "gpt2", _gpt2_hparams, _gpt2_tensors,
                   skip=(".attn.bias", ".attn.masked_bias")),
}


def family_of(config: Any) -> Family:
    """The :class:`Family` of a transformers config; an unsupported one is a one-line :class:`ConfigError`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise unsupported_family(model_type)
    return FAMILIES[model_type]


def unsupported_family(model_type: Any) -> ConfigError:
    """The one-line error for a model type the export can't write: what is supported and what to do."""
    return ConfigError(f"GGUF export doesn't support model type {model_type!r}; supported: "
                       f"{', '.join(sorted(FAMILIES))}. Convert the merged model (finetune merge) with llama.cpp's "
                       "convert_hf_to_gguf.py instead")


def gguf_tensors(model: Any, family: Family) -> Iterator[tuple[str, Tensor]]:
    """``(gguf_name, float32 numpy array)`` for every weight of ``model``, in llama.cpp's names and layout.

    A tied output matrix is left out, except for GPT-2 (llama.cpp reuses ``token_embd`` elsewhere); a weight with no
    GGUF name is a :class:`ConfigError` naming it (rather than a file that silently lacks it).
    """
    import gguf
    import torch

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == family.gguf_arch)
    names = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and family.model_type != "gpt2"
    for hf_name, tensor in model.state_dict().items():
        if any(hf_name.endswith(suffix) for suffix in family.skip):
            continue
        if tied and hf_name == "lm_head.weight":
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        for name, array in family.transform(hf_name, data, model.config):
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None and name == "lm_head.weight":
                raise ConfigError(f"GGUF export: llama.cpp's {family.gguf_arch} reads its output matrix from the "
                                  "token embedding, but this model's lm_head differs from it (an adapter on lm_head "
                                  "of a tied model); train without lm_head in target_modules")
            if gguf_name is None:
                raise ConfigError(f"GGUF export: no llama.cpp name for weight {name!r} of a {family.model_type} "
                                  "model; this model variant is not supported")
            yield gguf_name, array
    if family.extra_tensors is not None:
        yield from family.extra_tensors(model.config)
