"""RoPE scaling in a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` writes it.

* ``linear``: ``rope.scaling.type = linear`` and ``rope.scaling.factor`` (``TextModel.set_gguf_parameters``);
* ``yarn``: type ``yarn``, the factor, ``rope.scaling.original_context_length`` and the optional
  ``yarn_ext_factor``/``yarn_attn_factor``/``yarn_beta_fast``/``yarn_beta_slow`` (same place);
* ``llama3`` (Llama 3.1, 3.2, 3.3): no metadata but a float32 ``rope_freqs`` tensor of ``head_dim / 2`` factors
  that llama.cpp divides each rotary frequency by (``LlamaModel.generate_extra_tensors``); only llama.cpp's
  ``llama`` architecture reads it.

Anything else (``dynamic``, ``longrope``...) is refused with one line naming what is supported.
"""

from __future__ import annotations

import math
from typing import Any

from finetune_sdk.errors import ConfigError

#: RoPE types written as metadata, and the one written as the ``rope_freqs`` tensor (llama architecture only).
METADATA_TYPES = ("linear", "yarn")
LLAMA3 = "llama3"


def rope_parameters(config: Any) -> dict[str, Any]:
    """The model's RoPE parameters (transformers 5 ``rope_parameters``, older ``rope_scaling``), global layers'."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return {}
    if isinstance(params.get("full_attention"), dict):  # Gemma 3: one set per layer type
        params = params["full_attention"]
    return params


def rope_type(config: Any) -> str:
    """``"default"``, ``"linear"``, ``"yarn"``, ``"llama3"``... as the config names it."""
    params = rope_parameters(config)
    return str(params.get("rope_type", params.get("type")) or "default").lower()


def check_rope(config: Any, *, llama_arch: bool) -> str:
    """The config's RoPE type if the export can write it; else a one-line :class:`ConfigError`."""
    kind = rope_type(config)
    supported = ("default", *METADATA_TYPES, *((LLAMA3,) if llama_arch else ()))
    if kind not in supported:
        raise ConfigError(f"GGUF export: RoPE scaling {kind!r} of this {config.model_type} model is not supported; "
                          f"supported: {', '.join(supported)}. Export the model without it (remove rope_scaling "
                          "from config.json) or convert it with llama.cpp's convert_hf_to_gguf.py")
    if kind in METADATA_TYPES and rope_parameters(config).get("factor") is None:
        raise ConfigError(f"GGUF export: RoPE scaling {kind!r} has no 'factor' in the model's config")
    return kind


def add_rope_scaling(config: Any, writer: Any) -> None:
    """Write ``rope.scaling.*`` for ``linear`` and ``yarn`` (nothing for default and llama3)."""
    import gguf

    params, kind = rope_parameters(config), rope_type(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None) or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        optional = {"extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
                    "attention_factor": writer.add_rope_scaling_yarn_attn_factor,
                    "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                    "beta_slow": writer.add_rope_scaling_yarn_beta_slow}
        for key, add in optional.items():
            value = params.get(key, params.get("attn_factor") if key == "attention_factor" else None)
            if value is not None:
                add(float(value))


def llama3_rope_factors(config: Any) -> Any:
    """llama.cpp's ``rope_freqs`` for a ``llama3`` RoPE: float32, shape ``(head_dim // 2,)``.

    Per rotary frequency ``f_i = theta ** (-2i / head_dim)`` with wavelength ``2 pi / f_i``: 1 above the high-frequency
    wavelength ``original_context / high_freq_factor``, ``factor`` below the low-frequency one, and
    ``1 / ((1 - s) / factor + s)`` with ``s = (original_context / wavelength - low) / (high - low)`` between
    (``LlamaModel.generate_extra_tensors``; the same factors transformers' ``_compute_llama3_parameters`` divides
    its inverse frequencies by). ``original_max_position_embeddings`` is read from the RoPE parameters, then the
    config, then 8192 (llama.cpp reads the config's top level only; every Llama 3.x config gives 8192 either way).

    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "llama3", "factor": 8.0,
    ...     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    >>> [round(float(v), 3) for v in llama3_rope_factors(cfg)[[0, 7]]]
    [1.0, 8.0]
    """
    import numpy as np

    params = rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0)) or 10000.0
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None) or 8192
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
