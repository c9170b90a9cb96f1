"""GGUF tensor types: which type each tensor gets for a requested quantization, and the conversion itself.

The conversion is the ``gguf`` package's (``gguf.quants.quantize``, a port of ggml's reference quantizers). The
choice of type per tensor follows llama.cpp's ``convert_hf_to_gguf.py`` and ``llama-quantize``:

* 1-D tensors (norms, biases) and position embeddings stay float32;
* a matrix whose rows don't split into whole blocks (32 values) falls back to float16;
* with a 4- or 5-bit type, the output matrix (or the embedding when it doubles as the output) is kept at q8_0,
  as llama-quantize keeps it at a higher precision (q6_k there, which the ``gguf`` package can't write).
"""

from __future__ import annotations

from typing import Any

from finetune_sdk.errors import ConfigError

#: quantization name -> (GGMLQuantizationType name for matrices, llama.cpp's LlamaFileType name)
QUANTIZATIONS: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")


def check_quantization(quantization: str) -> str:
    """The quantization name in lower case; an unknown one is a one-line :class:`ConfigError`."""
    from finetune_sdk.errors import closest

    name = str(quantization).lower()
    if name not in QUANTIZATIONS:
        raise ConfigError(f"unknown GGUF quantization {quantization!r}{closest(name, QUANTIZATIONS)}; use one of "
                          f"{', '.join(QUANTIZATIONS)}")
    return name


def file_type(quantization: str) -> int:
    """llama.cpp's ``general.file_type`` value for a quantization."""
    import gguf

    return int(getattr(gguf.LlamaFileType, QUANTIZATIONS[quantization][1]))


def tensor_type(name: str, data: Any, quantization: str, output_name: str) -> Any:
    """The ``GGMLQuantizationType`` tensor ``name`` is stored in (see the module docstring for the rules)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd") or quantization == "f32":
        return types.F32
    wanted = getattr(types, QUANTIZATIONS[quantization][0])
    if quantization in LOW_BIT and name == output_name:
        wanted = types.Q8_0
    block_size = gguf.GGML_QUANT_SIZES[wanted][0]
    if data.shape[-1] % block_size:
        return types.F16
    return wanted


def encode(data: Any, qtype: Any) -> Any:
    """``data`` (float32) in ``qtype``: float arrays for F32/F16, packed bytes for the block types."""
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == types.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
