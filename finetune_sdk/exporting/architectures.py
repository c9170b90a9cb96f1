"""How each supported model family becomes GGUF: llama.cpp's architecture name, hyperparameters and tensor layout.

Tensor names come from the ``gguf`` package's :class:`gguf.TensorNameMap` (llama.cpp's own table of Hugging Face
names); what this module adds is llama.cpp's per-family reshaping, following ``convert_hf_to_gguf.py``:

* Llama and Mistral: the query and key projections are permuted from Hugging Face's rotate-half RoPE layout to the
  interleaved layout llama.cpp's ``llama`` architecture uses (``LlamaModel.permute``). Mistral is written as
  ``llama``, as llama.cpp does.
* Qwen2: written as is (NeoX RoPE), with the q/k/v biases.
* GPT-2: the ``Conv1D`` weights are transposed to ``(out, in)``; the tied output matrix is written as ``output``
  (llama.cpp's ``gpt2`` expects it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from finetune_sdk.errors import ConfigError

Tensor = Any  # a numpy array


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type`` and how to write it."""

    model_type: str
    gguf_arch: str
    write_hparams: Callable[[Any, Any], None]
    transform: Callable[[str, Tensor, Any], Iterator[tuple[str, Tensor]]]
    skip: tuple[str, ...] = ()


def _rope_theta(config: Any) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return theta if theta is not None else getattr(config, "rope_theta", None)


def _check_rope(config: Any) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ConfigError(f"GGUF export: RoPE scaling {kind!r} in the model's config is not supported yet; "
                          "export a model without rope scaling")


def _decoder_hparams(config: Any, writer: Any, *, rope_dimension: bool) -> None:
    _check_rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", lambda c, w: _decoder_hparams(c, w, rope_dimension=True), _llama_tensors,
                    skip=("rotary_emb.inv_freq",)),
    "mistral": Family("mistral", "llama", lambda c, w: _decoder_hparams(c, w, rope_dimension=True), _llama_tensors,
                      skip=("rotary_emb.inv_freq",)),
    "qwen2": Family("qwen2", "qwen2", lambda c, w: _decoder_hparams(c, w, rope_dimension=False), _as_is,
                    skip=("rotary_emb.inv_freq",)),
    "gpt2": Family("gpt2", "gpt2", _gpt2_hparams, _gpt2_tensors,
                   skip=(".attn.bias", ".attn.masked_bias")),
}


def family_of(config: Any) -> Family:
    """The :class:`Family` of a transformers config; an unsupported one is a one-line :class:`ConfigError`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"GGUF export doesn't support model type {model_type!r}; supported: "
                          f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


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
            if gguf_name is None:
                raise ConfigError(f"GGUF export: no llama.cpp name for weight {name!r} of a {family.model_type} "
                                  "model; this model variant is not supported")
            yield gguf_name, array
